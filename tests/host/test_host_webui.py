"""LoRA Kit in a real, running AUTOMATIC1111 WebUI, driven over HTTP like sd-webui-controlnet's CI.

Give the WebUI with ``LORAKIT_WEBUI_DIR`` (its folder, with this extension installed under ``extensions/`` and the toy
checkpoint from ``python -m lorakit_ext toy export --to <dir>/models/Stable-diffusion`` loaded) and
``LORAKIT_WEBUI_URL`` (say http://127.0.0.1:7860, started with ``--api``). Without them every test is skipped and
says why. The tests train through ``/lorakit/v1``, then generate through ``/sdapi/v1/txt2img`` with the new
``<lora:name:w>`` and check the image changes with the weight, and run the X/Y/Z plot over the weight axis.
"""

from __future__ import annotations

import base64
import io
import os
import time
from pathlib import Path

import numpy as np
import pytest

WEBUI_DIR = os.environ.get("LORAKIT_WEBUI_DIR", "")
WEBUI_URL = os.environ.get("LORAKIT_WEBUI_URL", "").rstrip("/")
pytestmark = pytest.mark.skipif(
    not (WEBUI_DIR and WEBUI_URL),
    reason="no real WebUI given: set LORAKIT_WEBUI_DIR and LORAKIT_WEBUI_URL to run the real-host tests",
)


@pytest.fixture(scope="module")
def http():
    import httpx

    with httpx.Client(base_url=WEBUI_URL, timeout=600) as client:
        assert (Path(WEBUI_DIR) / "extensions").is_dir(), f"{WEBUI_DIR} is not a WebUI folder"
        yield client


def wait(http, job_id: str, timeout: float = 1800) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snapshot = http.get(f"/lorakit/v1/jobs/{job_id}").json()
        if snapshot["status"] in ("done", "stopped", "cancelled", "failed"):
            return snapshot
        time.sleep(2)
    raise AssertionError(f"job {job_id} still running after {timeout} s")


def txt2img(http, prompt: str, **extra) -> np.ndarray:
    from PIL import Image

    body = {"prompt": prompt, "seed": 1, "steps": 10, "width": 64, "height": 64, "sampler_name": "Euler", **extra}
    response = http.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).convert("RGB"))


@pytest.fixture(scope="module")
def trained(http, tmp_path_factory):
    from PIL import Image

    from lorakit_ext.toy import shapes

    data = tmp_path_factory.mktemp("data") / "4_circle"
    data.mkdir()
    for index, sample in enumerate(shapes.dataset(4, seed=5)):
        Image.fromarray(sample.image).save(data / f"{index}.png")
        (data / f"{index}.txt").write_text(sample.caption)
    response = http.post("/lorakit/v1/train", json={"train_data_dir": str(data.parent), "output_name": "host_toy",
                                                     "resolution": 64, "max_train_steps": 40, "learning_rate": 1e-3})
    assert response.status_code == 200, response.text
    snapshot = wait(http, response.json()["id"])
    assert snapshot["status"] == "done", snapshot["error"]
    return snapshot["result"]


def test_trained_lora_is_in_the_list_and_changes_the_image_with_weight(http, trained):
    assert "host_toy" in {item["name"] for item in http.get("/sdapi/v1/loras").json()}
    base = txt2img(http, "a red circle").astype(float)
    half = txt2img(http, "a red circle <lora:host_toy:0.5>").astype(float)
    full = txt2img(http, "a red circle <lora:host_toy:1>").astype(float)
    assert 0 < np.abs(half - base).mean() < np.abs(full - base).mean()


def test_xyz_plot_over_the_weight_axis(http, trained):
    scripts = http.get("/sdapi/v1/script-info").json()
    xyz = next(s for s in scripts if s["name"] == "x/y/z plot" and not s["is_img2img"])
    axis = next(i for i, choice in enumerate(xyz["args"][0]["choices"]) if choice == "[LoRA Kit] LoRA weight")
    args = [axis, "0, 0.5, 1", [], 0, "", [], 0, "", [], True, False, False, False, False, False, False, 0, False]
    image = txt2img(http, "a red circle <lora:host_toy:1>", script_name="x/y/z plot", script_args=args)
    assert image.shape[1] >= 3 * 64  # three columns, one per weight


def test_bad_dataset_folder_is_a_400_with_one_line(http):
    first = http.post("/lorakit/v1/train", json={"train_data_dir": "/nonexistent"})
    assert first.status_code == 400 and "train_data_dir" in first.json()["error"]
