"""DPG-Bench scoring: yes/no answers per question → per-image, per-prompt, per-category scores.

DPG-Bench (Hu et al., ELLA, arXiv 2403.05135) asks several yes/no questions about each of its 1,065
dense prompts; each question names the questions it depends on ("Is the cat black?" depends on "Is
there a cat?"). The rules, as the official ``compute_dpg_bench.py`` applies them (DPG-Bench's, and
RecA's copy in ``Benchmark/dpgbench/``):

* a question scores 1 when the VQA model answers "yes" — here P(yes) > 0.5 — and 0 when any of its
  parent questions was answered "no" (:func:`apply_dependencies`);
* an image's score is the mean over the prompt's questions; a prompt's score the mean over its
  images; the DPG-Bench score is the mean over prompts;
* a broad category (entity, attribute, relation, global, other) is the mean over all its questions
  of the *raw* answers (the official script collects ``qid2scores_orig``, before the parent rule).

The questions travel with each prompt in ``Prompt.extra["dpg_questions"]`` (read by
:func:`eval.prompts.load_dpg_bench`), so they reach ``<run>/<index>/metadata.jsonl`` and the scorer.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from eval.prompts import EvalError, Prompt
from eval.stats import bootstrap_indices, percentile_interval, resampled_accuracy

QUESTIONS_KEY = "dpg_questions"


def dpg_questions(prompt: Prompt) -> list[dict[str, Any]] | None:
    """The prompt's DPG questions (``id``, ``question``, ``parents``, ``category``), or None."""
    return prompt.extra.get(QUESTIONS_KEY)


def apply_dependencies(answers: Mapping[int, bool], parents: Mapping[int, Sequence[int]]) -> dict[int, float]:
    """Question id → score: 1.0 for "yes", 0.0 for "no" or when any parent was answered "no"."""
    out = {}
    for qid, yes in answers.items():
        out[qid] = float(yes and all(answers[p] for p in parents.get(qid, ())))
    return out


def image_scores(questions: Sequence[Mapping[str, Any]], p_yes: Sequence[float], threshold: float = 0.5) -> dict:
    """One image's answers → ``dpg_score`` (mean after the parent rule) and, per question id,
    ``q{id}_p_yes`` and ``q{id}_yes`` (the raw answer the categories average)."""
    if len(questions) != len(p_yes):
        raise EvalError(f"DPG: {len(p_yes)} answers for {len(questions)} questions")
    answers = {int(q["id"]): p > threshold for q, p in zip(questions, p_yes)}
    scores = apply_dependencies(answers, {int(q["id"]): q["parents"] for q in questions})
    out: dict[str, Any] = {}
    for q, p in zip(questions, p_yes):
        out[f"q{q['id']}_p_yes"] = float(p)
        out[f"q{q['id']}_yes"] = answers[int(q["id"])]
    out["dpg_score"] = sum(scores.values()) / len(scores)
    return out


def aggregate(
    rows: Iterable[Mapping[str, Any]], prompts: Mapping[int, Prompt], *, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Per-image rows (``index``, ``dpg_score``, ``q{id}_yes``) → DPG-Bench's overall score (mean
    over prompts of the mean over their images) and its five broad categories (mean of the raw
    answers over all their questions), each with a 95% percentile bootstrap over prompts."""
    by_prompt: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        if "dpg_score" in r:
            by_prompt[int(r["index"])].append(r)
    if not by_prompt:
        raise EvalError("DPG: no image has a 'dpg_score'; score a run generated from a DPG-Bench .csv")
    order = sorted(by_prompt)
    prompt_score = np.array([np.mean([r["dpg_score"] for r in by_prompt[i]]) for i in order])
    categories = sorted({q["category"] for i in order for q in dpg_questions(prompts[i]) or ()})
    # per prompt and category: yes-answers averaged over its images (numerator), question count (denominator)
    yes = np.zeros((len(order), len(categories)))
    total = np.zeros((len(order), len(categories)))
    for row, i in enumerate(order):
        for q in dpg_questions(prompts[i]) or ():
            c = categories.index(q["category"])
            yes[row, c] += np.mean([float(r[f"q{q['id']}_yes"]) for r in by_prompt[i]])
            total[row, c] += 1
    idx = bootstrap_indices({"all": len(order)}, n_boot, seed)["all"]
    out_categories = {}
    for c, name in enumerate(categories):
        out_categories[name] = {
            "score": float(yes[:, c].sum() / total[:, c].sum()),
            "ci95": percentile_interval(resampled_accuracy(yes[:, c], total[:, c], idx)),
            "n_questions": int(total[:, c].sum()),
        }
    ones = np.ones(len(order))
    overall = {
        "score": float(prompt_score.mean()),
        "ci95": percentile_interval(resampled_accuracy(prompt_score, ones, idx)),
        "n_prompts": len(order),
        "n_images": sum(len(g) for g in by_prompt.values()),
        "definition": "mean over prompts of the mean over images of the question scores after the parent rule",
    }
    return {"categories": out_categories, "overall": overall, "bootstrap": {"n": n_boot, "seed": seed}}
