"""The WebUI adapter (lorakit_ext/webui, scripts/lorakit.py, install.py) against the stand-in of ``modules.*``."""

from __future__ import annotations

import importlib
import runpy
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lorakit_ext.errors import LorakitError
from lorakit_ext.ui.jobs import Operation

ROOT = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).resolve().parent / "webui_standin"
STANDIN_MODULES = ("modules", "networks", "xyz_grid", "launch")


def _forget_standin() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in STANDIN_MODULES or name.startswith("lorakit_ext.webui"):
            del sys.modules[name]


@pytest.fixture
def webui(tmp_path, monkeypatch):
    """A fresh stand-in WebUI with its Lora folder in tmp_path and the built-in Lora loaded."""
    _forget_standin()
    monkeypatch.syspath_prepend(str(STANDIN))
    import networks
    import xyz_grid
    from modules import call_queue, progress, script_callbacks, scripts, shared

    shared.cmd_opts.lora_dir = str(tmp_path / "Lora")
    scripts.scripts_data.append(scripts.ScriptClassData(xyz_grid.Script, "scripts/xyz_grid.py", str(tmp_path), xyz_grid))
    script_callbacks.clear_callbacks()
    yield SimpleNamespace(shared=shared, progress=progress, call_queue=call_queue, networks=networks, xyz=xyz_grid,
                          callbacks=script_callbacks, lora_dir=tmp_path / "Lora")
    _forget_standin()


def _register(webui):
    runpy.run_path(str(ROOT / "scripts" / "lorakit.py"))
    from lorakit_ext.webui import callbacks

    webui.callbacks.ui_settings_callback()
    return callbacks


