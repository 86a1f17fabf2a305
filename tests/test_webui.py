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
        self.first_stage_model = torch.nn.Linear(4, 4)  # the VAE


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
    webui.shared.cmd_opts.api = True
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


def _event(blocks, elem_id: str, trigger: str):
    """The Python function gradio runs when the component with ``elem_id`` fires ``trigger``."""
    ids = [block_id for block_id, block in blocks.blocks.items() if getattr(block, "elem_id", None) == elem_id]
    index = next(i for i, d in enumerate(blocks.dependencies) if d["trigger"] == trigger and d["targets"] == ids)
    return blocks.fns[index].fn


def test_merge_picker_lists_files_saved_after_the_page_was_built(webui):
    """The WebUI builds the page once at start: opening Merge shows files saved since, and the refresh button
    rescans the folder for files put there by hand (a real WebUI 1.10.1 showed an empty picker after a training)."""
    _register(webui)
    blocks = webui.callbacks.ui_tabs_callback()[0][0]
    picker = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "lorakit_merge_pick")
    assert picker.choices == []
    saved = webui.lora_dir / "lorakit" / "trained.safetensors"
    saved.parent.mkdir(parents=True)
    saved.write_bytes(b"")
    webui.networks.list_available_networks()  # what a job does after each save
    (webui.lora_dir / "by_hand.safetensors").write_bytes(b"")
    assert _event(blocks, "lorakit_merge_tab", "select")()["choices"] == ["trained"]
    assert _event(blocks, "lorakit_merge_refresh", "click")()["choices"] == ["by_hand", "trained"]


def _api_answers(app, requests):
    """(status, JSON body, WWW-Authenticate) for each (method, path, auth) sent to ``app`` in process."""
    import asyncio

    import httpx

    async def send():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://webui") as client:
            answers = []
            for method, path, auth in requests:
                response = await client.request(method, path, auth=auth, json={} if method == "POST" else None)
                answers.append((response.status_code, response.json(), response.headers.get("www-authenticate")))
            return answers

    return asyncio.run(send())


@pytest.mark.parametrize("flags, mounted", [({}, False), ({"api": True}, True), ({"nowebui": True}, True)])
def test_routes_are_served_only_where_the_webui_serves_its_api(webui, flags, mounted):
    from fastapi import FastAPI

    _register(webui)
    vars(webui.shared.cmd_opts).update(flags)
    app = FastAPI()
    webui.callbacks.app_started_callback(None, app)
    paths = {route.path for route in app.routes}
    assert ("/lorakit/v1/jobs" in paths) == mounted
    if mounted:
        assert _api_answers(app, [("GET", "/lorakit/v1/jobs", None)]) == [(200, [], None)]


def test_api_auth_guards_every_route_like_sdapi(webui):
    from fastapi import FastAPI

    callbacks = _register(webui)
    webui.shared.cmd_opts.api = True
    webui.shared.cmd_opts.api_auth = "alice:s3cret,bob:pa55"
    app = FastAPI()
    webui.callbacks.app_started_callback(None, app)
    refused = (401, {"detail": "Incorrect username or password"}, "Basic")
    answers = _api_answers(app, [
        ("GET", "/lorakit/v1/jobs", None),
        ("GET", "/lorakit/v1/jobs", ("alice", "wrong")),
        ("GET", "/lorakit/v1/jobs", ("carol", "s3cret")),
        ("POST", "/lorakit/v1/merge", ("bob", "s3cret")),
        ("POST", "/lorakit/v1/jobs/task(x)/stop", None),
        ("GET", "/lorakit/v1/jobs", ("alice", "s3cret")),
        ("GET", "/lorakit/v1/jobs/task(x)", ("bob", "pa55")),
    ])
    unauthenticated = (401, {"detail": "Not authenticated"}, "Basic")  # no credentials: HTTPBasic's own answer
    assert answers[:5] == [unauthenticated, refused, refused, refused, unauthenticated]
    assert answers[5] == (200, [], None)
    assert answers[6] == (404, {"error": "no job task(x)"}, None)
    assert callbacks.manager().records() == []  # the refused POST started nothing
    from lorakit_ext.api import parse_credentials

    with pytest.raises(LorakitError, match="--api-auth: 'alice' is not user:password"):
        parse_credentials("alice")


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


def _counting_run(steps=20):
    """A job that counts to ``steps`` unless stopped; the result says how far it got."""

    def run(adapter, report, token):
        for step in range(1, steps + 1):
            if token.stop_requested:
                return {"files": [], "stopped_at": step}
            report(step=step, total=steps)
        return {"files": [], "stopped_at": None}

    return run


def test_interrupt_of_an_earlier_generation_does_not_stop_the_next_job(webui):
    """The WebUI's ``state.end()`` leaves ``interrupted`` set; only the next ``begin()`` clears it."""
    callbacks = _register(webui)
    state = webui.shared.state
    state.begin(job="txt2img")
    state.interrupt()
    state.end()
    assert state.interrupted  # as in the WebUI: the flag outlives the interrupted generation
    record = callbacks.manager().submit(Operation("train", "after an interrupt", _counting_run(), needs_model=False))
    assert record.job.wait(10)
    assert record.job.status == "done" and record.job.result["stopped_at"] is None


