"""``toy export`` writes what the WebUI loads (weights + yaml that builds without a download); ``toy grid`` writes a
prompt x seed grid of what the model draws."""

from __future__ import annotations


import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from lorakit_ext.cli import main
from lorakit_ext.toy import grid as demo_grid
from lorakit_ext.toy import model as toy_model
from lorakit_ext.toy.model import CHECKPOINT_NAME, CHECKPOINT_PATH, TEXT_DIR, load_checkpoint


def test_export_writes_checkpoint_and_yaml_that_build_the_model(tmp_path, capsys):
    target_dir = tmp_path / "models" / "Stable-diffusion"
    assert main(["toy", "export", "--to", str(target_dir)]) == 0
    checkpoint = target_dir / CHECKPOINT_NAME
    assert str(checkpoint) in capsys.readouterr().out
    assert checkpoint.read_bytes() == CHECKPOINT_PATH.read_bytes()
    config = OmegaConf.load(checkpoint.with_suffix(".yaml"))
    assert config.model.params.cond_stage_config.params.version == str(TEXT_DIR)
    model = load_checkpoint(checkpoint, OmegaConf.to_container(config))  # as the WebUI does: yaml, then weights
    assert model.scale_factor == config.model.params.scale_factor
    assert sorted(p.name for p in target_dir.iterdir()) == [CHECKPOINT_NAME, "toy_sd1.yaml"]  # no temp files left


def test_export_onto_a_file_is_a_one_line_error(tmp_path, capsys):
    occupied = tmp_path / "file"
    occupied.write_text("x")
    assert main(["toy", "export", "--to", str(occupied)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --to") and "\n" not in err


def test_grid_writes_the_default_prompts_by_seeds(tmp_path, capsys):
    assert main(["toy", "grid", "--out", str(tmp_path)]) == 0
    grid_path = tmp_path / demo_grid.GRID_NAME
    assert str(grid_path) in capsys.readouterr().out
    grid = np.asarray(Image.open(grid_path).convert("RGB"))
    cell = 2 * 64
    assert grid.shape[0] == len(demo_grid.PROMPTS) * cell and grid.shape[1] > demo_grid.SEEDS * cell
    first_image = grid[:cell, -demo_grid.SEEDS * cell :][:, :cell]
    assert first_image.std() > 20  # a picture, not a flat field


def test_grid_takes_prompts_and_seeds(tmp_path):
    assert main(["toy", "grid", "--out", str(tmp_path), "--prompt", "a red circle", "--seeds", "2", "--steps", "4"]) == 0
    assert Image.open(tmp_path / demo_grid.GRID_NAME).size[1] == 2 * 64
    assert main(["toy", "grid", "--out", str(tmp_path), "--seeds", "0"]) == 2


def test_export_and_grid_refuse_an_out_folder_they_cannot_write(capsys, unwritable_outputs):
    for folder, problem in unwritable_outputs.refusals("sub").items():
        assert main(["toy", "grid", "--out", str(folder), "--seeds", "1", "--steps", "2"]) == 2
        assert capsys.readouterr().err.strip() == f"error: --out {folder}: {problem}"
        assert main(["toy", "export", "--to", str(folder)]) == 2
        assert capsys.readouterr().err.strip() == f"error: --to {folder}: {problem}"
    assert unwritable_outputs.untouched()


@pytest.mark.parametrize(
    ("option", "value", "problem"),
    [
        ("--cfg-scale", "nan", "must be a number 0 or above, got nan"),
        ("--cfg-scale", "inf", "must be a number 0 or above, got inf"),
        ("--cfg-scale", "-1", "must be a number 0 or above, got -1.0"),
        ("--steps", "0", "must be between 1 and 1000, got 0"),
        ("--steps", "1001", "must be between 1 and 1000, got 1001"),
        ("--seed", str(2**64), f"must fit in 64 bits, got {2**64}"),
        ("--seed", str(-(2**63) - 1), f"must fit in 64 bits, got {-(2**63) - 1}"),
    ],
)
def test_grid_refuses_numbers_before_loading_the_model(tmp_path, capsys, monkeypatch, option, value, problem):
    monkeypatch.setattr(toy_model, "load_toy_model", lambda: pytest.fail("the model loaded"))
    out = tmp_path / "out"
    assert main(["toy", "grid", "--out", str(out), "--seeds", "1", "--steps", "2", option, value]) == 2
    assert capsys.readouterr().err.strip() == f"error: {option} {problem}"
    assert not out.exists()
