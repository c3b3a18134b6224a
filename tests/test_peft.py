"""PEFT beyond plain LoRA: DoRA, PiSSA/OLoRA initialisation and per-module ranks each train only
the adapter's weights, and the exported folder round-trips through PeftModel.from_pretrained on the
original, untouched base model."""

from __future__ import annotations

import pytest
import torch
from accelerate.utils import set_seed

from reca.adapter import Condition
from reca.build import build
from reca.config import ConfigError, load_config

from conftest import TINY, tiny_overrides

LORA = ["lora.enabled=true", "lora.rank=4", "optim.lr=1e-2", "train.max_steps=3", "train.save_every=100"]
ADAPTER_WEIGHTS = ("lora_", "lora_magnitude_vector")  # DoRA adds a trained magnitude per output


def train_capturing(cfg, monkeypatch) -> dict:
    """fit(), recording the wrapped model right after peft built it (PiSSA has moved weights by then)."""
    import reca.trainer as trainer

    seen = {}
    real = trainer.apply_lora

    def spy(adapter, c):
        seen["model"] = real(adapter, c)
        seen["init"] = {k: v.clone() for k, v in seen["model"].state_dict().items()}
        return seen["model"]

    monkeypatch.setattr(trainer, "apply_lora", spy)
    trainer.fit(cfg)
    return seen


@pytest.mark.parametrize(
    "option",
    [
        "lora.use_dora=true",
        "lora.init=pissa",
        "lora.init=olora",
        "lora.rank_pattern={'transformer\\..*attn1.*': 2}",
    ],
)
def test_peft_option_trains_only_adapter_weights_and_round_trips(toy_data, tmp_path, monkeypatch, option) -> None:
    from peft import PeftModel

    cfg = load_config(TINY, tiny_overrides(toy_data, tmp_path, *LORA, option, "train.sample_prompts=[]"))
    seen = train_capturing(cfg, monkeypatch)
    model, after = seen["model"], seen["model"].state_dict()
    trained = [k for k in after if not torch.equal(after[k], seen["init"][k])]
    assert trained and all(any(w in k for w in ADAPTER_WEIGHTS) for k in trained), trained[:5]
    if "dora" in option:
        assert any("lora_magnitude_vector" in k for k in trained)
    if "rank_pattern" in option:
        ranks = {k: v.shape[0] for k, v in after.items() if k.endswith("lora_A.default.weight")}
        assert {r for k, r in ranks.items() if "attn1" in k and k.startswith("base_model.model.transformer")} == {2}
        assert 4 in ranks.values()
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "final/README.md")  # reca's card, not peft's template
    assert card.data.library_name == "peft" and "lora" in card.data.tags and "## Mixture" in card.text
    # the export loads onto a fresh base built as the trainer built it — for PiSSA/OLoRA the original
    # weights, not the residual the training ran on — and reproduces the trained model
    set_seed(cfg.train.seed)  # as the trainer seeds before building
    fresh, encoder = build(cfg)
    x = torch.zeros(2, 3, 32, 32)
    cond = Condition(semantic=torch.randn(2, 4, encoder.width), instructions=["Redraw it."] * 2)
    expected = model.eval().generation_loss(x, cond, [1, 2])
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "final")).eval()
    torch.testing.assert_close(loaded.generation_loss(x, cond, [1, 2]), expected, atol=1e-5, rtol=1e-5)


def test_unknown_lora_init_is_refused(toy_data, tmp_path) -> None:
    with pytest.raises(ConfigError, match="lora.init: 'loftq' is not one of"):
        load_config(TINY, tiny_overrides(toy_data, tmp_path, "lora.enabled=true", "lora.init=loftq"))
