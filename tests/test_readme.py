"""The README's worked adapter example runs, and its config reference matches the code."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from conftest import ROOT, TINY
from reca.adapter import Condition, UMMAdapter
from reca.config import help_lines, load_config

README = (ROOT / "README.md").read_text()


def readme_block(after_heading: str, lang: str) -> str:
    section = README.split(after_heading, 1)[1]
    return re.search(rf"```{lang}\n(.*?)```", section, re.S).group(1)


def test_config_reference_is_in_sync() -> None:
    assert readme_block("## Configuration reference", "").strip() == "\n".join(help_lines())


def test_adapter_example_trains_through_reca(tmp_path: Path, toy_data: Path, monkeypatch) -> None:
    (tmp_path / "my_umm.py").write_text(readme_block("## Bring your own UMM", "python"))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_umm", None)
    import reca.trainer as trainer

    built = {}
    real_build = trainer.build
    monkeypatch.setattr(trainer, "build", lambda c: built.setdefault("pair", real_build(c)))
    cfg = load_config(TINY, [
        "model.adapter=my_umm:MyUMM", "model.args={width: 32, resolution: 16}",
        *[f"objectives.{k}.data.path={toy_data}" for k in ("recon", "t2i", "i2t")],
        f"train.output_dir={tmp_path / 'out'}", "train.max_steps=40", "train.log_every=1", "train.save_every=100",
        "optim.lr=3e-3", "train.sample_prompts=[a red circle]",
    ])
    trainer.fit(cfg)
    adapter, encoder = built["pair"]
    assert isinstance(adapter, UMMAdapter)
    import json

    log = [json.loads(line) for line in (tmp_path / "out/log.jsonl").read_text().splitlines()]
    first, last = sum(r["recon"] for r in log[:5]) / 5, sum(r["recon"] for r in log[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    # its save_pretrained output loads back through its own config key
    from my_umm import MyUMM, MyUMMConfig

    again = MyUMM.from_config(MyUMMConfig(semantic_dim=encoder.width, width=32, resolution=16,
                                          weights=str(tmp_path / "out/final/my_umm.pt")))
    sem = torch.randn(1, 4, encoder.width)
    cond = Condition(semantic=sem, instructions=["Reconstruct."])
    a = adapter.generate(cond, seeds=[0], num_steps=4)[0]
    b = again.generate(cond, seeds=[0], num_steps=4)[0]
    assert a.size == (16, 16) and a.tobytes() == b.tobytes()
