"""DPG-Bench prompts and the transformers VQA scorer: the loader, the parent rule, per-image then
per-prompt means, categories, a tiny random BLIP loaded by path, and the CLI end to end."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from eval.cli import main as eval_main
from eval.dpg import aggregate, apply_dependencies, image_scores
from eval.prompts import EvalError, Prompt, load_dpg_bench, load_prompts
from eval.report import score_run
from eval.runner import generate, load_run
from eval.scorers import HFVQAScorer, vqa_checks

from conftest import ROOT, TINY

FIXTURE = ROOT / "tests" / "data" / "dpg_bench_fixture.csv"
VOCAB = "[PAD] [UNK] [CLS] [SEP] [MASK] [DEC] yes no is are there a the cat mat red on dog it night birds two sign ?"


def test_loader_groups_questions_with_their_parents() -> None:
    prompts = load_prompts(FIXTURE)
    assert [p.extra["item_id"] for p in prompts] == ["cat", "dog", "birds"]
    assert prompts[0].prompt == "A red cat sits on a blue mat, in the sun." and prompts[0].tag == "dpg"
    qs = prompts[0].extra["dpg_questions"]
    assert [(q["id"], q["parents"], q["category"]) for q in qs] == [
        (1, [], "entity"),
        (2, [], "entity"),
        (3, [1], "attribute"),
        (4, [1, 2], "relation"),
    ]
    # the prompt round-trips through a run's metadata.jsonl
    assert Prompt.from_geneval(0, prompts[0].to_geneval(), "x").extra == prompts[0].extra


def test_loader_rejects_a_parent_that_does_not_exist(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    lines = FIXTURE.read_text().splitlines()
    bad.write_text("\n".join(lines[:3] + [lines[3].replace(",3,1,", ",3,7,")]) + "\n")
    with pytest.raises(EvalError, match=r"question 3 depends on unknown id\(s\) \[7\]"):
        load_dpg_bench(bad)
    bad.write_text(lines[0].replace("dependency,", "") + "\n")
    with pytest.raises(EvalError, match="missing DPG-Bench column"):
        load_dpg_bench(bad)


def test_a_child_scores_zero_when_a_parent_is_no() -> None:
    assert apply_dependencies({1: True, 2: False, 3: True, 4: True}, {3: [1], 4: [1, 2]}) == {
        1: 1.0,
        2: 0.0,
        3: 1.0,
        4: 0.0,
    }
    qs = load_prompts(FIXTURE)[0].extra["dpg_questions"]
    out = image_scores(qs, [0.9, 0.2, 0.7, 0.8])  # mat absent → "on the mat" scores 0
    assert out["dpg_score"] == 0.5 and out["q4_yes"] is True and out["q2_p_yes"] == 0.2


# per prompt index, one list of P(yes) per image, in question order
SCRIPT = {
    0: [[0.9, 0.1, 0.9, 0.9], [0.1, 0.9, 0.9, 0.9]],  # image scores 2/4 and 1/4
    1: [[0.9, 0.9, 0.9], [0.9, 0.9, 0.9]],  # 1 and 1
    2: [[0.1, 0.9, 0.9], [0.1, 0.9, 0.9]],  # 1/3 and 1/3 (two birds, but no birds)
}


class ScriptedVQA:
    """Answers from SCRIPT, the n-th call for a prompt being its n-th image (runs score in order)."""

    name = "scripted"

    def __init__(self) -> None:
        self.calls: dict[int, int] = defaultdict(int)

    def score(self, image: Image.Image, prompt: Prompt):
        answers = SCRIPT[prompt.index][self.calls[prompt.index]]
        self.calls[prompt.index] += 1
        return vqa_checks(prompt, lambda qs: answers[: len(qs)], template="{phrase}")


class Gray:
    resolution = 16

    def generate(self, cond, seeds, guidance_scale, num_steps):
        return [Image.new("RGB", (16, 16), (120, 120, 120)) for _ in cond.texts]


def test_per_image_then_per_prompt_means_and_categories(tmp_path: Path) -> None:
    prompts = load_prompts(FIXTURE)
    generate(Gray(), prompts, tmp_path / "run", n_images=2, guidance_scale=1.0, num_steps=1, model_info={})
    res = score_run(tmp_path / "run", ScriptedVQA(), n_boot=200)
    d = res["dpg"]
    assert d["overall"]["score"] == pytest.approx((0.375 + 1.0 + 1 / 3) / 3)
    assert d["overall"]["n_prompts"] == 3 and d["overall"]["n_images"] == 6
    scores = {k: c["score"] for k, c in d["categories"].items()}
    # categories average the raw answers (the relation "yes" counts although its parent mat was "no")
    assert scores == pytest.approx({"attribute": 1.0, "entity": 0.5, "global": 1.0, "other": 1.0, "relation": 1.0})
    assert d["categories"]["entity"]["n_questions"] == 4  # questions, not question-image pairs
    lo, hi = d["overall"]["ci95"]
    assert lo <= d["overall"]["score"] <= hi and 0 <= lo and hi <= 1
    assert res["categories"]["dpg"]["n_correct"] == 2  # both dog images answer every question yes
    assert "## DPG-Bench" in (tmp_path / "run" / "scores" / "scripted" / "results.md").read_text()
    rows = [json.loads(line) for line in (tmp_path / "run/scores/scripted/scores.jsonl").open()]
    again = aggregate(rows, {p.index: p for p in prompts}, n_boot=200)
    assert json.loads(json.dumps(again)) == d  # the rows on disk reproduce the results


# --------------------------------------------------------------------------- a tiny random BLIP


def tiny_blip(path: Path) -> Path:
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    path.mkdir(parents=True, exist_ok=True)
    words = VOCAB.split()
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(path / "vocab.txt"))
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(words),
            hidden_size=32,
            encoder_hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=64,
            pad_token_id=words.index("[PAD]"),
            bos_token_id=words.index("[DEC]"),
            sep_token_id=words.index("[SEP]"),
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
    )
    torch.manual_seed(0)
    BlipForQuestionAnswering(config).save_pretrained(path)
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> Path:
    return tiny_blip(tmp_path_factory.mktemp("blip") / "blip")


def test_tiny_blip_loads_by_path_and_answers_probabilities(blip_dir: Path) -> None:
    scorer = HFVQAScorer.from_pretrained(str(blip_dir))
    image = Image.new("RGB", (40, 24), (200, 30, 30))
    questions = ["is there a cat ?", "is the cat red ?", "are there two birds ?"]
    p = scorer.p_yes(image, questions)
    assert len(p) == 3 and all(0.0 <= v <= 1.0 for v in p)
    assert scorer.p_yes(image, questions) == p  # deterministic
    assert scorer.p_yes(image, questions[1:2]) == pytest.approx(p[1:2], abs=1e-5)  # padding changes nothing
    assert len(set(p)) > 1  # the question matters
    out = scorer.score(image, load_prompts(FIXTURE)[0])
    assert set(out) >= {"dpg_score", "q1_p_yes", "q4_yes", "correct"}
    t2i = load_prompts("t2i-compbench")[0]  # "a green bench and a blue bowl": one question per object
    out = scorer.score(image, t2i)
    assert out["p_yes"] == pytest.approx(out["obj0_p_yes"] * out["obj1_p_yes"]) and "dpg_score" not in out


def test_cli_generates_and_scores_dpg_prompts_with_the_tiny_blip(toy_data, blip_dir: Path, tmp_path: Path, capsys):
    data = [f"objectives.{k}.data.path={toy_data}" for k in ("recon", "t2i", "i2t")]
    run = tmp_path / "run"
    common = ["--prompts", str(FIXTURE), "--n", "2", "--steps", "1", "--device", "cpu"]
    assert eval_main(["generate", "--config", str(TINY), "--out", str(run), *common, *data]) == 0
    assert [rp.prompt.extra["item_id"] for rp in load_run(run)] == ["cat", "dog", "birds"]
    argv = ["score", "--run", str(run), "--scorer", "hf-vqa", "--vqa-model", str(blip_dir), "--bootstrap", "50"]
    assert eval_main([*argv, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    res = json.loads((run / "scores" / "hf-vqa" / "results.json").read_text())
    assert set(res["dpg"]["categories"]) == {"entity", "attribute", "relation", "global", "other"}
    assert 0.0 <= res["dpg"]["overall"]["score"] <= 1.0 and "dpg overall" in printed
    rows = [json.loads(line) for line in (run / "scores" / "hf-vqa" / "scores.jsonl").open()]
    assert len(rows) == 6 and all(0.0 <= r["q1_p_yes"] <= 1.0 for r in rows)


def test_an_uncached_hub_id_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    generate(Gray(), load_prompts(FIXTURE)[:1], run, n_images=1, guidance_scale=1.0, num_steps=1, model_info={})
    argv = [
        "score",
        "--run",
        str(run),
        "--scorer",
        "hf-vqa",
        "--vqa-model",
        "reca-test/no-such-blip",
        "--device",
        "cpu",
    ]
    assert eval_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--vqa-model reca-test/no-such-blip" in err and "--vqa-model DIR" in err
    assert eval_main(["score", "--run", str(run), "--scorer", "hf-vqa"]) == 2
