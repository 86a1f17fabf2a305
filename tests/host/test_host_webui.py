"""LoRA Kit in a real, running AUTOMATIC1111 WebUI 1.10.1, driven over HTTP like sd-webui-controlnet's CI.

The tester gives the WebUI's folder (``LORAKIT_WEBUI_DIR``) and the URL it serves (``LORAKIT_WEBUI_URL``, e.g.
http://127.0.0.1:7860); ``LORAKIT_WEBUI_AUTH=user:password`` when it runs with ``--api-auth``. Start it with
``--api`` (on a CPU machine: ``--use-cpu all --no-half --skip-torch-cuda-test``) after LoRA Kit is in its
``extensions/``: the first test links this checkout there as ``extensions/lorakit`` when no copy is installed, and
then asks for a restart, since the WebUI loads extensions only when it starts. Without the two variables every test
is skipped, and ``-ra`` prints why.

In order: the toy checkpoint is exported into ``models/Stable-diffusion`` and selected through
``/sdapi/v1/options``; one image is generated; train, copier, difference and merge run through ``/lorakit/v1``
(short toy runs), a second job while one runs answers 409, stop saves, and a generation waits for a job; the same
image is generated again and must be identical (the model was restored); ``<lora:name:w>`` changes the image
more as w grows; the X/Y/Z plot over "[LoRA Kit] LoRA weight" makes a grid whose cells differ; last, a merge into
the loaded checkpoint loads in the WebUI (its .yaml beside it) and draws what ``<lora:host_toy:1>`` draws.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
WEBUI_DIR = Path(os.environ["LORAKIT_WEBUI_DIR"]) if os.environ.get("LORAKIT_WEBUI_DIR") else None
WEBUI_URL = os.environ.get("LORAKIT_WEBUI_URL", "").rstrip("/")
WEBUI_AUTH = os.environ.get("LORAKIT_WEBUI_AUTH", "")
pytestmark = [
    pytest.mark.skipif(
        WEBUI_DIR is None or not WEBUI_URL,
        reason="no real WebUI given: set LORAKIT_WEBUI_DIR (its folder) and LORAKIT_WEBUI_URL (its address, "
               "started with --api) to run the real-host tests",
    ),
    pytest.mark.timeout(1800),
]
SIZE = 64  # the toy model's image size
TRIGGER = "zq"  # a word the toy model never saw: what it draws for it comes from the LoRA
PROMPT = TRIGGER
FINISHED = ("done", "stopped", "cancelled", "failed")
XYZ_WEIGHTS = (0.0, 0.5, 1.0)
STEPS = 20  # training steps of the short toy runs
SEEDS = 4  # images per weight (seeds 1..4) in the weight check


def client():
    import httpx

    return httpx.Client(base_url=WEBUI_URL, timeout=900, auth=tuple(WEBUI_AUTH.split(":", 1)) if WEBUI_AUTH else None)


@pytest.fixture(scope="module")
def http():
    assert (WEBUI_DIR / "webui.py").is_file() and (WEBUI_DIR / "extensions").is_dir(), \
        f"LORAKIT_WEBUI_DIR={WEBUI_DIR} is not a WebUI folder (no webui.py and extensions/)"
    with client() as http:
        yield http


def installed_extension() -> Path:
    """The folder of LoRA Kit under ``extensions/``: a copy or clone already there, else a link to this checkout."""
    extensions = WEBUI_DIR / "extensions"
    for entry in sorted(extensions.iterdir()):
        if (entry / "scripts" / "lorakit.py").is_file() and (entry / "lorakit_ext").is_dir():
            return entry
    link = extensions / "lorakit"
    link.symlink_to(ROOT, target_is_directory=True)
    return link


@pytest.fixture(scope="module")
def extension(http) -> Path:
    """The installed extension, loaded by the running WebUI (``/sdapi/v1/extensions`` lists only git clones with
    a remote, so the routes themselves are the proof)."""
    folder = installed_extension()
    answer = http.get("/lorakit/v1/jobs")
    if answer.status_code == 404:
        pytest.fail(f"LoRA Kit is installed at {folder}, but the WebUI at {WEBUI_URL} has not loaded it: restart "
                    "the WebUI with --api (and check Extensions > Installed that it is enabled), then run again")
    assert answer.status_code == 200, answer.text
    return folder


@pytest.fixture(scope="module")
def toy_checkpoint(http, extension) -> str:
    """Export the toy checkpoint and make the WebUI load it; returns its title. The folder is named after the
    weights' hash: the WebUI does not reload a checkpoint whose file name it already has loaded."""
    from lorakit_ext.toy.model import CHECKPOINT_PATH

    digest = hashlib.sha256(CHECKPOINT_PATH.read_bytes()).hexdigest()[:10]
    folder = WEBUI_DIR / "models" / "Stable-diffusion" / f"lorakit_toy_{digest}"
    subprocess.run([sys.executable, "-m", "lorakit_ext", "toy", "export", "--to", str(folder)], cwd=ROOT,
                   check=True)
    exported = (folder / CHECKPOINT_PATH.name).resolve()
    assert exported.is_file() and exported.with_suffix(".yaml").is_file()
    assert http.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    models = http.get("/sdapi/v1/sd-models").json()
    title = next((m["title"] for m in models if Path(m["filename"]).resolve() == exported), None)
    assert title, f"{exported} is not in /sdapi/v1/sd-models after refresh-checkpoints"
    answer = http.post("/sdapi/v1/options", json={"sd_model_checkpoint": title})
    assert answer.status_code == 200, answer.text
    # a checkpoint the WebUI has not hashed yet is listed without its " [hash]", and gets it once loaded
    loaded = http.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
    assert loaded.split(" [")[0] == title.split(" [")[0], (loaded, title)
    return loaded


