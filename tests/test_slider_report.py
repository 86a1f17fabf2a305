"""Slider metrics on rendered toy images (known answers), the difference merge step, rank shuffling, NaN files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lorakit_ext.errors import LorakitError
from lorakit_ext.formats.safetensors_io import save_tensors_atomic
from lorakit_ext.networks.weights import LORA_DOWN, LORA_UP, ModuleWeights, NetworkWeights
from lorakit_ext.slider.methods import difference_weights, shuffled_ranks
from lorakit_ext.slider.report import (
    SweepSettings,
    hue_distance,
    measure_pixels,
    report_paths,
    run_metrics,
    slider_report,
    sweep_grid,
    sweep_metrics,
)
from lorakit_ext.toy.shapes import ShapeSpec, render, with_extent

WEIGHTS = (-1.0, -0.5, 0.0, 0.5, 1.0)
SPEC = ShapeSpec("square", "blue", "white", 0.4, (30.0, 34.0))


def _growing(spec: ShapeSpec, extents=tuple(np.sqrt([0.08, 0.12, 0.16, 0.2, 0.24]))) -> np.ndarray:
    """The shape at five sizes whose areas step evenly (a symmetric slider)."""
    return np.stack([render(with_extent(spec, e))[0] for e in extents])


def test_measures_of_a_rendered_shape():
    image, mask = render(SPEC)
    measure = measure_pixels(image)
    assert measure.area == pytest.approx(float((mask > 0.5).mean()), abs=0.01)
    assert measure.centroid == pytest.approx((29.5, 33.5), abs=0.3)  # pixel indices: centre 30 is index 29.5
    assert hue_distance(measure.hue, 230.0) < 1  # COLORS["blue"] = (40, 70, 220)
    assert measure_pixels(render(ShapeSpec("square", "white", "black", 0.4, (32.0, 32.0)))[0]).hue is None
    assert hue_distance(350.0, 10.0) == 20.0
    speckled = image.copy()
    speckled[60:62, 2:4] = (220, 40, 40)  # a red speck in a corner: foreground area, not part of the shape
    specked = measure_pixels(speckled)
    assert specked.area == pytest.approx(measure.area + 4 / 64**2)
    assert specked.centroid == measure.centroid and specked.hue == measure.hue


def test_a_growing_shape_is_monotonic_without_drift_and_a_colour_change_is_caught():
    growing = run_metrics(_growing(SPEC), WEIGHTS)
    assert growing["rho"] == pytest.approx(1.0)
    assert growing["hue_drift_deg"] < 2 and growing["centroid_drift_px"] < 1.0
    assert growing["background_change"] == 0.0
    images = _growing(SPEC)
    images[4] = render(with_extent(ShapeSpec("square", "green", "white", 0.4, (36.0, 34.0)), 0.56))[0]
    recoloured = run_metrics(images, WEIGHTS)
    assert recoloured["hue_drift_deg"] > 60 and recoloured["centroid_drift_px"] > 5
    assert run_metrics(_growing(SPEC)[::-1], WEIGHTS)["rho"] == pytest.approx(-1.0)


def test_a_shape_grown_over_the_border_is_measured_against_the_base_background():
    # the largest sizes cover most of the border (the last fills the frame): measured against their own border
    # color they read as background (area 0); a run measures them against the weight-0 image's background
    images = _growing(ShapeSpec("square", "blue", "white", 0.5, (32.0, 32.0)), extents=(0.3, 0.4, 0.5, 0.9, 1.0))
    assert measure_pixels(images[4]).area == 0.0
    growing = run_metrics(images, WEIGHTS)
    assert growing["area"][3:] == pytest.approx([0.81, 1.0], abs=0.03)
    assert growing["rho"] == 1.0
    # a background the LoRA tints (white to light gray) is still the background: only the shape counts
    tinted = _growing(SPEC)
    tinted[0][np.all(tinted[0] == 245, axis=-1)] = 175
    assert run_metrics(tinted, WEIGHTS)["area"][0] == pytest.approx(measure_pixels(_growing(SPEC)[0]).area, abs=0.002)


def test_sweep_summary_symmetry_and_the_no_effect_warning():
    settings = SweepSettings(weights=WEIGHTS, prompts=("", "other"), seeds=(0, 1), toy_world=True)
    growing = _growing(SPEC)
    images = np.stack([np.stack([growing, growing]), np.stack([growing, growing])])
    metrics = sweep_metrics(images, settings)
    assert metrics["summary"]["monotonic_fraction"] == 1.0 and metrics["warnings"] == []
    assert metrics["summary"]["symmetry"] == pytest.approx(1.0, abs=0.25)
    json.dumps(metrics)  # JSON-ready
    still = np.broadcast_to(growing[2], growing.shape)
    flat = sweep_metrics(np.stack([np.stack([still, still])] * 2), settings)
    assert flat["summary"]["monotonic_fraction"] == 0.0
    assert any("no visible effect" in w for w in flat["warnings"])
    picture = sweep_grid(images, settings, scale=1)
    assert picture.size[1] == 16 + 4 * 64 and picture.size[0] > 5 * 64


def _with_corner_patch(image: np.ndarray, side: int) -> np.ndarray:
    """``image`` with a blue square of ``side`` pixels near its top-left corner, away from the toy circle."""
    patched = image.copy()
    patched[2 : 2 + side, 2 : 2 + side] = (40, 70, 220)
    return patched


def test_off_toy_no_effect_is_judged_along_a_to_b_not_by_foreground_area(tmp_path):
    from lorakit_ext.slider.demo import GROWTH, TOY_A, toy_pair_set

    pair_set = toy_pair_set(tmp_path / "pairs", (TOY_A.background,))
    a_image, b_image = pair_set.pairs[0].a, pair_set.pairs[0].b
    # a sweep that grows a patch the pairs never show: much foreground change, nothing along A -> B
    elsewhere = np.stack([_with_corner_patch(a_image, side) for side in (0, 4, 8, 12, 16)])
    toward_b = np.stack([render(with_extent(TOY_A, TOY_A.extent * g))[0] for g in (0.8, 0.9, 1.0, 1.3, GROWTH)])
    for toy_world in (True, False):
        settings = SweepSettings(weights=WEIGHTS, prompts=("",), seeds=(0, 1), toy_world=toy_world)
        patch = sweep_metrics(np.stack([np.stack([elsewhere] * 2)]), settings, pair_set)
        assert patch["summary"]["area_change_at_max_weight"] == pytest.approx((16**2 - 8**2) / 64**2, abs=0.005)
        assert patch["summary"]["effect_along_ab"] == pytest.approx([0.0] * 5, abs=1e-6)
        grows = sweep_metrics(np.stack([np.stack([toward_b] * 2)]), settings, pair_set)
        assert grows["summary"]["effect_along_ab"][-1] == pytest.approx(1.0) and grows["warnings"] == []
        if toy_world:
            assert patch["warnings"] == []  # the toy world's measure: the foreground grew
        else:
            assert patch["warnings"] == [
                "the LoRA has no visible effect: the images move +0.000 / +0.000 of the way from A to B at weight -1 / 1"
            ]
    assert np.array_equal(toward_b[-1], b_image)
    # without pairs there is no direction: the mean pixel change decides
    settings = SweepSettings(weights=WEIGHTS, prompts=("",), seeds=(0,))
    assert sweep_metrics(np.stack([np.stack([elsewhere])]), settings)["warnings"] == []
    still = sweep_metrics(np.broadcast_to(a_image, (1, 1, 5, *a_image.shape)), settings)["warnings"]
    assert still == ["the LoRA has no visible effect: the mean pixel change at the ends is 0.00 of 255"]


def test_sweep_settings_need_weight_zero():
    with pytest.raises(LorakitError, match="include 0"):
        SweepSettings(weights=(-1.0, 0.5, 1.0))


def _lora(seed: int, rank: int = 2, alpha: float = 1.0) -> NetworkWeights:
    generator = torch.Generator().manual_seed(seed)

    def factors(down_shape, up_shape):
        return {LORA_DOWN: torch.randn(down_shape, generator=generator), LORA_UP: torch.randn(up_shape, generator=generator)}

    return NetworkWeights(
        {
            "lora_unet_x_proj": ModuleWeights(factors((rank, 6), (5, rank)), alpha),
            "lora_unet_y_conv": ModuleWeights(factors((rank, 3, 3, 3), (4, rank, 1, 1)), alpha),
        }
    )


def test_difference_is_exactly_b_minus_a_shuffled_or_not():
    b, a = _lora(1, rank=2, alpha=1.0), _lora(2, rank=3, alpha=3.0)
    merged = difference_weights(b, a)
    shuffled = difference_weights(b, a, shuffle=True, seed=5)
    for name in b.modules:
        expected = b.modules[name].delta() - a.modules[name].delta()
        torch.testing.assert_close(merged.modules[name].delta(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(shuffled.modules[name].delta(), expected, rtol=1e-5, atol=1e-5)
        assert merged.modules[name].rank == 5
        assert not torch.equal(shuffled.modules[name].tensors[LORA_DOWN], merged.modules[name].tensors[LORA_DOWN])
    compressed = difference_weights(b, a, rank=1)
    assert all(module.rank == 1 for module in compressed.modules.values())


def test_shuffle_refuses_loha():
    factors = {name: torch.ones(2, 2) for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    loha = NetworkWeights({"lora_unet_x": ModuleWeights(factors, 1.0)})
    with pytest.raises(LorakitError, match="plain LoRA"):
        shuffled_ranks(loha, 0)


def test_a_file_holding_nan_gets_a_warning_not_numbers(tmp_path):
    path = tmp_path / "broken.safetensors"
    save_tensors_atomic(
        path,
        {
            "lora_unet_x.lora_down.weight": torch.tensor([[float("nan"), 1.0]]),
            "lora_unet_x.lora_up.weight": torch.ones(2, 1),
            "lora_unet_x.alpha": torch.tensor(1.0),
        },
    )
    metrics = slider_report(None, path, SweepSettings())
    assert "NaN" in metrics["warnings"][0] and "summary" not in metrics
    _, json_path = report_paths(path)
    assert json.loads(json_path.read_text())["warnings"] == metrics["warnings"]


def test_one_swap_in_five_weights_is_exactly_rho_09_the_goal_line():
    from lorakit_ext.slider.report import spearman

    assert spearman([-1.0, -0.5, 0.0, 0.5, 1.0], [0.047, 0.045, 0.052, 0.0996, 0.188]) == 0.9
    assert spearman([1, 2, 3], [5, 5, 5]) == 0.0
