"""A config that makes no sense does not train: non-finite and out-of-range numbers, settings the
built model or the device cannot honour, duplicate YAML keys; user-input errors reach the user as
one line and exit code 2; data stays where it belongs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import train
from reca.config import ConfigError, DataSource, load_config
from reca.data import MAX_PIXELS, NoUsableData, batches, load_image, open_source

from conftest import TINY, tiny_overrides

NONSENSE = [
    ("optim.lr=.nan", "optim.lr: must be a finite number"),
    ("optim.lr=inf", "optim.lr: must be a finite number"),
    ("objectives.recon.share=.nan", "objectives.recon.share: must be a finite number"),
    ("objectives.t2i.weight=.inf", "objectives.t2i.weight: must be a finite number"),
    ("optim.max_grad_norm=.nan", "optim.max_grad_norm: must be a finite number"),
    ("objectives.i2t.weight=-1", "objectives.i2t.weight: must be >= 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay: must be >= 0"),
    ("train.guidance_scale=-2", "train.guidance_scale: must be >= 0"),
    ("train.log_every=0", "train.log_every: must be > 0"),
    ("train.sample_steps=0", "train.sample_steps: must be > 0"),
    ("train.num_workers=-1", "train.num_workers: must be >= 0"),
    ("encoder.input_size=-16", "encoder.input_size: must be >= 0"),
    ("model.args.resolution=-32", "model.args.resolution: -32 must be > 0"),
    ("train.output_dir=", "train.output_dir: must not be empty"),
    ("lora.dropout=1.5", "lora.dropout: 1.5 must be in [0, 1)"),
]


@pytest.mark.parametrize("override,message", NONSENSE, ids=[n[0] for n in NONSENSE])
def test_nonsense_numbers_are_refused_at_load_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_zero_lora_rank_is_named_before_the_alpha_derived_from_it():
    # the demo sets alpha = 2 x rank: rank 0 must be reported as the rank, the key the user set
    with pytest.raises(ConfigError, match=r"^lora.rank: must be > 0 when lora.enabled is true$"):
        load_config(TINY, ["lora.enabled=true", "lora.rank=0", "lora.alpha=0"])


def test_duplicate_yaml_keys_are_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  max_steps: 10\n  batch_size: 4\n  max_steps: 20\n")
    with pytest.raises(ConfigError, match=r"dup.yaml:4: key 'max_steps' appears twice in one mapping .first on line 2"):
        load_config(path)
    path.write_bytes(b"train:\n  output_dir: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


@pytest.mark.parametrize(
    "override,message",
    [
        ("encoder.layer=2", "encoder.layer: 2 is out of range for ViT-B-32 with 2 blocks"),  # would wrap to 0
        ("encoder.layer=-3", "encoder.layer: -3 is out of range"),
        ("model.args.resolution=30", "model.args.resolution: 30 must be a positive multiple of 4"),
    ],
)
def test_settings_the_built_model_cannot_honour_fail_at_build(override, message):
    from reca.build import build

    with pytest.raises(ConfigError, match=message):
        build(load_config(TINY, [override]))


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    rc = train.main(argv)
    err = capsys.readouterr().err.replace("\r", "\n")  # a progress bar may share the line
    return rc, [line[line.index("error: ") :] for line in err.splitlines() if "error: " in line]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU's refusal of fp16")
def test_precision_the_device_cannot_do_and_output_dir_that_is_a_file(toy_data, tmp_path, capsys):
    rc, err = run_cli(
        ["--config", str(TINY), *tiny_overrides(toy_data, tmp_path / "a", "train.mixed_precision=fp16")], capsys
    )
    assert rc == 2 and len(err) == 1 and "train.mixed_precision: fp16 needs a CUDA GPU" in err[0]
    (tmp_path / "file").write_text("")
    rc, err = run_cli(["--config", str(TINY), *tiny_overrides(toy_data, tmp_path / "file")], capsys)
    assert rc == 2 and "train.output_dir:" in err[0] and "is a file" in err[0]


def test_data_errors_are_one_line_and_exit_2(toy_data, tmp_path, capsys):
    base = ["--config", str(TINY), *tiny_overrides(toy_data, tmp_path / "out", "train.max_steps=3")]
    cases = {
        "objectives.t2i.data.image_column: 'picture'": ["objectives.t2i.data.image_column=picture"],
        "objectives.t2i.data.caption_column: this objective": ["objectives.t2i.data.caption_column=text"],
    }
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"image": "caf\xe9.png", "caption": "x"}\n')
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    for i in range(3):
        (bad_dir / f"{i}.png").write_bytes(b"not a png")
    cases["objectives.recon.data.path"] = [f"objectives.recon.data.path={empty}"]
    cases[f"objectives.recon.data.path: {latin} is not UTF-8"] = [f"objectives.recon.data.path={latin}"]
    cases["objectives.recon.data.path: no usable image"] = [f"objectives.recon.data.path={bad_dir}"]
    for expected, extra in cases.items():
        rc, err = run_cli(base + extra, capsys)
        assert rc == 2 and len(err) == 1 and expected in err[0], (expected, err)


def test_manifest_paths_outside_its_folder_are_refused_unless_allowed(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "outside.png")
    sub = tmp_path / "data"
    sub.mkdir()
    Image.new("RGB", (32, 32)).save(sub / "inside.png")
    rows = [{"image": "inside.png"}, {"image": "../outside.png"}, {"image": str(tmp_path / "outside.png")}]
    (sub / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = DataSource(path=str(sub / "m.jsonl"), caption_column="")
    with pytest.raises(ConfigError, match=r"^k.allow_outside_root: 2 image path\(s\)"):
        open_source(src, need_captions=False, key="k")
    streamed = DataSource(path=str(sub / "m.jsonl"), caption_column="", streaming=True)
    with pytest.raises(ConfigError, match="k.allow_outside_root: image path '../outside.png'"):
        list(open_source(streamed, need_captions=False, key="k"))
    src.allow_outside_root = True
    assert len(open_source(src, need_captions=False, key="k")) == 3


def test_a_path_that_leaves_through_a_symlink_is_outside_and_dots_inside_stay_inside(tmp_path):
    # folders are resolved once per manifest, file names only when they are links: the answer
    # must still be the fully resolved path's
    from reca.data import _outside

    (tmp_path / "elsewhere").mkdir()
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "linked").symlink_to(tmp_path / "elsewhere")  # a folder link leaving the root
    (root / "sub" / "file-link.png").symlink_to(tmp_path / "elsewhere" / "x.png")
    (root / "inner-link.png").symlink_to(root / "sub" / "a.png")  # a link that stays inside
    r, cache = str(root.resolve()), {}
    verdicts = {
        v: _outside(v, r, cache)
        for v in [
            "a.png",
            "sub/a.png",
            "sub/../a.png",
            "sub/..",
            "linked/x.png",
            "sub/file-link.png",
            "inner-link.png",
            "sub/../../x.png",
            "..",
        ]
    }
    assert verdicts == {
        "a.png": False,
        "sub/a.png": False,
        "sub/../a.png": False,
        "sub/..": False,
        "linked/x.png": True,
        "sub/file-link.png": True,
        "inner-link.png": False,
        "sub/../../x.png": True,
        "..": True,
    }


def test_decompression_bomb_is_skipped_and_counted_without_a_global_setting(tmp_path):
    side = int(MAX_PIXELS**0.5) + 2
    Image.new("1", (side, side)).save(tmp_path / "bomb.png")  # tiny on disk, ~90 megapixels decoded
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "ok.png")
    before = Image.MAX_IMAGE_PIXELS
    assert load_image(str(tmp_path / "bomb.png")) == (None, "too_large")
    assert Image.MAX_IMAGE_PIXELS == before
    import PIL.ImageFile

    PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True  # a user's own process-wide choice is left alone
    try:
        load_image(str(tmp_path / "ok.png"))
        assert PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True
    finally:
        PIL.ImageFile.LOAD_TRUNCATED_IMAGES = False
    ds = open_source(DataSource(path=str(tmp_path)), need_captions=False)
    stream = batches(
        ds, batch_size=2, transform=lambda im: {"x": torch.zeros(1)}, caption_column=None, seed=0, min_side=1
    )
    assert next(stream)["skipped"].get("too_large", 0) >= 1


def test_all_unusable_source_names_the_key(tmp_path):
    for i in range(2):
        (tmp_path / f"{i}.png").write_bytes(b"junk")
    ds = open_source(DataSource(path=str(tmp_path)), need_captions=False)
    stream = batches(
        ds, batch_size=1, transform=lambda im: {}, caption_column=None, seed=0, key="objectives.recon.data"
    )
    with pytest.raises(NoUsableData, match=r"^objectives.recon.data.path: no usable image"):
        next(stream)
    assert isinstance(NoUsableData("x"), ConfigError) and Path(tmp_path).is_dir()
