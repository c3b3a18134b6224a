"""The pseudo-unification probe: matrix-based Rényi entropy maths (eval.entropy) and the summaries,
JSON, plots and CLI over synthetic traces (eval.probe). Every expected value is constructed."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from eval.entropy import (
    conditional_entropy,
    gaussian_gram,
    median_sigma,
    renyi_entropy,
    renyi_entropy_from_gram,
    select_tokens,
)
from eval.probe import (
    Trace,
    analyse,
    compare,
    encoding_trajectory,
    main,
    plot,
    response_trajectory,
    save_json,
    summarise,
)
from eval.stats import bootstrap_ci

LOG2 = math.log(2)


def clustered(n: int, k: int, d: int = 16, sep: float = 10.0, jitter: float = 0.0, seed: int = 0) -> torch.Tensor:
    """n tokens in k equal clusters at sep·e_c (pairwise centre distance sep·√2 ≫ σ = 1): H ≈ log k."""
    g = torch.Generator().manual_seed(seed)
    z = sep * torch.eye(d, dtype=torch.float64)[torch.arange(n) % k]
    return z + jitter * torch.randn(n, d, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------- eval.entropy


@pytest.mark.parametrize("alpha", [1.01, 1.0])
@pytest.mark.parametrize("sigma", [None, 1.0])
def test_identical_tokens_have_zero_entropy(alpha, sigma):
    for z in (torch.full((12, 8), 0.1), torch.full((12, 8), 1e3) + torch.arange(8.0)):
        assert median_sigma(z) == 0.0
        assert renyi_entropy(z, alpha=alpha, sigma=sigma) == 0.0
        assert conditional_entropy(z, z[:5], alpha=alpha, sigma=sigma) == 0.0
    assert renyi_entropy_from_gram(torch.ones(12, 12), alpha) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("alpha", [1.0, 1.01, 2.0])
def test_well_separated_tokens_reach_log_n(alpha):
    z = 10.0 * torch.eye(16)  # pairwise distance 10√2, σ = 1: off-diagonal kernel e^-100
    assert renyi_entropy(z, alpha=alpha, sigma=1.0) == pytest.approx(math.log(16), abs=1e-3)
    assert renyi_entropy(z, alpha=alpha, sigma=1.0, base=2) == pytest.approx(4.0, abs=1e-3)
    assert torch.allclose(gaussian_gram(z, 1.0), torch.eye(16, dtype=torch.float64), atol=1e-40)
    assert gaussian_gram(z, 5.0)[0, 1].item() == pytest.approx(math.exp(-200 / (2 * 25)), rel=1e-12)


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_median_sigma_is_scale_free_with_closed_form(scale):
    # Equidistant tokens: σ = median distance = scale·√2, so every off-diagonal K_ij = e^-1/2 and the
    # spectrum of A is known: (1 + (n−1)c)/n once and (1 − c)/n (n−1 times). The median heuristic
    # therefore does NOT reach log n here however large the scale: it measures structure relative to
    # the typical distance.
    n, c = 16, math.exp(-0.5)
    z = scale * torch.eye(n)
    assert median_sigma(z) == pytest.approx(scale * math.sqrt(2), rel=1e-9)
    lam = np.array([(1 + (n - 1) * c) / n] + [(1 - c) / n] * (n - 1))
    assert renyi_entropy(z, alpha=1.0) == pytest.approx(-(lam * np.log(lam)).sum(), abs=1e-9)
    expected = math.log((lam**1.01).sum()) / (1 - 1.01)
    assert renyi_entropy(z) == pytest.approx(expected, abs=1e-9)


def test_repeated_tokens_are_exact_duplicates():
    # 63 copies of v and one w: most pairs are repeats (median distance 0), so σ falls back to the
    # median non-zero distance ‖v − w‖; Gram-trick round-off (~1e-14 here) must not make the copies
    # look distinct (it would set σ to noise).
    g = torch.Generator().manual_seed(0)
    v, w = 3 + torch.randn(512, generator=g, dtype=torch.float64), torch.randn(512, generator=g, dtype=torch.float64)
    z = torch.stack([v] * 63 + [w])
    assert median_sigma(z) == pytest.approx((v - w).norm().item(), rel=1e-9)
    K = torch.ones(64, 64, dtype=torch.float64)
    K[-1, :-1] = K[:-1, -1] = math.exp(-0.5)
    assert renyi_entropy(z) == pytest.approx(renyi_entropy_from_gram(K), abs=1e-9)


def test_entropy_increases_with_number_of_clusters():
    h = [renyi_entropy(clustered(64, k, jitter=1e-3), alpha=1.0, sigma=1.0) for k in (1, 2, 4, 8)]
    assert h == sorted(h) and len(set(h)) == 4
    assert h == pytest.approx([math.log(k) for k in (1, 2, 4, 8)], abs=1e-2)


def test_alpha_continuity_at_one():
    z = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    h = {a: renyi_entropy(z, alpha=a) for a in (0.99, 1.0, 1.001, 1.01)}
    assert h[0.99] > h[1.0] > h[1.001] > h[1.01]  # Rényi entropy decreases in α
    assert abs(h[1.01] - h[1.0]) < 0.01 * h[1.0]
    assert abs(h[1.001] - h[1.0]) < abs(h[1.01] - h[1.0]) / 5


@pytest.mark.parametrize("sigma", [None, 3.0])
def test_response_proxy_copy_noisy_independent(sigma):
    g = torch.Generator().manual_seed(0)
    prompt = torch.randn(32, 16, generator=g)
    copy = conditional_entropy(prompt, prompt.clone(), sigma=sigma)
    noisy = conditional_entropy(prompt, prompt + 0.3 * torch.randn(32, 16, generator=g), sigma=sigma)
    independent = conditional_entropy(prompt, 10 + torch.randn(32, 16, generator=g), sigma=sigma)
    assert abs(copy) < 1e-9
    assert copy < noisy < independent


def test_response_proxy_for_disjoint_distinct_tokens():
    # σ tiny: every token is its own cluster, H_joint = log(n_p + n_r), H_pp = log n_p.
    z = torch.randn(48, 16, generator=torch.Generator().manual_seed(1))
    assert conditional_entropy(z[:16], z[16:], alpha=1.0, sigma=0.01) == pytest.approx(math.log(3), abs=1e-9)


def test_computed_in_float64_whatever_the_input():
    # 1e-3 structure on a 1e4 offset: float32 (resolution ~1e-3 at 1e4) would erase it
    noise = 1e-3 * torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert renyi_entropy(1e4 + noise) == pytest.approx(renyi_entropy(noise), abs=1e-6)
    assert renyi_entropy(noise) > 1.0


def test_large_n_is_stable_in_float64():
    z = torch.randn(2048, 16, generator=torch.Generator().manual_seed(0))  # float32 input
    h = renyi_entropy(z)
    assert math.isfinite(h) and 0.0 <= h <= math.log(2048)
    assert h > 1.0  # 2048 random points in 16-d are far from one cluster


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_matches_float64(dtype):
    z = torch.randn(256, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    low = z.to(dtype)
    assert renyi_entropy(low) == renyi_entropy(low.double())  # computed in float64 throughout
    assert renyi_entropy(low) == pytest.approx(renyi_entropy(z), rel=1e-2)
    assert conditional_entropy(low[:128], low[128:]) == pytest.approx(conditional_entropy(z[:128], z[128:]), rel=2e-2)


def test_drop_first_removes_the_sink_token():
    z = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    z[0] = 1e4  # attention-sink-like outlier sets the median σ scale otherwise... and its own row
    assert renyi_entropy(z, drop_first=1) == renyi_entropy(z[1:])
    assert renyi_entropy(z, drop_first=1) != renyi_entropy(z)
    assert conditional_entropy(z[:20], z[20:], drop_first=1) == conditional_entropy(z[1:20], z[20:])


def test_max_tokens_subsampling_is_seeded_and_documented():
    z = torch.arange(100.0)[:, None] * torch.ones(1, 4)  # row i is i·1, so rows identify positions
    a, b = select_tokens(z, 1, 30, seed=3), select_tokens(z, 1, 30, seed=3)
    idx = a[:, 0].long()
    assert torch.equal(a, b) and len(a) == 30
    assert torch.equal(idx, idx.sort().values) and len(set(idx.tolist())) == 30 and 0 not in idx.tolist()
    assert not torch.equal(select_tokens(z, 1, 30, seed=4), a)
    assert torch.equal(select_tokens(z, 0, 500), z)
    r = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    assert renyi_entropy(r, max_tokens=64, seed=5) == renyi_entropy(r, max_tokens=64, seed=5)
    assert renyi_entropy(r, max_tokens=64, seed=5) == renyi_entropy(select_tokens(r, 0, 64, 5))
    assert renyi_entropy(r, max_tokens=64, seed=5) != renyi_entropy(r, max_tokens=64, seed=6)
    assert renyi_entropy(r, max_tokens=300) == renyi_entropy(r)


def test_bootstrap_ci_contains_mean_and_narrows():
    rng = np.random.default_rng(0)
    small, large = rng.normal(size=20), rng.normal(size=2000)
    m, lo, hi = bootstrap_ci(small)
    M, LO, HI = bootstrap_ci(large)
    assert lo < m < hi and LO < M < HI
    assert m == pytest.approx(small.mean())
    assert (HI - LO) < (hi - lo) / 5  # width ∝ 1/√n: √100 = 10
    assert bootstrap_ci(small, seed=1) == bootstrap_ci(small, seed=1) != bootstrap_ci(small, seed=2)
    assert bootstrap_ci([2.5]) == (2.5, 2.5, 2.5)
    assert all(math.isnan(x) for x in bootstrap_ci([]))


# --------------------------------------------------------------------------- eval.probe

TEXT_KS = [1, 2, 2, 4, 4, 8, 8, 16, 16]  # text prompt entropy rises with depth: H = log k per layer
IMAGE_K = 4  # image prompts flat at log 4
ENCODING_GAP = LOG2 * np.mean(np.abs(np.log2(TEXT_KS) - 2))  # = 10/9 · log 2


def synthetic(n_text: int = 6, n_image: int = 5, n: int = 16) -> tuple[list[Trace], list[Trace]]:
    enc, resp = [], []
    for j in range(n_text + n_image):
        text = j < n_text
        ks = TEXT_KS if text else [IMAGE_K] * len(TEXT_KS)
        layers = [clustered(n, k, jitter=1e-3, seed=100 * j + i) for i, k in enumerate(ks)]
        enc.append(Trace(layers, prompt_len=n, modality="text" if text else "image"))
        # response: text generation far from its prompt (new information), image generation a copy
        g = torch.Generator().manual_seed(j)
        resp.append(
            Trace(
                [
                    torch.cat(
                        [x, 100 + 10 * torch.randn(n, 16, generator=g, dtype=torch.float64) if text else x.clone()]
                    )
                    for x in layers
                ],
                prompt_len=n,
                modality=enc[-1].modality,
            )
        )
    return enc, resp


@pytest.fixture(scope="module")
def result():
    enc, resp = synthetic()
    return analyse(enc, resp, sigma=1.0, alpha=1.0)


def test_summarise_recovers_constructed_gaps(result):
    s = result["summary"]
    gap = s["encoding"]["gap"]
    assert gap["value"] == pytest.approx(ENCODING_GAP, abs=1e-3) and gap["lo"] <= gap["value"] <= gap["hi"]
    assert (gap["n_text"], gap["n_image"]) == (6, 5)
    # n = 16 tokens for every prompt: the /log n variant is the gap over log 16, one length bin holds all
    assert s["encoding"]["gap_normalised"]["value"] == pytest.approx(gap["value"] / math.log(16), rel=1e-9)
    matched = s["encoding"]["gap_length_matched"]
    assert matched["value"] == pytest.approx(gap["value"], rel=1e-12)
    assert matched["bins"] == [{"tokens": [16, 32], "text": 6, "image": 5}]
    assert s["encoding"]["final"]["text"]["value"] == pytest.approx(math.log(16), abs=1e-3)
    assert s["encoding"]["final"]["image"]["value"] == pytest.approx(math.log(4), abs=1e-3)
    assert s["response"]["gap"]["lo"] > 0.1  # text generation above image generation
    assert abs(s["response"]["final"]["image"]["value"]) < 1e-6  # a copy adds nothing
    curve = result["encoding"]["modalities"]["text"]
    assert curve["depth"][0] == 0.0 and curve["depth"][-1] == 1.0 and len(curve["mean"]) == 9
    assert curve["mean"] == pytest.approx([math.log(k) for k in TEXT_KS], abs=1e-3)
    assert curve["mean_normalised"] == pytest.approx([math.log(k) / math.log(16) for k in TEXT_KS], abs=1e-3)


def test_normalised_curves_do_not_depend_on_log_base():
    enc, _ = synthetic(2, 2)
    e, b = (encoding_trajectory(enc, sigma=1.0, base=base)["modalities"]["text"] for base in (math.e, 2))
    assert b["mean"] == pytest.approx([x / LOG2 for x in e["mean"]], rel=1e-12)
    assert b["mean_normalised"] == pytest.approx(e["mean_normalised"], rel=1e-12)


def test_gap_interpolates_different_depths_and_matches_lengths():
    text = [
        Trace([clustered(8, k) for k in (1, 1, 4)], 8, "text") for _ in range(3)
    ]  # H = 0, 0, log 4 at depth 0, .5, 1
    image = [Trace([clustered(8, 1) for _ in range(5)], 8, "image") for _ in range(3)]  # flat 0 at depth 0, .25, ... 1
    s = summarise(encoding_trajectory(text + image, sigma=1.0, alpha=1.0), None)
    # text linearly interpolated onto the 5-point grid: log2 · (0, 0, 0, 1, 2), mean 0.6 log 2
    assert s["encoding"]["gap"]["value"] == pytest.approx(0.6 * LOG2, abs=1e-9)
    assert s["response"] is None
    # length-matched: only the 16-token bin holds both modalities, so short text prompts are ignored
    short = [Trace([clustered(4, 4) for _ in range(3)], 4, "text") for _ in range(4)]
    long_ = [Trace([clustered(16, k) for k in (2, 4, 8)], 16, "text") for _ in range(2)]
    flat = [Trace([clustered(16, 2) for _ in range(3)], 16, "image") for _ in range(2)]
    m = summarise(encoding_trajectory(short + long_ + flat, sigma=1.0, alpha=1.0), None)["encoding"][
        "gap_length_matched"
    ]
    assert m["bins"] == [{"tokens": [16, 32], "text": 2, "image": 2}]
    assert m["value"] == pytest.approx(LOG2, abs=1e-6)  # |(log2, log4, log8) − log2| averaged


def test_json_plot_compare_and_cli(result, tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    save_json(result, a)
    assert json.loads(a.read_text()) == result
    other = analyse(*synthetic(4, 4), sigma=1.0, alpha=1.0)
    save_json(other, b)
    png = tmp_path / "plots" / "probe.png"
    plot({"before": result, "after": other}, png)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 600
        im.verify()
    table = compare({"before": result, "after": other})
    assert "| metric | before | after |" in table and "encoding gap" in table and "Warning" not in table
    assert "Warning" in compare({"before": result, "after": analyse(*synthetic(2, 2), alpha=1.0)})
    out = tmp_path / "cli.png"
    assert (
        main(["plot", "--inputs", f"before={a}", f"after={b}", "--out", str(out), "--md", str(tmp_path / "t.md")]) == 0
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "t.md").read_text() == capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.json",
        "b.json",
        "cli.png",
        "plots",
        "t.md",
    ]  # no temp files


def test_trace_validation():
    z = [torch.randn(6, 4)]
    with pytest.raises(ValueError, match="modality"):
        encoding_trajectory([Trace(z, 3, "audio")])
    with pytest.raises(ValueError, match="response token"):
        response_trajectory([Trace(z, 6, "text")])
    with pytest.raises(ValueError, match="prompt token"):
        encoding_trajectory([Trace(z, 0, "image")])
    with pytest.raises(TypeError, match="unknown entropy option"):
        encoding_trajectory([Trace(z, 3, "text")], sigmaa=1.0)