def txt2img(http, prompt: str, **extra) -> list[np.ndarray]:
    from PIL import Image

    body = {"prompt": prompt, "negative_prompt": "", "seed": 1, "steps": 12, "cfg_scale": 4.0, "width": SIZE,
            "height": SIZE, "sampler_name": "Euler", "batch_size": 1, "n_iter": 1, **extra}
    answer = http.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    images = answer.json()["images"]
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(i))).convert("RGB")).astype(np.float64) for i in images]


def wait(http, job_id: str, timeout: float = 1200) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snapshot = http.get(f"/lorakit/v1/jobs/{job_id}").json()
        if snapshot["status"] in FINISHED:
            return snapshot
        time.sleep(1)
    raise AssertionError(f"job {job_id} still running after {timeout} s: {snapshot}")


def submit(http, route: str, body: dict) -> str:
    answer = http.post(f"/lorakit/v1/{route}", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()["id"]


def listed_loras(http) -> dict[str, dict]:
    """The built-in Lora's list as the WebUI has it in memory (``/sdapi/v1/loras`` does not rescan)."""
    return {item["name"]: item for item in http.get("/sdapi/v1/loras").json()}


def yellow_triangle(extent: float) -> np.ndarray:
    from lorakit_ext.toy.shapes import ShapeSpec, render

    image, _ = render(ShapeSpec("triangle", "yellow", "black", extent, (32.0, 32.0), SIZE))
    return image


def training_options(**extra) -> dict:
    """A short toy run whose LoRA changes the trigger word's image in proportion to its weight. (Stronger runs,
    say learning_rate 5e-3 for 40 steps, change it as much at w=0.25 as at w=1: the sampler saturates.)"""
    return {"resolution": SIZE, "network_dim": 8, "network_alpha": 8, "network_train_unet_only": False,
            "learning_rate": 1e-3, "max_grad_norm": 0, "train_batch_size": 2, "max_train_steps": STEPS, "seed": 3,
            "save_precision": "float", **extra}


@pytest.fixture(scope="module")
def base_image(http, toy_checkpoint) -> np.ndarray:
    """The image before any LoRA Kit job ran on this model."""
    return txt2img(http, PROMPT)[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("host_data")
    (root / "train" / f"10_{TRIGGER}").mkdir(parents=True)
    Image.fromarray(yellow_triangle(0.7)).save(root / "train" / f"10_{TRIGGER}" / "one.png")
    (root / "train" / f"10_{TRIGGER}" / "one.txt").write_text(TRIGGER)
    for side, extent in (("A", 0.3), ("B", 0.8)):  # a size slider: small -> large
        (root / side).mkdir()
        Image.fromarray(yellow_triangle(extent)).save(root / side / "triangle.png")
    return root


@pytest.fixture(scope="module")
def trained(http, base_image, data_dir) -> dict:
    job = submit(http, "train", {"train_data_dir": str(data_dir / "train"), "output_name": "host_toy",
                                 **training_options()})
    snapshot = wait(http, job)
    assert snapshot["status"] == "done", snapshot["error"]
    return snapshot


def test_training_writes_a_lora_the_webui_lists_with_its_metadata(http, trained):
    result = trained["result"]
    output = Path(result["output"])
    assert output.is_file() and output.parent.name == "lorakit" and output.name == "host_toy.safetensors"
    assert trained["result_line"].startswith(f"Saved {output} (hash {result['hash']})")
    assert result["steps"] == STEPS
    entry = listed_loras(http)["host_toy"]  # refreshed in-process: no restart, no refresh-loras call
    assert Path(entry["path"]).resolve() == output.resolve()
    assert entry["metadata"]["ss_output_name"] == "host_toy" and entry["alias"] == "host_toy"


@pytest.fixture(scope="module")
def sliders(http, trained, data_dir) -> dict[str, dict]:
    """A copier and a difference slider from the A/B pair: method -> finished job."""
    jobs = {}
    for method in ("copier", "difference"):
        job = submit(http, method, {"a": str(data_dir / "A"), "b": str(data_dir / "B"), "output_name": f"host_{method}",
                                    "report": False, "resolution": SIZE, "max_train_steps": 8})
        jobs[method] = wait(http, job)
    return jobs


@pytest.fixture(scope="module")
def merged(http, trained, sliders) -> dict:
    job = submit(http, "merge", {"models": ["host_toy", "host_copier"], "ratios": [1.0, 0.5],
                                 "output_name": "host_merged", "save_precision": "float"})
    return wait(http, job)


@pytest.mark.parametrize("method", ["copier", "difference"])
def test_slider_methods_write_a_listed_lora(http, sliders, method):
    snapshot = sliders[method]
    assert snapshot["status"] == "done", snapshot["error"]
    assert snapshot["kind"] == method and Path(snapshot["result"]["output"]).is_file()
    assert f"host_{method}" in listed_loras(http)


def test_merge_of_two_loras_is_listed(http, merged):
    assert merged["status"] == "done", merged["error"]
    assert Path(merged["result"]["output"]).is_file() and "host_merged" in listed_loras(http)


def test_second_job_is_409_generation_waits_and_stop_saves(http, trained, merged, data_dir):
    job = submit(http, "train", {"train_data_dir": str(data_dir / "train"), "output_name": "host_stopped",
                                 **training_options(max_train_steps=100000)})
    deadline = time.monotonic() + 300
    while (http.get(f"/lorakit/v1/jobs/{job}").json().get("progress") or {}).get("step", 0) < 2:
        assert time.monotonic() < deadline, "the long job made no training step in 300 s"
        time.sleep(0.5)
    second = http.post("/lorakit/v1/merge", json={"models": ["host_toy"], "output_name": "host_never"})
    assert second.status_code == 409 and "is running" in second.json()["error"]
    generated = []

    def generate():
        with client() as other:
            generated.append(txt2img(other, PROMPT))

    generation = threading.Thread(target=generate, daemon=True)
    generation.start()
    generation.join(5)
    assert not generated, "a generation ran while a LoRA Kit job held the WebUI"
    assert http.post(f"/lorakit/v1/jobs/{job}/stop").status_code == 200
    snapshot = wait(http, job)
    generation.join(300)
    assert generated, "the waiting generation did not run after the job ended"
    assert snapshot["status"] == "stopped", snapshot["error"]
    assert snapshot["result_line"].startswith("Stopped early. Saved ")
    assert Path(snapshot["result"]["output"]).is_file() and "host_stopped" in listed_loras(http)
    assert 2 <= snapshot["result"]["steps"] < 100000
    assert not (Path(snapshot["result"]["output"]).parent / "host_never.safetensors").exists()
    jobs = {item["id"]: item for item in http.get("/lorakit/v1/jobs").json()}
    assert jobs[job]["status"] == "stopped" and jobs[trained["id"]]["status"] == "done"
    assert {item["kind"] for item in jobs.values()} >= {"train", "copier", "difference", "merge"}


def test_the_model_is_restored_after_the_jobs(http, trained, base_image):
    # the WebUI keeps the last prompt's and negative prompt's conds (persistent_cond_cache): replace both, so the
    # text encoder runs again
    txt2img(http, "a blue square", negative_prompt="blurry")
    after = txt2img(http, PROMPT)[0]
    assert np.array_equal(after, base_image), f"mean |after - before| = {np.abs(after - base_image).mean():.3f}"


def test_lora_weight_changes_the_image_more_as_it_grows(http, trained):
    base = np.stack(txt2img(http, PROMPT, batch_size=SEEDS))
    change = {w: float(np.abs(np.stack(txt2img(http, f"{PROMPT} <lora:host_toy:{w:g}>", batch_size=SEEDS)) - base)
                       .mean()) for w in XYZ_WEIGHTS}
    print("mean |image - no LoRA| by weight:", {w: round(c, 2) for w, c in change.items()})
    # measured on WebUI 1.10.1 with the toy weights of sha256 55153378 (learning rate 1e-3), 4 seeds: 0.0 at 0, 1.7 at
    # 0.5, 8.0 at 1 (at 3e-4 these weights moved only 0.6 and 1.4; the earlier 3600-step weights saturated at 3e-4:
    # 28.7 at 0.5, 30.0 at 1)
    assert change[0.0] < 0.5 and 0.5 < change[0.5] < change[1.0]


def test_xyz_plot_over_the_lora_weight_axis(http, trained):
    script = next(s for s in http.get("/sdapi/v1/script-info").json()
                  if s["name"] == "x/y/z plot" and not s["is_img2img"])
    x_type = script["args"][0]
    assert x_type["label"] == "X type"
    axis = x_type["choices"].index("[LoRA Kit] LoRA weight")
    values = ", ".join(f"{w:g}" for w in XYZ_WEIGHTS)
    # scripts/xyz_grid.py 1.10 run(): x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown,
    # z_type, z_values, z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds,
    # vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size, csv_mode
    args = [axis, values, [], 0, "", [], 0, "", [], False, False, False, False, False, False, False, 0, False]
    grid = txt2img(http, f"{PROMPT} <lora:host_toy:1>", script_name="x/y/z plot", script_args=args)[0]
    assert grid.shape == (SIZE, SIZE * len(XYZ_WEIGHTS), 3)  # one row, a cell per weight, no legend or margin
    cells = [grid[:, i * SIZE:(i + 1) * SIZE] for i in range(len(XYZ_WEIGHTS))]
    steps = [np.abs(cells[i + 1] - cells[i]).mean() for i in range(len(cells) - 1)]
    print("mean |cell difference| between neighbouring weights:", [f"{s:.2f}" for s in steps])
    # identical cells would be 0 (the pipeline is deterministic); lorakit's own Euler on the toy model: 1 - 5
    assert all(step > 0.3 for step in steps)
    for weight, cell in zip(XYZ_WEIGHTS, cells, strict=True):  # each cell is the image of its weight
        assert np.abs(cell - txt2img(http, f"{PROMPT} <lora:host_toy:{weight:g}>")[0]).mean() < 1


def test_bad_dataset_folder_is_a_400_with_one_line(http, extension):
    answer = http.post("/lorakit/v1/train", json={"train_data_dir": "/nonexistent"})
    assert answer.status_code == 400 and "train_data_dir" in answer.json()["error"]
    assert "\n" not in answer.json()["error"]


def test_merge_into_the_loaded_checkpoint_loads_and_draws_like_the_lora(http, toy_checkpoint, trained):
    """The merged checkpoint is written beside the loaded one with its .yaml (without it the WebUI guesses an SD1
    config and fails to load the toy model), and draws what the checkpoint draws with ``<lora:host_toy:1>``. Last in
    the file: it switches the WebUI's checkpoint (and back)."""
    with_lora = txt2img(http, f"{PROMPT} <lora:host_toy:1>")[0]
    job = submit(http, "merge", {"mode": "merge_into", "models": ["host_toy"], "output_name": "host_toy_merged",
                                 "save_precision": "float"})
    snapshot = wait(http, job)
    assert snapshot["status"] == "done", snapshot["error"]
    merged = Path(snapshot["result"]["output"])
    assert merged.with_suffix(".yaml").is_file() and str(merged.with_suffix(".yaml")) in snapshot["result"]["files"]
    assert http.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    title = next(m["title"] for m in http.get("/sdapi/v1/sd-models").json() if Path(m["filename"]) == merged)
    try:
        assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": title}).status_code == 200
        loaded = http.get("/sdapi/v1/options").json()["sd_model_checkpoint"]  # the title gains " [hash]" on load
        assert loaded.split(" [")[0] == title.split(" [")[0], f"the WebUI did not load {title}; it has {loaded}"
        drawn = txt2img(http, PROMPT)[0]
    finally:
        http.post("/sdapi/v1/options", json={"sd_model_checkpoint": toy_checkpoint})
    base = txt2img(http, PROMPT)[0]
    print(f"merged checkpoint vs <lora:host_toy:1>: {np.abs(drawn - with_lora).mean():.3f}, "
          f"vs no LoRA: {np.abs(drawn - base).mean():.2f}")
    # the same sum of weights, applied once when merging and on the fly by the built-in Lora: a float rounding apart
    assert np.abs(drawn - with_lora).mean() < 0.5 < np.abs(drawn - base).mean()
