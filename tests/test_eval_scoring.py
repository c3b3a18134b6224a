"""Scorers: golden tests of the pure maths on hand-made inputs and synthetic images, the VQA scorer
against a stand-in adapter whose log-probabilities we set, and ClipScorer end to end on a tiny
random open_clip model (structure and determinism; a random model has no accuracy to test)."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from eval.prompts import COLORS, EvalError, Prompt
from eval.scorers import (
    GENEVAL_PALETTE,
    ClipScorer,
    PaletteScorer,
    Scorer,
    VQAScorer,
    argmax_label,
    average_template_embeddings,
    build_scorer,
    foreground_mask,
    load_scorer,
    p_yes_from_logprobs,
    palette_colour,
    palette_votes,
    questions_for,
    softmax,
    zero_shot_logits,
)

YELLOW = (250, 220, 30)
close = partial(math.isclose, abs_tol=1e-6)  # log-probabilities pass through float32


def disc_image(
    size: int = 64, centre: tuple[int, int] = (30, 34), radius: int = 12, colour=YELLOW, background=(153, 153, 153)
) -> tuple[Image.Image, np.ndarray]:
    """A flat disc on a flat background, and its exact mask."""
    im = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(im).ellipse(
        [centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius], fill=colour
    )
    yy, xx = np.mgrid[:size, :size]
    truth = (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= radius**2
    return im, truth


def prompt(colour: str = "yellow", obj: str = "broccoli", tag: str = "color_rare", **item) -> Prompt:
    return Prompt(
        index=0,
        prompt=f"a photo of a {colour} {obj}",
        tag=tag,
        include=[{"class": obj, "count": 1, "color": colour, **item}],
    )


# --------------------------------------------------------------------------- palette and mask


def test_palette_colour_of_a_yellow_disc_on_gray():
    im, _ = disc_image(radius=10)
    mask = foreground_mask(im)
    assert palette_colour(im, GENEVAL_PALETTE, mask) == "yellow"
    # Without the mask the #999 background dominates and is nearest to pink: the mask is what works.
    assert palette_colour(im, GENEVAL_PALETTE, None) == "pink"
    votes = palette_votes(im, GENEVAL_PALETTE, mask)
    assert votes["yellow"] > 0.95 and math.isclose(sum(votes.values()), 1.0)


def test_foreground_mask_finds_the_disc():
    for bg, colour in [((153, 153, 153), YELLOW), ((10, 12, 8), (40, 160, 40)), ((240, 240, 240), (30, 60, 230))]:
        im, truth = disc_image(colour=colour, background=bg)
        mask = foreground_mask(im)
        iou = (mask & truth).sum() / (mask | truth).sum()
        assert iou > 0.9, (bg, iou)


def test_foreground_mask_tolerates_background_noise():
    im, truth = disc_image(background=(20, 20, 20))
    rng = np.random.default_rng(0)
    noisy = np.clip(np.asarray(im, dtype=float) + rng.normal(0, 5, (64, 64, 3)), 0, 255).astype(np.uint8)
    mask = foreground_mask(Image.fromarray(noisy))
    assert (mask & truth).sum() / (mask | truth).sum() > 0.9


def test_palette_ties_go_to_the_earlier_entry_and_empty_mask_falls_back():
    im = Image.new("RGB", (2, 1))
    im.putpixel((0, 0), (255, 0, 0))
    im.putpixel((1, 0), (0, 0, 255))
    assert palette_colour(im, {"blue": (0, 0, 255), "red": (255, 0, 0)}) == "blue"
    assert palette_colour(im, {"red": (255, 0, 0), "blue": (0, 0, 255)}) == "red"
    assert palette_colour(im, {"red": (255, 0, 0), "blue": (0, 0, 255)}, np.zeros((1, 2), bool)) == "red"


def test_palette_scorer_single_and_two_object_prompts():
    im, _ = disc_image()
    scorer = PaletteScorer()
    assert scorer.score(im, prompt("yellow"))["correct"] is True
    assert scorer.score(im, prompt("green"))["correct"] is False
    two = Image.new("RGB", (64, 32), (153, 153, 153))
    draw = ImageDraw.Draw(two)
    draw.ellipse([4, 4, 28, 28], fill=GENEVAL_PALETTE["yellow"])
    draw.ellipse([36, 4, 60, 28], fill=GENEVAL_PALETTE["green"])
    p2 = Prompt(
        0,
        "a photo of a yellow broccoli and a green banana",
        "color_attr",
        [{"class": "broccoli", "count": 1, "color": "yellow"}, {"class": "banana", "count": 1, "color": "green"}],
    )
    assert scorer.score(two, p2)["correct"] is True
    p2.include[1]["color"] = "blue"
    assert scorer.score(two, p2)["correct"] is False


# --------------------------------------------------------------------------- CLIP maths


def test_template_averaging_normalises_then_averages():
    emb = torch.tensor(
        [
            [[2.0, 0.0], [0.0, 5.0]],  # class 0: two templates of different norms
            [[1.0, 0.0], [1.0, 0.0]],
        ]
    )  # class 1: identical templates
    avg = average_template_embeddings(emb)
    assert torch.allclose(avg[0], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    assert torch.allclose(avg[1], torch.tensor([1.0, 0.0]))
    assert torch.allclose(avg.norm(dim=-1), torch.ones(2))


def test_colour_argmax_from_hand_made_similarities():
    # one axis per colour; the image leans to yellow, then green
    classes = torch.eye(len(COLORS))
    image = torch.zeros(len(COLORS))
    image[COLORS.index("yellow")], image[COLORS.index("green")] = 0.8, 0.6
    logits = zero_shot_logits(image, classes, scale=100.0)
    assert torch.allclose(logits[COLORS.index("yellow")], torch.tensor(80.0))
    assert argmax_label(logits.tolist(), list(COLORS)) == "yellow"
    probs = softmax(logits.tolist())
    assert probs[COLORS.index("yellow")] > 0.99 and math.isclose(sum(probs), 1.0)
    # ties resolve to GenEval's colour order, whatever the magnitudes' float noise
    assert argmax_label([1.0, 3.0, 3.0], ["red", "orange", "yellow"]) == "orange"
    with pytest.raises(ValueError):
        argmax_label([1.0], ["red", "blue"])


# --------------------------------------------------------------------------- VQA


class StandInAdapter:
    """answer_logprob returns exactly what the test says; records its calls."""

    def __init__(self, logprobs: dict[tuple[str, str], float]):
        self.logprobs = logprobs
        self.calls: list[tuple[tuple, list, list]] = []

    def answer_logprob(self, semantic, prompts, answers):
        self.calls.append((tuple(semantic.shape), list(prompts), list(answers)))
        return torch.tensor([self.logprobs[(q, a)] for q, a in zip(prompts, answers)])


class MeanColourEncoder:
    def encode(self, images):
        return torch.stack([torch.tensor(np.asarray(im, dtype=np.float32).mean((0, 1))) for im in images])[:, None, :]


def test_p_yes_is_a_softmax_over_yes_and_no():
    assert math.isclose(p_yes_from_logprobs(math.log(0.6), math.log(0.2)), 0.75)
    assert math.isclose(p_yes_from_logprobs(-1000.0, -1000.0), 0.5)
    assert p_yes_from_logprobs(-1.0, -50.0) > 0.999


def test_vqa_scorer_returns_p_yes_from_the_adapter():
    q = "Is this a yellow broccoli?"
    adapter = StandInAdapter({(q, "yes"): math.log(0.3), (q, "no"): math.log(0.1)})
    scorer = VQAScorer(adapter, MeanColourEncoder())
    out = scorer.score(disc_image()[0], prompt("yellow"))
    assert close(out["p_yes"], 0.75) and close(out["obj0_p_yes"], 0.75) and out["correct"] is True
    assert adapter.calls == [((2, 1, 3), [q, q], ["yes", "no"])]  # one call: the question with each answer
    adapter.logprobs = {(q, "yes"): math.log(0.1), (q, "no"): math.log(0.3)}
    out = scorer.score(disc_image()[0], prompt("yellow"))
    assert close(out["p_yes"], 0.25) and out["correct"] is False


def test_vqa_scorer_two_objects_and_free_form_prompts():
    p2 = Prompt(
        0,
        "a photo of an orange eggplant and a purple pumpkin",
        "color_attr",
        [{"class": "eggplant", "count": 1, "color": "orange"}, {"class": "pumpkin", "count": 1, "color": "purple"}],
    )
    q1, q2 = questions_for(p2)
    assert (q1, q2) == ("Is this an orange eggplant?", "Is this a purple pumpkin?")
    adapter = StandInAdapter({(q1, "yes"): 0.0, (q1, "no"): -math.log(9), (q2, "yes"): -math.log(4), (q2, "no"): 0.0})
    out = VQAScorer(adapter, MeanColourEncoder()).score(disc_image()[0], p2)
    assert close(out["obj0_p_yes"], 0.9) and close(out["obj1_p_yes"], 0.2)
    assert close(out["p_yes"], 0.18) and out["correct"] is False
    free = Prompt(0, "A small white kitchen with brown wood floor.", "color", [])
    assert questions_for(free) == ["Does this image show A small white kitchen with brown wood floor?"]


# --------------------------------------------------------------------------- CLIP end to end (tiny, random)

TINY_CLIP = dict(
    embed_dim=32,
    vision_cfg={"width": 32, "layers": 1, "patch_size": 16, "image_size": 32, "head_width": 16},
    text_cfg={"width": 32, "layers": 1, "heads": 2, "context_length": 77},
)
NAMES = ["broccoli", "banana", "carrot", "dog", "cup", "clock"]


@pytest.fixture(scope="module")
def clip_scorer() -> ClipScorer:
    torch.manual_seed(0)
    return ClipScorer.from_open_clip("ViT-B-32", None, object_names=NAMES, **TINY_CLIP)


def test_clip_scorer_structure_and_consistency(clip_scorer):
    im = disc_image()[0]
    out = clip_scorer.score(im, prompt("yellow"))
    assert {
        "obj0_present",
        "obj0_p_present",
        "obj0_color",
        "obj0_color_ok",
        "obj0_p_color",
        "unverified",
        "correct",
    } <= out.keys()
    assert isinstance(out["correct"], bool) and isinstance(out["obj0_present"], bool)
    assert 0.0 <= out["obj0_p_present"] <= 1.0 and 0.0 <= out["obj0_p_color"] <= 1.0
    assert out["obj0_color"] in COLORS and out["obj0_color_ok"] == (out["obj0_color"] == "yellow")
    assert out["correct"] == (out["obj0_present"] and out["obj0_color_ok"]) and out["unverified"] is False
    # every colour gets a probability; they sum to one, so exactly one colour is judged right
    oks = [clip_scorer.score(im, prompt(c))["obj0_color_ok"] for c in COLORS]
    assert sum(oks) == 1 and COLORS[oks.index(True)] == out["obj0_color"]


def test_clip_scorer_is_deterministic_and_rebuilds_identically(clip_scorer):
    im = disc_image()[0]
    p2 = Prompt(
        0,
        "a photo of a yellow broccoli and a green banana",
        "color_attr",
        [{"class": "broccoli", "count": 1, "color": "yellow"}, {"class": "banana", "count": 1, "color": "green"}],
    )
    first = clip_scorer.score(im, p2)
    assert {"obj1_present", "obj1_color"} <= first.keys()
    assert clip_scorer.score(im, p2) == first
    torch.manual_seed(0)
    again = ClipScorer.from_open_clip("ViT-B-32", None, object_names=NAMES, **TINY_CLIP)
    assert again.score(im, p2) == first


def test_clip_scorer_attributes_mask_and_unverifiable(clip_scorer):
    im = disc_image()[0]
    shape = Prompt(0, "a photo of a square apple", "shape", [{"class": "apple", "count": 1, "attribute": "square"}])
    out = clip_scorer.score(im, shape)
    assert "obj0_attribute" in out and out["unverified"] is False
    odd = Prompt(0, "a photo of a shiny apple", "texture", [{"class": "apple", "count": 1, "attribute": "shiny"}])
    assert clip_scorer.score(im, odd)["unverified"] is True  # no vocabulary to contrast "shiny" with
    counting = Prompt(
        0, "a photo of two cups", "counting", [{"class": "cup", "count": 2}], [{"class": "cup", "count": 3}]
    )
    assert clip_scorer.score(im, counting)["unverified"] is True
    masked = ClipScorer(
        clip_scorer.model, clip_scorer.preprocess, clip_scorer.tokenizer, object_names=NAMES, mask_background=True
    )
    out = masked.score(im, prompt("yellow"))
    assert 0.05 < out["foreground_fraction"] < 0.3 and out["obj0_color"] in COLORS
    free_form = clip_scorer.score(im, Prompt(0, "a kitchen", "color", []))  # no object named: nothing to check
    assert free_form["unverified"] is True and free_form["correct"] is False


# --------------------------------------------------------------------------- construction


class NotAScorer:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def test_load_scorer_by_import_path():
    scorer = load_scorer("eval.scorers:PaletteScorer", min_share=0.3)
    assert isinstance(scorer, Scorer) and scorer.name == "palette" and scorer.min_share == 0.3
    assert build_scorer("palette").name == "palette"
    assert build_scorer("eval.scorers:PaletteScorer").name == "palette"
    with pytest.raises(EvalError, match="no_such_module"):
        load_scorer("no_such_module:Thing")
    with pytest.raises(EvalError, match="expected 'clip', 'vqa', 'hf-vqa', 'palette' or an import path"):
        load_scorer("justaname")
    with pytest.raises(EvalError, match="without a 'name'"):
        load_scorer(f"{__name__}:NotAScorer")


# --------------------------------------------------------------------------- report statistics (pure)


def test_wilson_interval_known_values():
    from eval.stats import wilson_interval

    lo, hi = wilson_interval(5, 10)
    assert math.isclose(lo, 0.2366, abs_tol=1e-4) and math.isclose(hi, 0.7634, abs_tol=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    assert math.isclose(wilson_interval(0, 20)[1], 0.1611, abs_tol=1e-4)


def test_aggregate_overall_is_unweighted_and_bootstrap_is_over_prompts():
    from eval.report import aggregate

    def rows(index, tag, correct):
        return [{"index": index, "tag": tag, "prompt": f"p{index}", "correct": c} for c in correct]

    data = (
        rows(0, "a", [True, True, False, False])
        + rows(1, "b", [False] * 4)
        + rows(2, "b", [False] * 4)
        + rows(3, "b", [True] * 4)
    )
    res = aggregate(data, n_boot=500, seed=0)
    a, b = res["categories"]["a"], res["categories"]["b"]
    assert (a["accuracy"], b["accuracy"]) == (0.5, 1 / 3)
    assert math.isclose(res["overall"]["accuracy"], (0.5 + 1 / 3) / 2)  # not 6/16 (image-weighted)
    # one prompt in "a": resampling prompts cannot move it, although its images disagree
    assert tuple(a["ci95"]) == (0.5, 0.5) and a["wilson95"][0] < 0.5 < a["wilson95"][1]
    assert b["ci95"][0] == 0.0 and b["ci95"][1] in (2 / 3, 1.0)
    assert [p["index"] for p in res["prompts"]] == [0, 1, 2, 3] and res["prompts"][0]["n_correct"] == 2
    assert aggregate(list(reversed(data)), n_boot=500, seed=0) == res  # row order never matters