def test_interrupt_of_the_generation_a_job_waits_for_does_not_stop_it(webui):
    callbacks = _register(webui)
    state = webui.shared.state
    with webui.call_queue.queue_lock:  # a generation is running
        state.begin(job="txt2img")
        state.interrupt()  # the user interrupts that generation, and starts a job while it winds down
        record = callbacks.manager().submit(Operation("train", "queued", _counting_run(), needs_model=False))
        while record.job.latest is None:  # the job reported that it waits for the host
            record.job.wait(0.01)
        state.interrupt()
        state.end()
    assert record.job.wait(10)
    assert record.job.status == "done" and record.job.result["stopped_at"] is None


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


@pytest.fixture(scope="module")
def toy_ldm():
    """The toy checkpoint as a real ldm ``LatentDiffusion``, standing in for ``shared.sd_model``."""
    torch.set_num_threads(1)
    from lorakit_ext.toy.model import load_toy_model

    return load_toy_model()


def _toy_dataset(root: Path) -> Path:
    from PIL import Image

    folder = root / "data" / "2_zq"
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 180, 20)).save(folder / "one.png")
    (folder / "one.txt").write_text("zq")
    return folder.parent


def _bits(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("outcome", ["done", "stopped", "cancelled", "failed"])
def test_training_on_the_loaded_model_leaves_it_bit_for_bit_on_every_outcome(webui, toy_ldm, tmp_path, outcome,
                                                                              monkeypatch):
    """A real toy training through the job manager and the WebUI host: finished, stopped by the WebUI's Interrupt,
    cancelled, or failed mid-step; UNet, text encoder and VAE are exactly as before each time."""
    from lorakit_ext.models.ldm import LdmAdapter
    from lorakit_ext.ui import operations
    from lorakit_ext.ui.host import model_checksum

    callbacks = _register(webui)
    webui.shared.sd_model = toy_ldm
    before, checksum = _bits(toy_ldm), model_checksum([toy_ldm])
    assert any(name.startswith("first_stage_model.") for name in before)  # the VAE is part of what is compared
    predictions = []
    real_predict = LdmAdapter.predict

    def predict(self, *args, **kwargs):
        predictions.append(1)
        if outcome == "stopped" and len(predictions) == 2:
            webui.shared.state.interrupt()
        if outcome == "cancelled" and len(predictions) == 2:
            record.job.cancel()
        if outcome == "failed" and len(predictions) == 2:
            raise RuntimeError("CUDA out of memory (stand-in)")
        return real_predict(self, *args, **kwargs)

    monkeypatch.setattr(LdmAdapter, "predict", predict)
    config = operations.train_config({"train_data_dir": str(_toy_dataset(tmp_path)), "output_name": "bits",
                                      "resolution": 64, "network_dim": 4, "max_train_steps": 4,
                                      "network_train_unet_only": False, "save_precision": "float"},
                                     callbacks.manager().host)
    record = callbacks.manager().submit(operations.train_operation(config))
    assert record.job.wait(60)
    assert record.job.status == outcome, record.job.error
    if outcome == "failed":
        assert record.job.error == "RuntimeError: CUDA out of memory (stand-in)"
    assert len(predictions) == (4 if outcome == "done" else 2)  # the job ended at the step it was told to
    listed = webui.networks.available_networks.get("bits")
    if outcome in ("done", "stopped"):  # saved, and the refreshed Lora list shows the file with its metadata
        assert listed is not None and Path(listed.filename) == webui.lora_dir / "lorakit" / "bits.safetensors"
        assert listed.metadata["ss_output_name"] == "bits" and listed.alias == "bits"
        assert int(listed.metadata["ss_steps"]) == len(predictions)
    else:
        assert listed is None
    assert model_checksum([toy_ldm]) == checksum
    after = _bits(toy_ldm)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)


@pytest.mark.parametrize("ending", ["returns", "stops", "is cancelled", "raises"])
def test_a_changed_vae_is_reported_on_every_path_without_hiding_the_error(webui, monkeypatch, ending):
    callbacks = _register(webui)
    model = _Tiny()
    webui.shared.sd_model = model
    import lorakit_ext.models.ldm as ldm

    monkeypatch.setattr(ldm, "LdmAdapter", _TinyAdapter)

    def run(adapter, report, token):
        with torch.no_grad():
            model.first_stage_model.weight.mul_(1.001)  # a bug that leaves the VAE changed
        if ending == "stops":
            token.stop()
        if ending == "is cancelled":
            token.cancel()
            token.raise_if_cancelled()
        if ending == "raises":
            raise LorakitError("train_data_dir: an unreadable image (stand-in)")
        return {"files": []}

    record = callbacks.manager().submit(Operation("train", "train lora 'x'", run, needs_model=True))
    assert record.job.wait(10)
    assert record.job.status == "failed"
    assert record.job.error.startswith("train lora 'x': the checkpoint's weights changed; reload it")
    if ending == "raises":
        assert record.job.error.endswith("(the job itself ended with: train_data_dir: an unreadable image (stand-in))")
    if ending == "is cancelled":
        assert record.job.error.endswith("(the job itself ended with: Cancelled)")
    assert not webui.call_queue.queue_lock.locked() and webui.shared.state.job == ""


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
    from lorakit_ext.ui.tabs import notices_markdown

    assert "&lt;lora:name:w&gt; in prompts" in notices_markdown(host.notices())  # as text, not an HTML tag
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
