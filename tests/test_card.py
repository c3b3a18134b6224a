"""Model cards: Hub front matter (base model, library, tags, licence placeholder) and the body."""

from __future__ import annotations

from huggingface_hub import ModelCard

from reca.card import base_model, model_card
from reca.config import load_config

from conftest import ROOT, TINY


def test_card_front_matter_and_body(tmp_path) -> None:
    cfg = load_config(TINY, ["train.ema_decay=0.999"])
    evals = [{"step": 0, "eval/rare": 0.5, "eval/overall": 0.5}, {"step": 10, "eval/rare": 0.25, "eval/overall": 0.25}]
    model_card(cfg, resolution=32, steps=10, evals=evals).save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "reca" and card.data.license == "other" and card.data.base_model is None
    assert "sees 16 px; the model generates at 32 px" in card.text and "| recon | 0.5 | 1.0 |" in card.text
    assert "| 10 | 25.0 | 25.0 |" in card.text and "weights in `ema/`" in card.text


def test_base_model_is_a_hub_id_only() -> None:
    janus = load_config(
        ROOT / "configs/janus_pro_1b_lora.yaml", [f"objectives.{k}.data.path=x" for k in ("recon", "i2t")]
    )
    assert base_model(janus) == "deepseek-community/Janus-Pro-1B"
    assert base_model(load_config(TINY, ["model.args.pretrained=/tmp/some/dir"])) is None
