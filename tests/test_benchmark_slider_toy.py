"""benchmarks/slider_toy.py's reference for the centroid goal: a perfect slider's drift, from geometry alone."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from lorakit_ext.toy.shapes import ShapeSpec, render


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "slider_toy.py"
    spec = importlib.util.spec_from_file_location("slider_toy_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_perfect_slider_drifts_only_where_the_grown_shape_meets_the_border(bench):
    centered, _ = render(ShapeSpec("square", "blue", "white", 0.25, (32.0, 32.0)))
    assert bench.ideal_centroid_drift(centered) == 0.0
    # 24 px wide, spanning x 14..38 and y 0..24: grown 1.6x it is 38.4 px wide (half 19.2), which fits around x = 26
    # but not around y = 12, so the center must move down to y = 19.2: 7.2 px
    corner, _ = render(ShapeSpec("square", "blue", "white", 0.375, (26.0, 12.0)))
    assert bench.ideal_centroid_drift(corner) == pytest.approx(7.2, abs=0.6)
    assert bench.ideal_centroid_drift(np.full((64, 64, 3), 245, dtype=np.uint8)) is None