class _Tiny(torch.nn.Module):
    """Enough of an ldm model for the host: ``model.diffusion_model`` and ``cond_stage_model``."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.diffusion_model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        self.cond_stage_model = torch.nn.Linear(4, 4)


def test_install_asks_pip_only_for_what_is_missing(webui, monkeypatch):
    import launch

    runpy.run_path(str(ROOT / "install.py"))
    missing = list(launch.pip_calls)
    assert all(c.startswith("install --no-deps ") for c in missing)
    assert not any("torch " in c or c.endswith(" torch") for c in missing)
    # the venv has prodigyopt and lion-pytorch: nothing to do for them
    assert not any("prodigyopt" in c or "lion-pytorch" in c for c in missing)
    monkeypatch.setattr(launch, "is_installed", lambda package: False)
    launch.pip_calls.clear()
    runpy.run_path(str(ROOT / "install.py"))
    assert "install --no-deps prodigyopt" in launch.pip_calls and "install --no-deps lion-pytorch" in launch.pip_calls


def test_script_registers_tab_settings_api_and_axes_once(webui):
    callbacks = _register(webui)
    assert webui.shared.opts.lorakit_output_subfolder == "lorakit"
    tabs = webui.callbacks.ui_tabs_callback()
    assert [(title, elem) for _, title, elem in tabs] == [("LoRA Kit", "lorakit")]
    config = tabs[0][0].get_config_file()
    labels = [c["props"].get("label") for c in config["components"] if c["type"] == "tabitem"]
    assert labels == ["Train LoRA", "Copier/Difference", "Merge"]
    scripts = {d.get("js") for d in config["dependencies"]}  # the page's progress bar follows each Start
    assert {"lorakit_start_train", "lorakit_start_slider", "lorakit_start_merge"} <= scripts
    javascript = (ROOT / "javascript" / "lorakit.js").read_text()
    assert all(f"function {name}(" in javascript for name in scripts if name and name.startswith("lorakit"))

    from fastapi import FastAPI

    app = FastAPI()
    webui.callbacks.app_started_callback(None, app)
    webui.callbacks.app_started_callback(None, app)  # a second start mounts nothing twice
    paths = [route.path for route in app.routes if route.path.startswith("/lorakit/v1")]
    assert "/lorakit/v1/train" in paths and len(paths) == len(set(paths))

    webui.callbacks.before_ui_callback()
    webui.callbacks.before_ui_callback()
    labels = [option.label for option in webui.xyz.axis_options]
    assert labels.count("[LoRA Kit] LoRA weight") == 1
    assert {"[LoRA Kit] LoRA file", "[LoRA Kit] LoRA TE/UNet weight"} <= set(labels)
    assert callbacks.manager() is callbacks.manager()


def test_xyz_axes_rewrite_the_prompt(webui):
    _register(webui)
    webui.callbacks.before_ui_callback()
    (webui.lora_dir / "lorakit").mkdir(parents=True)
    for name in ("alpha", "beta"):
        (webui.lora_dir / "lorakit" / f"{name}.safetensors").write_bytes(b"")
    webui.networks.list_available_networks()
    options = {o.label: o for o in webui.xyz.axis_options}
    p = SimpleNamespace(prompt="a cat <lora:alpha:0.3:0.7>")
    options["[LoRA Kit] LoRA weight"].apply(p, 0.8, [])
    assert p.prompt == "a cat <lora:alpha:0.8:0.7>"
    options["[LoRA Kit] LoRA file"].apply(p, "beta", [])
    assert p.prompt == "a cat <lora:beta:0.8:0.7>"
    options["[LoRA Kit] LoRA TE/UNet weight"].apply(p, "0.25/1", [])
    assert p.prompt == "a cat <lora:beta:0.25:1>"
    assert options["[LoRA Kit] LoRA file"].choices() == ["alpha", "beta"]
    webui.networks.available_networks["beta"].metadata = {"ss_epoch": "4", "ss_output_name": "beta"}
    label = options["[LoRA Kit] LoRA file"].format_value(p, options["[LoRA Kit] LoRA file"], "beta")
    assert label == "[LoRA Kit] LoRA file: beta (ss_output_name beta, ss_epoch 4)"
    # through the stand-in txt2img, the weight reaches generation
    from modules import processing

    p = processing.StableDiffusionProcessingTxt2Img(prompt="", width=8, height=8)
    webui.shared.opts.lorakit_xyz_lora = "alpha"
    options["[LoRA Kit] LoRA weight"].apply(p, 0.5, [])
    assert processing.process_images(p).images[0].getpixel((0, 0))[0] == 127


def test_job_holds_queue_lock_reports_progress_and_refreshes_lora_list(webui):
    callbacks = _register(webui)
    manager = callbacks.manager()
    seen = {}
    release = threading.Event()

    def run(adapter, report, token):
        seen["locked"] = webui.call_queue.queue_lock.locked()
        report(step=3, total=4, values={"epoch": 1, "epochs": 1, "loss": 0.5, "avg_loss": 0.5, "lr": 1e-4})
        seen["progress"] = webui.progress.progressapi("task(test1)")
        release.wait(10)
        out = webui.lora_dir / "lorakit" / "fresh.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"x")
        return {"output": str(out), "files": [str(out)], "hash": "abc"}

    record = manager.submit(Operation("merge", "test job", run, needs_model=False), task_id="task(test1)")
    with pytest.raises(LorakitError, match="is running"):
        manager.submit(Operation("merge", "second", run, needs_model=False))
    while "progress" not in seen:
        record.job.wait(0.05)
    release.set()
    assert record.job.wait(10) and record.job.status == "done", record.job.error
    assert seen["locked"]
    assert seen["progress"]["active"] and seen["progress"]["progress"] == pytest.approx(0.75)
    assert "loss 0.5000" in seen["progress"]["textinfo"]
    assert not webui.call_queue.queue_lock.locked()
    assert "task(test1)" in webui.progress.finished_tasks
    assert "fresh" in webui.networks.available_networks  # usable as <lora:fresh:1> without a restart
    assert "Saved" in record.snapshot()["result_line"]


def test_webui_interrupt_stops_the_job(webui):
    callbacks = _register(webui)

    def run(adapter, report, token):
        for step in range(1, 200):
            if token.stop_requested:
                return {"files": [], "stopped_at": step}
            if step == 5:
                webui.shared.state.interrupt()
            report(step=step, total=200)
        return {"files": []}

    record = callbacks.manager().submit(Operation("train", "interrupted", run, needs_model=False))
    assert record.job.wait(10)
    assert record.job.status == "stopped" and record.job.result["stopped_at"] <= 7


def test_training_session_clears_lora_patches_and_restores_model(webui, monkeypatch):
    callbacks = _register(webui)
    model = _Tiny()
    webui.shared.sd_model = model
    layer = model.model.diffusion_model[0]
    original = layer.weight.detach().clone()
    layer.network_weights_backup = original.clone()
    layer.network_current_names = (("some_lora", 1.0),)
    with torch.no_grad():
        layer.weight.add_(1.0)  # the built-in Lora's patch
    webui.networks.loaded_networks.append("some_lora")
    from modules import sd_hijack

    import lorakit_ext.models.ldm as ldm

    monkeypatch.setattr(ldm, "LdmAdapter", _TinyAdapter)
    host = callbacks.manager().host
    with host.job_session("task(x)", "t", needs_model=True) as adapter:
        assert adapter.model is model
        assert torch.equal(layer.weight, original)  # patch undone before training
        assert not webui.networks.loaded_networks
        assert not sd_hijack.optimizations_applied  # attention without backward swapped out
        assert webui.call_queue.queue_lock.locked()
    assert sd_hijack.optimizations_applied
    with pytest.raises(LorakitError, match="weights changed"):
        with host.job_session("task(y)", "t", needs_model=True):
            with torch.no_grad():
                layer.weight.add_(1e-3)
    assert sd_hijack.optimizations_applied and not webui.call_queue.queue_lock.locked()
    from modules import lowvram

    model.lowvram = True  # --medvram: after the job the WebUI's hooks must move parts again on next use
    lowvram.module_in_gpu = model.model
    with host.job_session("task(z)", "t", needs_model=True):
        pass
    assert lowvram.calls == 1 and lowvram.module_in_gpu is None


class _TinyAdapter:
    """The part of ``LdmAdapter`` the host uses, over ``_Tiny``."""

    def __init__(self, model):
        self.model = model
        self.unet = model.model.diffusion_model

    def components(self):
        return {"unet": self.model.model.diffusion_model, "te": self.model.cond_stage_model}


def test_lowvram_and_fp8_are_refused_and_fork_is_reported(webui, monkeypatch):
    callbacks = _register(webui)
    host = callbacks.manager().host
    webui.shared.sd_model = _Tiny()
    webui.shared.cmd_opts.lowvram = True
    assert any(n.level == "error" and "--lowvram" in n.message for n in host.notices())
    assert not any("mixed_precision" in n.message for n in host.notices())
    webui.shared.sd_model.half()  # the WebUI's default on a GPU
    assert any("in float16: set mixed_precision" in n.message for n in host.notices())
    webui.shared.sd_model.float()
    with pytest.raises(LorakitError, match="--lowvram"):
        with host.job_session("task(a)", "t", needs_model=True):
            pass
    webui.shared.cmd_opts.lowvram = False
    from modules import devices

    monkeypatch.setattr(devices, "fp8", True)  # what the WebUI sets when it stored the weights in fp8
    with pytest.raises(LorakitError, match="fp8"):
        with host.job_session("task(b)", "t", needs_model=True):
            pass
    from modules import launch_utils

    monkeypatch.setattr(launch_utils, "git_tag", lambda: "f2.0.1v1.10.1-previous-1-g1234")
    notices = host.notices()
    assert notices[0].blocking and "Forge" in notices[0].message
    tabs = webui.callbacks.ui_tabs_callback()
    config = tabs[0][0].get_config_file()
    assert not [c for c in config["components"] if c["type"] == "tabitem"]  # only the message is shown


def test_lora_extension_disabled_is_said_and_lists_still_work(webui):
    callbacks = _register(webui)
    del sys.modules["networks"]
    host = callbacks.manager().host
    assert any("built-in Lora extension is disabled" in n.message for n in host.notices())
    webui.lora_dir.mkdir(parents=True)
    (webui.lora_dir / "mine.safetensors").write_bytes(b"")
    assert list(host.list_networks()) == ["mine"]
    host.refresh_networks()  # nothing to refresh, and no error


def test_only_the_webui_package_imports_modules():
    offenders = []
    for path in (ROOT / "lorakit_ext").rglob("*.py"):
        if "webui" in path.relative_to(ROOT / "lorakit_ext").parts:
            continue
        text = path.read_text()
        if "from modules" in text or "import modules" in text:
            offenders.append(str(path))
    assert not offenders
    importlib.import_module("lorakit_ext.ui.tabs")  # the tabs import without a WebUI
