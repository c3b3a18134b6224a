"""A byte-level tokenizer that needs no downloaded files, for tiny random models in tests and the
demo. Real checkpoints bring their own tokenizer; this one is used only when none is configured."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>"]


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
