"""benchmarks/slider_toy.py's perfect slider, the ceiling its goals are read against: geometry alone, measured by the
report's own pixel measures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from lorakit_ext.slider.report import DEFAULT_WEIGHTS, measure_pixels, run_metrics
from lorakit_ext.toy.shapes import ShapeSpec, render


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "slider_toy.py"
    spec = importlib.util.spec_from_file_location("slider_toy_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_perfect_slider_grows_the_shape_in_place_and_keeps_its_color(bench):
    base, _ = render(ShapeSpec("square", "blue", "white", 0.25, (32.0, 32.0)))
    sweep = bench.perfect_slider_sweep(base, DEFAULT_WEIGHTS)
    assert sweep.shape == (5, 64, 64, 3)
    assert np.array_equal(sweep[2], base)
    areas = [measure_pixels(image).area for image in sweep]
    # 16 px wide, 17 px in the foreground mask (its antialiased rim): 11, 13, 17, 22, 27 px at weights -1 .. 1
    assert areas == pytest.approx([(side / 64) ** 2 for side in (11, 13, 17, 22, 27)], abs=0.002)
    numbers = run_metrics(sweep, DEFAULT_WEIGHTS)
    assert numbers["rho"] == 1.0
    assert numbers["hue_drift_deg"] < 1.0
    assert numbers["centroid_drift_px"] <= 1.0  # whole-pixel placement: up to half a pixel on each axis
    assert numbers["background_change"] < 1.0


def test_a_perfect_slider_drifts_only_where_the_grown_shape_meets_the_border(bench):
    # 24 px wide, spanning x 14..38 and y 0..24: grown 1.6x it is 38 px wide (half 19), which fits around x = 26
    # but not around y = 12, so the center must move down to y = 19: 7 px
    corner, _ = render(ShapeSpec("square", "blue", "white", 0.375, (26.0, 12.0)))
    numbers = run_metrics(bench.perfect_slider_sweep(corner, DEFAULT_WEIGHTS), DEFAULT_WEIGHTS)
    assert numbers["centroid_drift_px"] == pytest.approx(7.0, abs=0.6)
    assert numbers["rho"] == 1.0
    assert bench.perfect_slider_sweep(np.full((64, 64, 3), 245, dtype=np.uint8), DEFAULT_WEIGHTS) is None


def test_centroid_drift_beyond_the_perfect_sliders_is_judged_per_base_image(bench):
    perfect = [{"prompt": "a blue square", "seed": 0, "area": [0.1, 0.2, 0.3, 0.4, 0.5], "rho": 1.0,
                "hue_drift_deg": 0.0, "centroid_drift_px": 7.0, "background_change": 0.0}]
    # the second run is the training prompt's, which is not judged
    method = {"runs": [{**perfect[0], "centroid_drift_px": 8.5}, {**perfect[0], "prompt": "a red circle"}]}
    (run,) = bench.judged_runs(method, bench.judged_runs({"runs": perfect}))
    assert not run["centroid_ok"] and run["centroid_beyond_perfect_px"] == pytest.approx(1.5)
    assert run["centroid_beyond_perfect_ok"]
    verdict = bench.goals([run])
    assert verdict["meets_goal_beyond_border"] and not verdict["meets_goal"]
    # the effect's strength beside the goals: area at the largest weight over the smallest
    assert run["growth"] == pytest.approx(5.0) and verdict["growth_median"] == pytest.approx(5.0)
    (vanished,) = bench.judged_runs({"runs": [{**perfect[0], "area": [0.0, 0.1, 0.3, 0.4, 0.5]}]})
    assert vanished["growth"] is None
