"""The adapter contract, checked at load: a missing member is one line naming it; the clip scorer
without local weights is one line saying how to point it at a file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

from eval.cli import main as eval_main
from reca.build import build, import_adapter
from reca.config import ConfigError, load_config

from conftest import TINY


@dataclass
class Args:
    resolution: int = 16
    semantic_dim: int = 0


class Complete:
    Config: ClassVar[type] = Args
    default_lora_targets: ClassVar[list[str]] = ["x"]
    default_trainable: ClassVar[list[str]] = ["x"]

    def __init__(self, args: Args) -> None:
        self.resolution = args.resolution

    @classmethod
    def from_config(cls, args):
        return cls(args)

    def generation_loss(self, images, cond, seeds): ...
    def understanding_loss(self, semantic, prompts, answers, seeds): ...
    def answer_logprob(self, semantic, prompts, answers): ...
    def generate(self, cond, seeds, guidance_scale=1.0, num_steps=1): ...
    def save_pretrained(self, path): ...


def _without(name: str) -> type:
    attrs = {k: v for k, v in vars(Complete).items() if k != name and not k.startswith("__")}
    return type(f"No_{name}", (), attrs)


NoTargets = _without("default_lora_targets")
NoTrainable = _without("default_trainable")
NoGenerate = _without("generate")
NoSave = _without("save_pretrained")


class NoResolution(Complete):
    def __init__(self, args: Args) -> None:  # forgets to set self.resolution
        pass


@pytest.mark.parametrize(
    "cls, member",
    [
        ("NoTargets", "default_lora_targets"),
        ("NoTrainable", "default_trainable"),
        ("NoGenerate", "generate"),
        ("NoSave", "save_pretrained"),
    ],
)
def test_a_missing_protocol_member_is_one_line_naming_it(cls, member):
    with pytest.raises(ConfigError) as e:
        import_adapter(f"{__name__}:{cls}")
    assert str(e.value).startswith("model.adapter:") and member in str(e.value) and "\n" not in str(e.value)


def test_an_instance_without_resolution_fails_at_build_naming_it():
    import_adapter(f"{__name__}:Complete")  # the complete one passes
    cfg = load_config(TINY, [f"model.adapter={__name__}:NoResolution", "model.args={}"])
    with pytest.raises(ConfigError, match=r"its instances lack resolution"):
        build(cfg)


def test_clip_scorer_without_local_weights_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    run.mkdir()
    missing = tmp_path / "nope.safetensors"
    rc = eval_main(["score", "--run", str(run), "--scorer", "clip", "--clip-model", "ViT-B-32"])
    rc2 = eval_main(["score", "--run", str(run), "--scorer", "clip", "--clip-pretrained", str(missing)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("reca-eval: error:")]
    assert rc == rc2 == 2 and len(err) == 2
    assert all("--clip-pretrained" in e and "pass the local file" in e for e in err), err
