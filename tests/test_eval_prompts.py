"""Prompt sets: GenEval / T2I-CompBench loaders on the real benchmark copies, the builtin
attribute-binding set, schema tolerance and one-line errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from eval.prompts import (
    COLORS,
    EvalError,
    Prompt,
    load_builtin,
    load_geneval,
    load_object_names,
    load_prompts,
    load_t2i_compbench,
    parse_attribute_phrases,
    prompts_digest,
)

BENCH = Path(__file__).resolve().parents[1] / "eval" / "data"  # the benchmarks' own prompt files, shipped


def test_geneval_metadata_parses_into_six_tags():
    prompts = load_geneval(BENCH / "geneval" / "evaluation_metadata.jsonl")
    assert Counter(p.tag for p in prompts) == {
        "single_object": 80,
        "two_object": 99,
        "counting": 80,
        "colors": 94,
        "position": 100,
        "color_attr": 100,
    }
    assert len(prompts) == 553 and [p.index for p in prompts] == list(range(553))
    first = prompts[0]
    assert (first.prompt, first.include) == ("a photo of a bench", [{"class": "bench", "count": 1}])
    assert any("position" in item for p in prompts if p.tag == "position" for item in p.include)
    assert all(p.exclude for p in prompts if p.tag == "counting")
    # the GenEval line round-trips (this is what <index>/metadata.jsonl holds)
    raw = (BENCH / "geneval" / "evaluation_metadata.jsonl").read_text().splitlines()
    assert all(json.loads(raw[p.index]) == p.to_geneval() for p in prompts)


def test_t2i_compbench_files_parse():
    folder = BENCH / "t2i_compbench"
    prompts = load_t2i_compbench(folder)
    for cat in ("color", "shape", "texture"):
        lines = [ln for ln in (folder / f"{cat}_val.txt").read_text().splitlines() if ln.strip()]
        mine = [p for p in prompts if p.tag == cat]
        assert len(mine) == len(lines) == 300
        assert [p.prompt for p in mine] == [ln.strip() for ln in lines]
    assert all(p.prompt.strip() for p in prompts)
    # indices run on in the order of `categories`, never directory listing order
    assert [p.index for p in prompts] == list(range(900))
    reordered = load_t2i_compbench(folder, categories=("texture", "color"))
    assert [p.tag for p in reordered[:1] + reordered[-1:]] == ["texture", "color"]
    single = load_t2i_compbench(folder / "shape_val.txt")
    assert {p.tag for p in single} == {"shape"} and len(single) == 300


def test_t2i_compbench_blank_lines_and_attribute_parsing(tmp_path):
    f = tmp_path / "color_val.txt"
    f.write_text(
        "a green bench and a blue bowl\n\n   \nA small white kitchen with brown wood floor.\na gray cat and a black "
        "mouse"
    )
    prompts = load_t2i_compbench(f)
    assert [p.prompt for p in prompts] == [
        "a green bench and a blue bowl",
        "A small white kitchen with brown wood floor.",
        "a gray cat and a black mouse",
    ]
    assert prompts[0].include == [
        {"class": "bench", "count": 1, "attribute": "green", "color": "green"},
        {"class": "bowl", "count": 1, "attribute": "blue", "color": "blue"},
    ]
    assert prompts[1].include == []  # free-form captions are not guessed at
    assert "color" not in prompts[2].include[0]  # gray is not one of GenEval's ten colours
    assert parse_attribute_phrases("an oval mirror and a rectangular painting", "shape")[0] == {
        "class": "mirror",
        "count": 1,
        "attribute": "oval",
    }


def test_geneval_file_with_unknown_fields(tmp_path):
    f = tmp_path / "variant.jsonl"
    lines = [
        {
            "tag": "colors",
            "include": [{"class": "cup", "count": 1, "color": "purple", "bbox_hint": [1, 2]}],
            "prompt": "a photo of a purple cup",
            "source_id": 17,
            "difficulty": "hard",
        },
        {"prompt": "a photo of a dog", "include": [{"class": "dog", "count": 1}], "tag": "single_object"},
    ]
    f.write_text(json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n")
    prompts = load_geneval(f)
    assert [p.index for p in prompts] == [0, 1]
    assert prompts[0].extra == {"source_id": 17, "difficulty": "hard"}
    assert prompts[0].include[0]["bbox_hint"] == [1, 2]
    assert prompts[0].to_geneval() == lines[0]


@pytest.mark.parametrize(
    "bad, needle",
    [
        ('{"tag": "x", "prompt": "a", "include": []}\n{"tag": "x", "prompt": ', "bad.jsonl:2: malformed JSON"),
        ('{"tag": "x", "include": []}', "bad.jsonl:1: field 'prompt'"),
        ('{"tag": "x", "prompt": "a", "include": [{"class": "cup", "color": "teal"}]}', "include[0].color 'teal'"),
        ('{"tag": "x", "prompt": "a", "include": {"class": "cup"}}', "field 'include' must be a list"),
    ],
)
def test_malformed_geneval_lines_name_file_and_line(tmp_path, bad, needle):
    f = tmp_path / "bad.jsonl"
    f.write_text(bad)
    with pytest.raises(EvalError) as e:
        load_geneval(f)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_builtin_set_pairs_rare_colours_with_canonical_controls():
    prompts = load_builtin()
    tags = Counter(p.tag for p in prompts)
    assert {"color_rare", "color_canonical", "shape", "texture", "color_attr"} <= set(tags)
    assert tags["color_rare"] >= 20 and tags["color_canonical"] == tags["color_rare"]
    rare = {p.include[0]["class"]: p for p in prompts if p.tag == "color_rare"}
    canon = {p.include[0]["class"]: p for p in prompts if p.tag == "color_canonical"}
    assert rare.keys() == canon.keys()
    for obj, p in rare.items():
        assert p.include[0]["color"] != canon[obj].include[0]["color"] == p.extra["canonical_color"]
    assert (
        rare["broccoli"].prompt == "a photo of a yellow broccoli" and canon["broccoli"].include[0]["color"] == "green"
    )
    for p in prompts:
        assert p.prompt.strip() and p.include
        for item in p.include:
            assert item["class"] in p.prompt
            assert item.get("color") in (None, *COLORS)
            if p.tag in ("shape", "texture"):
                assert item["attribute"] in p.prompt and "color" not in item
    attr = [p for p in prompts if p.tag == "color_attr"]
    assert attr and all(len(p.include) == 2 for p in attr)
    assert any(p.prompt == "a photo of a yellow broccoli and a green banana" for p in attr)


def test_load_prompts_dispatch(tmp_path):
    assert load_prompts("builtin") == load_builtin()
    f = tmp_path / "p.jsonl"
    f.write_text('{"tag": "t", "prompt": "a photo of a cat", "include": [{"class": "cat", "count": 1}]}\n')
    assert load_prompts(f)[0].prompt == "a photo of a cat"
    t = tmp_path / "texture_val.txt"
    t.write_text("a wooden fork and a leather sofa\n")
    assert load_prompts(t)[0].tag == "texture"
    with pytest.raises(EvalError, match="missing T2I-CompBench"):
        load_prompts(tmp_path)  # a dir without the three files
    with pytest.raises(EvalError, match="no such DPG-Bench file"):
        load_prompts(tmp_path / "prompts.csv")  # .csv is DPG-Bench's format
    with pytest.raises(EvalError, match="expected 'builtin'"):
        load_prompts(tmp_path / "prompts.parquet")


def test_digest_identifies_content_not_order():
    prompts = load_builtin()
    assert prompts_digest(prompts) == prompts_digest(list(reversed(prompts)))
    changed = [Prompt(**{**vars(p), "prompt": p.prompt + "!"}) if p.index == 3 else p for p in prompts]
    assert prompts_digest(changed) != prompts_digest(prompts)


def test_object_names_copied_from_geneval():
    names = load_object_names()
    assert len(names) == 80 and len(set(names)) == 80 and "broccoli" in names
    # every class GenEval's own metadata names is in the list (its copy ships in eval/data/geneval)
    classes = {item["class"] for p in load_prompts("geneval") for item in p.include}
    assert classes <= set(names) and len(classes) == 80
