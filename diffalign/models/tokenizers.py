"""Build real tokenizers offline from a word list (for tiny test models and the toy world).

CLIP (BPE): the vocab holds the 256 byte characters, the same with "</w>", one entry per merge result, then the two
specials; merges are chosen so every listed word becomes a single token. Any other text still tokenizes (byte
fallback).
T5 (Unigram, as the real sentencepiece model): <pad>, </s>, <unk>, "▁", one "▁word" piece per listed word, then
single printable-ASCII characters; built with transformers' own tokenizers-backed `T5Tokenizer(vocab=...)`, so no
sentencepiece file is needed. Other ASCII text tokenizes character by character; non-ASCII characters become <unk>.
Qwen2 (byte-level BPE, as Qwen2.5-VL and Qwen3 use): the 256 byte characters, one entry per merge result, then the
chat specials <|endoftext|>, <|im_start|>, <|im_end|>, <think>, </think>, and Qwen3's chat template (the system /
user / assistant turns and `enable_thinking`), so the pipelines' `apply_chat_template` and fixed templates work.
"""

from __future__ import annotations

import string

from transformers import CLIPTokenizer, Qwen2Tokenizer, T5Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode


def _bpe(word: str, ranks: dict[tuple[str, str], int], end: str = "</w>") -> list[str]:
    """GPT-2/CLIP BPE of one word: repeatedly merge every occurrence of the lowest-ranked pair (CLIP marks the
    word's last character with `end`; byte-level BPE has none)."""
    pieces = list(word[:-1]) + [word[-1] + end]
    while len(pieces) > 1:
        pairs = [(ranks[p], p) for p in zip(pieces, pieces[1:]) if p in ranks]
        if not pairs:
            break
        _, best = min(pairs)
        merged, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def build_clip_tokenizer(words: list[str], model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary has each of `words` (lower-case ASCII) as one token."""
    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    unique = sorted(set(w.lower() for w in words))
    for word in unique:
        # Run the merges made so far, then join what is left left-to-right with new, higher-ranked merges.
        # A new merge ranks above every old one, so words already built still end as single tokens.
        pieces = _bpe(word, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(ranks)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1]] + pieces[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    merges = sorted(ranks, key=ranks.get)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    if len(tok) != len(vocab):
        raise RuntimeError(f"tokenizer built with {len(tok)} ids, expected {len(vocab)}")
    split = [w for w in unique if len(tok.tokenize(w)) != 1]
    if split:
        raise RuntimeError(f"words that did not become single tokens: {split}")
    return tok


def build_t5_tokenizer(words: list[str]) -> T5Tokenizer:
    """A T5Tokenizer (Unigram) with each of `words` as one "▁word" piece; pad 0, eos 1, unk 2 as in T5."""
    unique = sorted(set(w.lower() for w in words))
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    # Unigram picks the segmentation with the highest total score: a word piece (-1) beats its characters (-5 each)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -1.0) for w in unique] + [(c, -5.0) for c in chars]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    if (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) != (0, 1, 2) or len(tok) != len(vocab):
        raise RuntimeError(f"T5 tokenizer built with {len(tok)} ids and unexpected special ids")
    split = [w for w in unique if len(tok.tokenize(w)) != 1]
    if split:
        raise RuntimeError(f"words that did not become single tokens: {split}")
    return tok


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3's chat template, reduced to text turns: what the Z-Image and FLUX.2-Klein pipelines render
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)


def build_qwen2_tokenizer(words: list[str], model_max_length: int = 1024) -> Qwen2Tokenizer:
    """A Qwen2Tokenizer (byte-level BPE) with each of `words` (lower-case ASCII) as one token, " word" (the form
    after a space) as one token too, the Qwen chat specials and chat template; pad = eos = <|endoftext|>."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    merges: list[tuple[str, str]] = []
    space = bytes_to_unicode()[ord(" ")]
    unique = sorted(set(w.lower() for w in words))
    ranked: dict[tuple[str, str], int] = {}

    def merge(pair: tuple[str, str]) -> None:
        if pair not in ranked:
            ranked[pair] = len(ranked)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))

    for word in unique:  # run the merges made so far, then join what is left with new, higher-ranked merges
        pieces = _bpe(word, ranked, end="")
        while len(pieces) > 1:
            merge((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    for word in unique:  # then "Ġword" = (Ġ, word), ranked after every merge that builds a word
        merge((space, word))
    for special in QWEN_SPECIALS:
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    split = [w for w in unique if len(tok.tokenize(w)) != 1 or len(tok.tokenize(" " + w)) != 1]
    if split:
        raise RuntimeError(f"words that did not become single tokens: {split}")
    return tok
