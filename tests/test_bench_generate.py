"""scripts/bench_generate.py compares like with like: at the smallest size, reca's generation and
its peer's (diffusers' SanaPipeline, transformers' image generate, a bare generate loop) produce
the same images and tokens. Timings are not asserted. Also: the evaluation runner writes a batch's
PNGs while the model draws the next one."""

from __future__ import annotations

import threading

import bench_generate as bench
from PIL import Image

from eval import runner
from eval.prompts import Prompt


def test_reference_adapter_matches_the_diffusers_pipeline() -> None:
    r = bench.compare_diffusers("smallest", repeats=1, batch=2, steps=3, guidance=3.0)
    assert r["max_pixel_diff"] <= 1, r
    assert r["ratio"] > 0 and r["ratio_min"] <= r["ratio"] <= r["ratio_max"]


def test_diffusers_images_differ_with_other_noise() -> None:
    """The pixel check can fail: other seeds give other pixels through the same pipeline."""
    from reca.adapter import Condition

    adapter = bench.metaquery("smallest")
    pipe = bench.sana_pipeline(adapter)
    cond = Condition(texts=["a red cube"])
    ours = adapter.generate(cond, seeds=[1], guidance_scale=3.0, num_steps=2)
    assert bench.max_pixel_diff(ours, bench.diffusers_images(pipe, adapter, cond, [1], 3.0, 2)) <= 1
    assert bench.max_pixel_diff(ours, bench.diffusers_images(pipe, adapter, cond, [2], 3.0, 2)) > 1


def test_janus_sampler_matches_transformers_generate() -> None:
    r = bench.compare_transformers("smallest", repeats=1, prompts=2)
    assert r["tokens_equal"], r
    assert r["image_tokens_per_image"] == 16


def test_eval_runner_matches_a_bare_generate_loop() -> None:
    r = bench.compare_runner("smallest", repeats=1, n_prompts=2, n_images=2, batch_size=3, steps=2)
    assert r["overhead_in_call_min"] <= r["overhead_in_call"] <= r["overhead_in_call_max"]
    assert r["max_pixel_diff"] == 0, r
    assert r["images"] == 4


class _Blank:
    """Draws blank images; its second call notes whether a PNG of the first batch is being saved."""

    resolution = 8

    def __init__(self, saving: threading.Event, release: threading.Event, in_flight: list[int]) -> None:
        self.calls, self.saving, self.release, self.in_flight = 0, saving, release, in_flight
        self.overlapped = False

    def generate(self, cond, *, seeds, guidance_scale, num_steps):
        self.calls += 1
        if self.calls == 2:
            self.saving.wait(timeout=5)
            self.overlapped = self.in_flight[0] > 0
            self.release.set()
        return [Image.new("RGB", (8, 8), (s % 256, 0, 0)) for s in seeds]


def test_runner_saves_a_batch_while_the_next_is_drawn(tmp_path, monkeypatch) -> None:
    saving, release, in_flight = threading.Event(), threading.Event(), [0]
    real_save = runner.save_png

    def slow_save(path, image):
        in_flight[0] += 1
        saving.set()
        release.wait(timeout=2)  # held until the second batch is being drawn (or 2 s if never)
        real_save(path, image)
        in_flight[0] -= 1

    monkeypatch.setattr(runner, "save_png", slow_save)
    adapter = _Blank(saving, release, in_flight)
    prompts = [Prompt(index=i, prompt=f"p{i}", tag="single_object") for i in range(2)]
    stats = runner.generate(
        adapter, prompts, tmp_path, n_images=2, guidance_scale=1.0, num_steps=1, batch_size=2, model_info={}
    )
    assert adapter.overlapped, "the first batch was not being saved while the second was drawn"
    assert stats.written == 4 and all(runner.is_valid_image(p) for p in stats.paths)
