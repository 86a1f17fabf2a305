"""``python -m lorakit_ext demo --out DIR`` (the README's main command): the copier slider on the toy world writes
the LoRA, its weight grid PNG and its metrics JSON, and says where. Shortened here; the full demo is minutes."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from lorakit_ext.cli import main
from lorakit_ext.formats.kohya import load_network
from lorakit_ext.slider.demo import TOY_PROMPTS
from lorakit_ext.slider.methods import METADATA_METHOD
from lorakit_ext.slider.report import DEFAULT_WEIGHTS

SUMMARY_KEYS = {
    "monotonic_fraction", "rho_median", "hue_drift_deg_max", "centroid_drift_px_max", "background_change_mean",
    "area_change_at_max_weight", "area_change_at_min_weight", "symmetry", "effect_along_ab",
    "collateral_outside_mask", "leakage_toward_b",
}


def test_demo_writes_the_copier_lora_its_grid_and_its_metrics(tmp_path, capsys):
    torch.set_num_threads(1)
    quick = ["--steps", "3", "--seeds", "1", "--sample-steps", "2", "--verify-seeds", "1", "--ensemble", "2"]
    assert main(["demo", "--out", str(tmp_path), *quick]) == 0
    out = capsys.readouterr().out
    lora = tmp_path / "copier_slider.safetensors"
    grid_path, metrics_path = tmp_path / "copier_slider.slider.png", tmp_path / "copier_slider.slider.json"
    for path in (lora, grid_path, metrics_path):
        assert str(path) in out

    weights = load_network(lora)
    assert weights.metadata[METADATA_METHOD] == "copier" and len(weights.modules) > 0
    assert weights.metadata["lorakit_slider_ensemble"] == "2"  # the average of two runs of B
    assert all(torch.isfinite(t).all() for m in weights.modules.values() for t in m.tensors.values())
    assert any(float(m.delta().abs().max()) > 0 for m in weights.modules.values())  # B trained away from zero

    grid = np.asarray(Image.open(grid_path).convert("RGB"))
    cell = 64 * 2  # toy images at the grid's scale 2
    rows, columns = len(TOY_PROMPTS) * 1, len(DEFAULT_WEIGHTS)
    assert grid.shape[0] == 16 + rows * cell and grid.shape[1] > columns * cell
    last_cell = grid[16:16 + cell, -cell:]
    assert last_cell.std() > 0  # an image, not the blank canvas

    metrics = json.loads(metrics_path.read_text())
    assert metrics["method"] == "copier" and metrics["weights"] == list(DEFAULT_WEIGHTS)
    assert metrics["prompts"] == list(TOY_PROMPTS) and metrics["seeds"] == [0]
    assert SUMMARY_KEYS <= set(metrics["summary"]) and len(metrics["runs"]) == rows
    assert all(len(run["area"]) == columns and -1 <= run["rho"] <= 1 for run in metrics["runs"])
    assert metrics["settings"]["toy_world"] is True


def test_demo_refuses_a_zero_setting(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--steps", "0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --steps, --seeds, --sample-steps, --verify-seeds and --ensemble must be at least 1"
    )


QUICK = ["--steps", "1", "--seeds", "1", "--sample-steps", "1", "--verify-seeds", "1"]


def test_demo_refuses_an_out_folder_it_cannot_write_before_training(capsys, unwritable_outputs):
    for folder, problem in unwritable_outputs.refusals("demo").items():
        assert main(["demo", "--out", str(folder), *QUICK]) == 2
        assert capsys.readouterr().err.strip() == f"error: --out {folder}: {problem}"
    assert unwritable_outputs.untouched()


def test_demo_refuses_sample_steps_the_sampler_cannot_take_before_training(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *QUICK, "--sample-steps", "1001"]) == 2
    assert capsys.readouterr().err.strip() == "error: --sample-steps must be at most 1000, got 1001"
    assert not out.exists()
