"""Evaluation never scores what it cannot verify: unverified constraints are reported apart and kept
out of every accuracy, malformed prompt files fail naming file:line, and scoring reads exactly the
images the layout defines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from eval.cli import main as eval_main
from eval.prompts import EvalError, Prompt, load_geneval
from eval.report import aggregate, score_run
from eval.runner import generate, load_run
from eval.scorers import GENEVAL_PALETTE, PaletteScorer, VQAScorer


class FlatAdapter:
    """Draws a flat square of the first include colour named in the prompt text (blue otherwise)."""

    resolution = 32

    def generate(self, cond, seeds, guidance_scale, num_steps):
        out = []
        for text in cond.texts:
            colour = next((c for c in GENEVAL_PALETTE if c in text.split()), "blue")
            im = Image.new("RGB", (32, 32), (153, 153, 153))
            im.paste(Image.new("RGB", (16, 16), GENEVAL_PALETTE[colour]), (8, 8))
            out.append(im)
        return out


def make_run(out: Path, prompts: list[Prompt], n: int = 2) -> Path:
    generate(FlatAdapter(), prompts, out, n_images=n, guidance_scale=1.0, num_steps=1, model_info={"adapter": "flat"})
    return out


def item(cls: str, **kw) -> dict:
    return {"class": cls, "count": 1, **kw}


# --------------------------------------------------------------------------- unverified


def test_colour_only_scorer_leaves_shape_and_texture_out_of_overall(tmp_path):
    prompts = [
        Prompt(0, "a photo of a blue bench", "colors", [item("bench", color="blue")]),
        Prompt(1, "a photo of a red car", "colors", [item("car", color="red")]),
        Prompt(2, "a photo of a round clock", "shape", [item("clock", attribute="round")]),
        Prompt(3, "a photo of a wooden chair", "texture", [item("chair", attribute="wooden")]),
    ]
    res = score_run(make_run(tmp_path / "run", prompts), PaletteScorer(), n_boot=50)
    assert list(res["categories"]) == ["colors"] and res["overall"]["accuracy"] == 1.0  # not 1/3
    assert res["unverified"] == {"shape": {"n_prompts": 1, "n_images": 2}, "texture": {"n_prompts": 1, "n_images": 2}}
    assert res["overall"]["n_unverified"] == 4 and [p["index"] for p in res["unverified_prompts"]] == [2, 3]
    md = (tmp_path / "run" / "scores" / "palette" / "results.md").read_text()
    assert "cannot verify (not in overall)" in md and "| shape | 1 | 2 |" in md


def test_geneval_plus_plus_fields_make_the_image_unverified():
    """A blue square must not count as "a large round wooden blue hydrant"."""
    square = Image.new("RGB", (32, 32), (153, 153, 153))
    square.paste(Image.new("RGB", (16, 16), GENEVAL_PALETTE["blue"]), (8, 8))
    scorer = PaletteScorer()
    plain = Prompt(0, "a blue fire hydrant", "colors", [item("fire hydrant", color="blue")])
    assert scorer.score(square, plain) == {**scorer.score(square, plain), "correct": True, "unverified": False}
    for extra in ({"size": "large"}, {"attributes": ["round", "wooden"]}, {"region": [0, 0, 1, 1]}):
        rich = Prompt(
            0, "a large round wooden blue fire hydrant", "colors", [item("fire hydrant", color="blue", **extra)]
        )
        assert scorer.score(square, rich)["unverified"] is True, extra
    # a colour plus a different attribute: only one of them is checked
    both = Prompt(0, "a wooden blue hydrant", "colors", [item("fire hydrant", color="blue", attribute="wooden")])
    assert scorer.score(square, both)["unverified"] is True
    # counts, positions and exclusions, for the model's own judge too
    vqa = VQAScorer(adapter=None, encoder=None)
    vqa.p_yes = lambda semantic, questions: [0.9] * len(questions)
    vqa.encode = lambda image: None
    two = Prompt(0, "two cups", "counting", [item("cup", count=2)])
    left = Prompt(0, "a cup left of a dog", "position", [item("cup", position=["left of", 1]), item("dog")])
    nothing_else = Prompt(0, "one cup", "counting", [item("cup")], [{"class": "cup", "count": 2}])
    for p in (two, left, nothing_else):
        assert vqa.score(square, p)["unverified"] is True
        assert scorer.score(square, p)["unverified"] is True


def test_aggregate_excludes_unverified_images_within_a_category():
    rows = [
        {"index": 0, "tag": "a", "prompt": "p0", "correct": True, "unverified": False},
        {"index": 0, "tag": "a", "prompt": "p0", "correct": False, "unverified": True},
        {"index": 1, "tag": "a", "prompt": "p1", "correct": False, "unverified": True},
        {"index": 2, "tag": "b", "prompt": "p2", "correct": False, "unverified": False},
    ]
    res = aggregate(rows, n_boot=20)
    assert res["categories"]["a"] == {**res["categories"]["a"], "accuracy": 1.0, "n_images": 1, "n_unverified": 2}
    assert res["overall"]["accuracy"] == 0.5 and res["unverified"] == {}
    with pytest.raises(EvalError, match="could verify none of the 2 images"):
        aggregate([r for r in rows if r["unverified"]], n_boot=20)


# --------------------------------------------------------------------------- prompt files


@pytest.mark.parametrize(
    "line, message",
    [
        ({"tag": "colors", "prompt": "a cat"}, "field 'include' is missing"),
        ({"tag": "colors", "prompt": "a cat", "include": []}, "field 'include' is empty"),
        ({"prompt": "a cat", "include": [item("cat")]}, "field 'tag' must be a non-empty string"),
        ({"tag": "c", "prompt": "a cat", "include": [item("cat", count=0)]}, r"include\[0\].count must be a positive"),
        ({"tag": "c", "prompt": "a cat", "include": [item("cat", count=1.5)]}, "positive integer, got 1.5"),
        ({"tag": "c", "prompt": "a cat", "include": [item("cat", count=True)]}, "positive integer, got True"),
        (
            {"tag": "position", "prompt": "a", "include": [item("cat", position=["left of", 3]), item("dog")]},
            r"include\[0\].position refers to include\[3\]",
        ),
        ({"tag": "position", "prompt": "a", "include": [item("cat", position=["left of", 0])]}, "not another item"),
        (
            {"tag": "position", "prompt": "a", "include": [item("cat", position="left")]},
            "must be \\[relation, index\\]",
        ),
    ],
)
def test_bad_prompt_lines_fail_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    good = {"tag": "colors", "prompt": "a red car", "include": [item("car", color="red")]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(EvalError, match=message) as e:
        load_geneval(path)
    assert str(e.value).startswith(f"{path}:2:")


def test_prompt_files_split_on_newline_only_and_must_be_utf8(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    text = "a red car\u2028parked"  # U+2028 is valid inside a JSON string (json.dumps keeps it with ensure_ascii=False)
    line = json.dumps({"tag": "colors", "prompt": text, "include": [item("car", color="red")]}, ensure_ascii=False)
    path.write_text(line + "\r\n", encoding="utf-8")
    assert [p.prompt for p in load_geneval(path)] == [text]
    path.write_bytes(line.replace(text, "un caf\xe9").encode("latin-1") + b"\n")
    assert eval_main(["prompts", "--prompts", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}: not UTF-8 text" in err[0]


# --------------------------------------------------------------------------- the layout


COLOUR_PROMPTS = [
    Prompt(0, "a photo of a blue bench", "colors", [item("bench", color="blue")]),
    Prompt(1, "a photo of a red car", "colors", [item("car", color="red")]),
]


def test_only_the_layout_images_are_scored(tmp_path):
    run = make_run(tmp_path / "run", COLOUR_PROMPTS, n=2)
    samples = run / "00000" / "samples"
    red = Image.new("RGB", (32, 32), GENEVAL_PALETTE["red"])  # would be wrong for "a blue bench"
    red.save(samples / "0000 (copy).png")
    red.save(samples / "0002.png")  # beyond the manifest's n_images
    res = score_run(run, PaletteScorer(), n_boot=20)
    assert res["overall"]["n_images"] == 4 and res["overall"]["accuracy"] == 1.0
    assert res["ignored_files"] == ["00000/samples/0000 (copy).png", "00000/samples/0002.png"]
    # a folder written by another tool: contiguous from 0000, nothing after a gap
    (run / "manifest.json").unlink()
    (samples / "0002.png").rename(samples / "0005.png")
    assert [p.name for p in load_run(run)[0].images] == ["0000.png", "0001.png"]


def test_stray_prompt_folder_or_relabelled_metadata_is_an_error(tmp_path):
    run = make_run(tmp_path / "run", COLOUR_PROMPTS)
    shutil.copytree(run / "00001", run / "00007")
    with pytest.raises(EvalError, match="prompt folder\\(s\\) 00007 are not in the prompt set"):
        load_run(run)
    shutil.rmtree(run / "00007")
    meta = run / "00001" / "metadata.jsonl"
    line = json.loads(meta.read_text())
    meta.write_text(json.dumps({**line, "prompt": "a photo of a blue car", "include": [item("car", color="blue")]}))
    with pytest.raises(EvalError, match="differ from those the manifest recorded"):
        load_run(run)
