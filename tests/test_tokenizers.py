"""The tokenizers built offline for tiny models: words as single tokens, the Qwen chat template and specials, and a
round trip through save_pretrained / AutoTokenizer (how a pipeline folder loads them)."""

from transformers import AutoTokenizer

from diffalign.models.tokenizers import build_qwen2_tokenizer

WORDS = "a an the photo of cat dog red at circle".split()


def test_qwen2_words_are_single_tokens_with_and_without_a_leading_space():
    tok = build_qwen2_tokenizer(WORDS)
    assert tok.tokenize("a photo of a red cat at the circle") == [
        "a", "Ġphoto", "Ġof", "Ġa", "Ġred", "Ġcat", "Ġat", "Ġthe", "Ġcircle"
    ]  # fmt: skip
    assert tok.tokenize("xyz") == ["x", "y", "z"]  # byte fallback for anything else
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"


def test_qwen2_chat_template_and_specials_survive_save_and_load(tmp_path):
    build_qwen2_tokenizer(WORDS).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "a red cat"}]
    think = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    plain = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert think == "<|im_start|>user\na red cat<|im_end|>\n<|im_start|>assistant\n"
    assert plain == think + "<think>\n\n</think>\n\n"
    ids = tok("<|im_start|>user\n a red cat<|im_end|>").input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
