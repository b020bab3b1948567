"""Tiny random checkpoints for the detection, OCR and VLM-judge scorers, built offline in about a second each.

Each is the real transformers class at a tiny size, seeded, saved with `save_pretrained` (model and processor in
one folder, as the hub repos are) and loaded by the scorer with `from_pretrained`:
- OWLv2 (`Owlv2ForObjectDetection` + `Owlv2Processor`): hidden 32, 1 layer each tower, 32 px images, patch 8;
- TrOCR (`VisionEncoderDecoderModel`: ViT encoder + `TrOCRForCausalLM` decoder, `TrOCRProcessor`): hidden 32;
- Qwen2-VL (`Qwen2VLForConditionalGeneration` + `Qwen2VLProcessor`): hidden 32, 1 layer, vision depth 1.
Tokenizers are built from word lists (diffalign.models.tokenizers and `tokenizers` BPE), no download.
The weights are random: these check loading, batching and the score arithmetic, not accuracy.
"""

from __future__ import annotations

from pathlib import Path

import torch

DETECTOR_WORDS = ["a", "photo", "of", "dog", "cat", "car", "bench", "red", "blue"]


def build_owlv2(root: Path, seed: int = 0) -> Path:
    """-> folder with a tiny `Owlv2ForObjectDetection` and its `Owlv2Processor`."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    from diffalign.models.tokenizers import build_clip_tokenizer

    tok = build_clip_tokenizer(DETECTOR_WORDS, model_max_length=16)
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=tok.convert_tokens_to_ids("<|startoftext|>"),
                eos_token_id=eos, pad_token_id=eos)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)).eval()
    image_processor = Owlv2ImageProcessor(size={"height": 32, "width": 32})
    folder = root / "owlv2"
    model.save_pretrained(folder)
    Owlv2Processor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    return folder


def build_byte_roberta_tokenizer():
    """A RobertaTokenizer (TrOCR's) over the 256 byte characters, no merges: any text, one token per byte."""
    from transformers import RobertaTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = ["<s>", "<pad>", "</s>", "<unk>", *bytes_to_unicode().values(), "<mask>"]
    return RobertaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])


def build_trocr(root: Path, seed: int = 0) -> Path:
    """-> folder with a tiny TrOCR (`VisionEncoderDecoderModel`: ViT + `TrOCRForCausalLM`) and its processor."""
    from transformers import (
        TrOCRConfig,
        TrOCRForCausalLM,
        TrOCRProcessor,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    tok = build_byte_roberta_tokenizer()
    torch.manual_seed(seed)
    encoder = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                 image_size=32, patch_size=8))  # fmt: skip
    decoder = TrOCRForCausalLM(TrOCRConfig(vocab_size=len(tok), d_model=32, decoder_layers=1, decoder_attention_heads=4,
                                           decoder_ffn_dim=64, max_position_embeddings=64, cross_attention_hidden_size=32,
                                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                           eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id, tie_word_embeddings=False))  # fmt: skip
    model = VisionEncoderDecoderModel(encoder=encoder, decoder=decoder).eval()
    model.config.decoder_start_token_id = tok.eos_token_id  # TrOCR checkpoints start decoding from </s> (id 2)
    model.config.pad_token_id, model.config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    model.generation_config.decoder_start_token_id = tok.eos_token_id
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    image_processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    folder = root / "trocr"
    model.save_pretrained(folder)
    TrOCRProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    return folder


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]  # fmt: skip
# Qwen2-VL's chat template, reduced to what a single-turn judge uses (user turn with images and text)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen2_tokenizer():
    """A Qwen2Tokenizer (byte-level BPE) over the byte characters, with "Yes" and "No" merged into single tokens."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = [("Y", "e"), ("Ye", "s"), ("N", "o")]
    tokens = [*bytes_to_unicode().values(), "Ye", "Yes", "No"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")  # fmt: skip
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    return tok


def build_qwen2_vl(root: Path, seed: int = 0) -> Path:
    """-> folder with a tiny `Qwen2VLForConditionalGeneration` and its `Qwen2VLProcessor` (16-32 px images)."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tok = build_qwen2_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})  # fmt: skip
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2)  # fmt: skip
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"])  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                            min_pixels=16 * 16, max_pixels=32 * 32)  # fmt: skip
    folder = root / "qwen2_vl"
    model.save_pretrained(folder)
    video_processor = Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2)
    Qwen2VLProcessor(image_processor, tok, video_processor, chat_template=QWEN_CHAT_TEMPLATE).save_pretrained(folder)
    return folder


