"""Configs: every YAML in configs/ parses; bad configs fail with one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from reca.build import import_adapter
from reca.config import Config, ConfigError, from_dict, help_lines, load_config, split_batch

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(path: Path) -> None:
    cfg = load_config(path)
    cls = import_adapter(cfg.model.adapter)
    from_dict(cls.Config, cfg.model.args, "model.args")  # the adapter's own keys are checked too


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config(
        ROOT / "configs/tiny.yaml", ["optim.lr=1e-5", "lora.rank=4", "lora.enabled=true", "optim.betas=[0.8, 0.9]"]
    )
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.lora.rank == 4 and cfg.lora.enabled is True
    assert cfg.optim.betas == [0.8, 0.9]
    # YAML 1.1 reads a bare `no` as false: a choice spelled "no" must still be accepted
    assert load_config(ROOT / "configs/tiny.yaml", ["train.mixed_precision=no"]).train.mixed_precision == "no"


BAD = [
    (["optim.lrr=1e-5"], "optim.lrr", "did you mean 'lr'"),
    (["train.max_steps=ten"], "train.max_steps", "integer"),
    (["train.mixed_precision=fp8"], "train.mixed_precision", "'bf16'"),
    (["encoder.kind=clip"], "encoder.kind", "'open_clip'"),
    (["lora.enabled=maybe"], "lora.enabled", "true or false"),
    (["objectives.recon.share=0", "objectives.t2i.share=0", "objectives.i2t.share=0"], "objectives", "share"),
    (["objectives.t2i.data.path="], "objectives.t2i.data.path", "no data"),
    (["objectives.i2t.data.caption_column="], "objectives.i2t.data.caption_column", "captions"),
    (["optim.warmup_steps=100", "train.max_steps=10"], "optim.warmup_steps", "below"),
    (["lora.enabled=true", "train.trainable=[transformer]"], "train.trainable", "lora.modules_to_save"),
    (["model.adapter=reca.models.metaquery"], "model.adapter", "package.module:Class"),
    (["train.batch_size=2", "objectives.i2t.share=0.01"], "objectives.i2t.share", "rounds to 0"),
    (["model.dtype=bfloat16", "train.mixed_precision=bf16"], "model.dtype", "float32"),
    (["optim.betas=[0.9]"], "optim.betas", "two numbers"),
    (["objectives.recon.instruction_dropout=1.5"], "objectives.recon.instruction_dropout", "probability"),
    (["optim"], "optim", "key=value"),
    (["train=3"], "train", "mapping"),
]


@pytest.mark.parametrize("overrides,key,hint", BAD, ids=[b[1] + "-" + str(i) for i, b in enumerate(BAD)])
def test_bad_configs_fail_with_one_line_naming_the_key(overrides, key, hint) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs/tiny.yaml", overrides)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(key) or f"'{key}" in message or key in message.split(":")[0], message
    assert hint in message, message


def test_bad_adapter_args_name_the_key() -> None:
    cls = import_adapter("reca.models.metaquery:MetaQueryAdapter")
    with pytest.raises(ConfigError, match=r"^model\.args\.num_querys: unknown key \(did you mean 'num_queries'\?\)"):
        from_dict(cls.Config, {"num_querys": 3}, "model.args")
    with pytest.raises(ConfigError, match=r"^model\.adapter: cannot import"):
        import_adapter("reca.models.nope:Nope")


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(bad)


def test_split_batch_is_exact_and_proportional() -> None:
    assert split_batch(48, {"recon": 2, "i2t": 2}) == {"recon": 24, "i2t": 24}
    assert split_batch(8, {"recon": 0.5, "t2i": 0.25, "i2t": 0.25}) == {"recon": 4, "t2i": 2, "i2t": 2}
    sizes = split_batch(7, {"a": 1, "b": 1, "c": 1})
    assert sum(sizes.values()) == 7 and sorted(sizes.values()) == [2, 2, 3]


def test_help_lists_every_leaf_with_help() -> None:
    lines = help_lines(Config)
    assert any(line.startswith("optim.lr = ") for line in lines)
    assert any(line.startswith("objectives.recon.data.path = ") for line in lines)
    assert all("#" in line or line.endswith(":") or ": " in line for line in lines)


@pytest.mark.parametrize("path", sorted((ROOT / "configs/bench").glob("*.yaml")), ids=lambda p: p.name)
def test_bench_configs_parse(path: Path) -> None:
    cfg = load_config(path)
    from_dict(import_adapter(cfg.model.adapter).Config, cfg.model.args, "model.args")


@pytest.mark.parametrize("path", sorted((ROOT / "configs/accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_parse(path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    cluster = load_config_from_file(str(path))
    assert cluster.num_processes >= 1 and cluster.mixed_precision == "bf16"
    kind = cluster.distributed_type.value
    if "zero" in path.name:
        assert kind == "DEEPSPEED" and cluster.deepspeed_config["zero_stage"] == int(path.stem[-1])
    elif "fsdp2" in path.name:
        assert kind == "FSDP" and int(cluster.fsdp_config["fsdp_version"]) == 2
    else:
        assert kind == "MULTI_GPU"


def test_derive_replaces_nested_fields_and_leaves_the_original() -> None:
    from reca.config import derive

    base = load_config(ROOT / "configs" / "tiny.yaml")
    new = derive(base, train={"max_steps": 5}, objectives={"t2i": {"share": 0.5}}, model={"args": {"x": 1}})
    assert (new.train.max_steps, new.objectives.t2i.share, new.model.args) == (5, 0.5, {"x": 1})
    assert new.train.batch_size == base.train.batch_size and new.objectives.recon == base.objectives.recon
    assert base.train.max_steps != 5 and base.model.args != {"x": 1}
