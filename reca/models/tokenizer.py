"""Tokenizers that need no downloaded files, for tiny random models in tests and the demo. Real
checkpoints bring their own tokenizer; these are used only when none is configured (byte-level) or
when a closed world names its whole vocabulary (word-level, the demo)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>"]
UNK = "<unk>"


def byte_tokenizer(extra_special_tokens: list[str] | None = None) -> PreTrainedTokenizerFast:
    """259 tokens (3 specials + 256 bytes) plus ``extra_special_tokens``: every string encodes."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    if extra_special_tokens:
        fast.add_special_tokens({"additional_special_tokens": extra_special_tokens})
    return fast


def word_tokenizer(corpus: Iterable[str]) -> PreTrainedTokenizerFast:
    """One token per word or punctuation run of ``corpus`` (plus specials and ``<unk>``), lower-cased.

    A real tokenizer spends about one token per common word; the byte-level one spends one per
    character, which made the demo's LM sequences (instructions, captions) 3-5x longer than they
    would be in a real UMM and the LM, not the generator, the larger cost of a RecA step.
    """
    split = pre_tokenizers.Whitespace()  # \w+|[^\w\s]+
    words = sorted({w for text in corpus for w, _ in split.pre_tokenize_str(text.lower())})
    vocab = {tok: i for i, tok in enumerate(SPECIALS + [UNK] + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = split
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token=UNK
    )


def save_word_tokenizer(corpus: Iterable[str], path: Path) -> Path:
    """Write ``word_tokenizer(corpus)`` where ``model.args.tokenizer`` can load it back."""
    word_tokenizer(corpus).save_pretrained(path)
    return path