IMAGEREWARD_WORDS = ["a", "photo", "of", "red", "blue", "green", "yellow", "square", "dog", "cat"]


def build_imagereward(root: Path, seed: int = 0) -> dict:
    """ImageReward's on-disk format at tiny size: `ImageReward.pt` (torch.save of the state dict with BLIP's key
    names), a .safetensors copy, `med_config.json` and a BERT tokenizer folder.

    The ViT is timm's `VisionTransformer` (the module BLIP's vit.py copies: same key names, LayerNorm eps 1e-6), so
    the test checks the key mapping into transformers' BlipVisionModel against an independent implementation. The
    text encoder is transformers' BlipTextModel with BLIP's med.py key names. Returns the paths and the modules.
    """
    import functools

    import timm
    from safetensors.torch import save_file
    from transformers import BertTokenizer, BlipTextConfig
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    from diffalign.rewards.aesthetic import aesthetic_mlp

    folder = root / "imagereward"
    (folder / "tokenizer").mkdir(parents=True)
    vocab = folder / "tokenizer" / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *IMAGEREWARD_WORDS]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(folder / "tokenizer")
    med = dict(
        architectures=["BertModel"],
        hidden_act="gelu",
        hidden_size=32,
        intermediate_size=64,
        layer_norm_eps=1e-12,
        max_position_embeddings=40,
        model_type="bert",
        num_attention_heads=4,
        num_hidden_layers=1,
        pad_token_id=0,
        vocab_size=len(IMAGEREWARD_WORDS) + 7,
        encoder_width=32,
        add_cross_attention=True,
    )  # fmt: skip  (+5 specials, +[DEC], +[ENC], as upstream's 30522 + 2)
    (folder / "med_config.json").write_text(__import__("json").dumps(med, indent=2))
    torch.manual_seed(seed)
    vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                          num_heads=4, mlp_ratio=2, num_classes=0, global_pool="",
                                                          norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)).eval()  # fmt: skip
    text = BlipTextModel(BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=32, encoder_hidden_size=32,
                                        intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                        max_position_embeddings=40, pad_token_id=0, is_decoder=True),
                         add_pooling_layer=False).eval()  # fmt: skip
    mlp = aesthetic_mlp(32).eval()
    state = {f"blip.visual_encoder.{k}": v for k, v in vit.state_dict().items()}
    state |= {f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()}
    state |= {f"mlp.layers.{k}": v for k, v in mlp.state_dict().items()}
    state["blip.vision_proj.weight"] = torch.randn(16, 32)  # in the real file too, unused by the score
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    torch.save(state, folder / "ImageReward.pt")
    save_file(state, folder / "ImageReward.safetensors")
    return dict(pt=folder / "ImageReward.pt", safetensors=folder / "ImageReward.safetensors",
                med_config=folder / "med_config.json", tokenizer=folder / "tokenizer", vit=vit, text=text, mlp=mlp)  # fmt: skip


def build_hpsv3(root: Path, seed: int = 0) -> dict:
    """HPSv3's on-disk format at tiny size: a base Qwen2-VL folder (config + processor, as Qwen2-VL-7B-Instruct) and
    `HPSv3.safetensors`, the whole reward model's state dict in the key layout of transformers < 4.52 (`model.*`,
    `visual.*`, `lm_head.*`) plus upstream's default ranknet head `rm_head.{0,3,5}` (h -> 1024 -> 16 -> 2), with the
    embeddings resized to the tokenizer + <|Reward|>. Returns the paths, the reward model's body and head."""
    from safetensors.torch import save_file
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    base = build_qwen2_vl(root, seed)
    proc = AutoProcessor.from_pretrained(base)
    proc.tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    torch.manual_seed(seed + 1)
    model = Qwen2VLForConditionalGeneration.from_pretrained(base).eval()
    model.resize_token_embeddings(len(proc.tokenizer))
    head = torch.nn.Sequential(torch.nn.Linear(32, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05),
                               torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).eval()  # fmt: skip
    old = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.language_model."):
            key = "model." + key.removeprefix("model.language_model.")
        elif key.startswith("model.visual."):
            key = key.removeprefix("model.")
        old[key] = value.detach().clone().contiguous()
    old |= {f"rm_head.{k}": v.detach().clone() for k, v in head.state_dict().items()}
    save_file(old, root / "HPSv3.safetensors")
    return dict(base=base, checkpoint=root / "HPSv3.safetensors", model=model, head=head)
