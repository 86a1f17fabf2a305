"""The host-agnostic front-end pieces: path rules, config placement, progress lines, tab helpers, X/Y/Z prompt
rewriting, and the ``ui`` verb's arguments."""

from __future__ import annotations

import importlib.util
from dataclasses import fields
from pathlib import Path

import pytest

from lorakit_ext.cli import main
from lorakit_ext.errors import LorakitError
from lorakit_ext.train.config import TrainConfig
from lorakit_ext.train.job import Job, ProgressEvent
from lorakit_ext.ui import operations, paths, tabs
from lorakit_ext.ui.jobs import JobRecord, Operation, progress_view, result_line
from lorakit_ext.ui.standalone import StandaloneHost
from lorakit_ext.webui import xyz


@pytest.fixture
def host(tmp_path):
    return StandaloneHost(tmp_path / "Lora")


def test_output_paths_stay_under_the_root(tmp_path):
    root = tmp_path / "Lora"
    assert paths.output_path(root, "my:lora?.safetensors", "lorakit") == root.resolve() / "lorakit" / "my_lora_.safetensors"
    for folder in ("..", "../x", "/etc", "lorakit/../../x"):
        with pytest.raises(LorakitError, match="outside the Lora folder"):
            paths.output_path(root, "a", folder)
    with pytest.raises(LorakitError, match="output_name"):
        paths.sanitize_name(" . . ")
    with pytest.raises(LorakitError, match="base: .* does not exist"):
        paths.existing_file(tmp_path / "missing.ckpt", "base")


needs_dataset = pytest.mark.skipif(
    importlib.util.find_spec("lorakit_ext.train.dataset") is None,
    reason="TrainConfig.validate needs lorakit_ext/train/dataset.py, which has not landed yet",
)


@needs_dataset
def test_train_config_is_placed_under_the_lora_folder(host, tmp_path):
    (tmp_path / "data" / "1_x").mkdir(parents=True)
    (tmp_path / "data" / "1_x" / "a.png").write_bytes(b"")
    data = {"train_data_dir": str(tmp_path / "data")}
    config = operations.train_config({**data, "output_name": "a/b", "max_train_steps": 5}, host)
    assert Path(config.output_dir) == host.output_dir() and config.output_name == "a_b"
    config = operations.train_config({**data, "output_dir": "sub/dir"}, host)
    assert Path(config.output_dir) == host.lora_root() / "sub" / "dir"
    with pytest.raises(LorakitError, match="outside the Lora folder"):
        operations.train_config({**data, "output_dir": str(tmp_path)}, host)
    with pytest.raises(LorakitError, match="learning_rate must be positive"):
        operations.train_config({**data, "learning_rate": 0}, host)


def test_tab_values_build_the_cli_config():
    names = ["output_name", "network_dim", "resolution", "optimizer_args", "conv_dim", "enable_bucket"]
    defaults = TrainConfig()
    shown = [tabs.field_value(n, getattr(defaults, n)) for n in names]
    assert shown == ["lora", 4, "512,512", "", "", False]
    values = tabs.config_values(names, ["x", 8.0, "64,96", "weight_decay=0.1 betas=0.9,0.99", "", True], "LoCon",
                                "/data", "", None)
    config = TrainConfig.from_dict(values)
    assert (config.network_algo, config.network_dim, config.resolution) == ("locon", 8, (64, 96))
    assert config.optimizer_args == ["weight_decay=0.1", "betas=0.9,0.99"] and config.conv_dim is None
    assert config.enable_bucket and config.reg_data_dir is None and config.train_data_dir == "/data"
    # every TrainConfig field has a place in the tab (new ones under "Other options"), and no stale names
    laid_out = [*tabs.TRAIN_MAIN, *(n for group in tabs.TRAIN_GROUPS.values() for n in group), *tabs.other_options()]
    known = {f.name for f in fields(TrainConfig)}  # fields() leaves out ClassVars such as load_notes
    assert set(laid_out) | set(tabs.SET_APART) | set(tabs.NOT_IN_UI) == known and len(laid_out) == len(set(laid_out))


