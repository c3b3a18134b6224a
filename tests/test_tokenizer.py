"""The offline tokenizers: the word-level one the demo's LM reads its world through."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer

from demo.run import I2T_PROMPT, eval_prompts, world_vocabulary
from demo.world import SPLITS
from reca.build import build
from reca.config import load_config
from reca.models.tokenizer import UNK, byte_tokenizer, save_word_tokenizer, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_one_token_per_word_and_unknown_words_map_to_unk() -> None:
    tok = word_tokenizer(["Reconstruct this image.", "a yellow square"])
    ids = tok("Reconstruct this image.", add_special_tokens=False).input_ids
    assert len(ids) == 4 and tok.unk_token_id not in ids  # reconstruct · this · image · .
    assert len(byte_tokenizer()("Reconstruct this image.", add_special_tokens=False).input_ids) == 23
    assert (
        tok("A YELLOW square", add_special_tokens=False).input_ids
        == tok("a yellow square", add_special_tokens=False).input_ids
    )
    assert tok("a purple zebra", add_special_tokens=False).input_ids[1:] == [tok.convert_tokens_to_ids(UNK)] * 2
    assert tok("", add_special_tokens=False).input_ids == []
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)


def test_demo_vocabulary_covers_every_text_its_lm_reads() -> None:
    from reca.instructions import INSTRUCTIONS

    assert I2T_PROMPT == load_config(ROOT / "demo/config.yaml").objectives.i2t_prompt  # training and eval ask alike
    tok = word_tokenizer(world_vocabulary())
    texts = (
        [p.prompt for side in SPLITS for p in eval_prompts(side)]
        + list(INSTRUCTIONS)
        + [I2T_PROMPT, "a star", "a red ring"]
    )
    for text in texts:
        assert tok.unk_token_id not in tok(text, add_special_tokens=False).input_ids, text


def test_model_args_tokenizer_loads_a_saved_word_tokenizer_and_travels_with_the_checkpoint(tmp_path: Path) -> None:
    path = save_word_tokenizer(["a red circle", "a blue star", "Describe the image."], tmp_path / "tok")
    assert (
        AutoTokenizer.from_pretrained(path)("a blue star").input_ids
        == word_tokenizer(["a red circle", "a blue star", "Describe the image."])("a blue star").input_ids
    )
    torch.manual_seed(0)
    adapter, _ = build(load_config(ROOT / "configs/tiny.yaml", [f"model.args.tokenizer={path}"]))
    assert (
        len(adapter.tokenizer) == 4 + 9
    )  # specials + unk, then a · blue · circle · describe · image · red · star · the · .
    adapter.save_pretrained(tmp_path / "umm")
    again, _ = build(load_config(ROOT / "configs/tiny.yaml", [f"model.args.pretrained={tmp_path / 'umm'}"]))
    assert again.tokenizer("a red circle").input_ids == adapter.tokenizer("a red circle").input_ids