def test_progress_and_result_lines():
    event = ProgressEvent(step=5, total=20, values={"epoch": 1, "epochs": 2, "loss": 0.25, "avg_loss": 0.3,
                                                    "lr": 1e-4}, it_per_s=2.0, eta_s=7.5)
    view = progress_view(event)
    assert view.fraction == 0.25
    assert view.text == "step 5/20, epoch 1/2, loss 0.2500 (avg 0.3000), lr 1.00e-04, 2.00 it/s, eta 8s"
    assert "width:25%" in tabs.progress_html(0.25, "<b>") and "&lt;b&gt;" in tabs.progress_html(0.25, "<b>")

    def record(work):
        job = Job(work, name="t").start()
        assert job.wait(10)
        return JobRecord("task(1)", Operation("merge", "t", work, needs_model=False), job)

    done = record(lambda report, token: {"output": "/x/a.safetensors", "hash": "0123456789ab", "seconds": 1.25})
    assert result_line(done) == "Saved /x/a.safetensors (hash 0123456789ab) in 1.2 s."
    warned = record(lambda report, token: {"output": None, "warnings": ["no visible effect"], "seconds": 2})
    assert result_line(warned) == "Nothing saved in 2.0 s. Warning: no visible effect"

    def fail(report, token):
        raise LorakitError("models: x does not exist")

    assert result_line(record(fail)) == "Error: models: x does not exist"


def test_merge_rows_and_toml_options():
    assert tabs.merge_rows([["a", 0.5], ["", 1], ["b", ""]]) == [["a", 0.5], ["b", 1.0]]
    assert tabs.toml_options("max_train_steps = 3\nlearning_rate = 1e-3") == {"max_train_steps": 3, "learning_rate": 1e-3}
    with pytest.raises(LorakitError, match="training options: not valid TOML"):
        tabs.toml_options("steps = = 3")


def test_merge_request_built_by_the_tab_is_checked_too():
    """The Merge tab builds a ``MergeRequest`` itself (a ratio cell can read "nan"): its fields are checked alike."""
    with pytest.raises(LorakitError, match="^ratios: nan is not a finite number$"):
        operations.MergeRequest(models=["a"], ratios=[float("nan")])
    assert operations.MergeRequest(models=["a"], ratios=[1], new_rank=2.0).ratios == [1.0]


def test_lora_tag_rewriting():
    assert xyz.set_lora_weight("cat <lora:a:1> <lora:b:0.2>", "b", 0.75) == "cat <lora:a:1> <lora:b:0.75>"
    assert xyz.set_lora_weight("cat", "a", 1.5) == "cat <lora:a:1.5>"
    assert xyz.set_lora_weight("<lora:a:1:0.5:lbw=x>", "a", -1) == "<lora:a:-1:0.5:lbw=x>"
    assert xyz.set_lora_te_unet("<lora:a:1>", "a", "0/1") == "<lora:a:0:1>"
    assert xyz.replace_lora_file("dog <lora:a:0.4>", "", "b") == "dog <lora:b:0.4>"
    assert xyz.replace_lora_file("dog", "", "b") == "dog <lora:b:1>"
    with pytest.raises(LorakitError, match="2 <lora"):
        xyz.chosen_lora("<lora:a:1> <lora:b:1>", "")
    with pytest.raises(LorakitError, match="TE/UNet"):
        xyz.set_lora_te_unet("", "a", "half")
    assert xyz.legend("L", "a", {"ss_epoch": "3"}, ["ss_epoch", "ss_missing"]) == "L: a (ss_epoch 3)"


def test_ui_verb_arguments(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["ui", "--help"])
    assert "--lora-dir" in capsys.readouterr().out
    assert main(["ui", "--model", str(tmp_path / "none.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_slider_inputs_are_checked_before_anything_runs(host, tmp_path):
    with pytest.raises(LorakitError, match="method"):
        operations.slider_operation("blend", {}, host)
    with pytest.raises(LorakitError, match="a: .* is not a folder"):
        operations.slider_operation("copier", {"a": str(tmp_path / "none"), "b": str(tmp_path)}, host)
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    with pytest.raises(LorakitError, match="outside the Lora folder"):
        operations.slider_operation("copier", {"a": str(tmp_path / "A"), "b": str(tmp_path / "B"),
                                               "output_dir": str(tmp_path)}, host)


def test_standalone_job_session_catches_a_changed_vae(tmp_path):
    """The standalone app checks the whole model after a job, the VAE included, as the WebUI host does."""
    import torch

    from lorakit_ext.ui.host import ModelChanged

    host = StandaloneHost(tmp_path / "Lora")  # the toy model, loaded on first use
    with host.job_session("task(a)", "t", needs_model=True) as adapter:
        pass  # untouched: no error
    with pytest.raises(ModelChanged, match="the model's weights changed"):
        with host.job_session("task(b)", "t", needs_model=True) as adapter:
            with torch.no_grad():
                adapter.model.first_stage_model.decoder.conv_out.bias.add_(1e-3)
