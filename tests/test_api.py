"""The /lorakit/v1 routes over the standalone host: merge jobs end to end, 409, 404, path validation."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from fastapi import FastAPI

from lorakit_ext import api
from lorakit_ext.formats.kohya import load_network, save_network
from lorakit_ext.networks.weights import ModuleWeights, NetworkWeights
from lorakit_ext.ui.jobs import JobManager, Operation
from lorakit_ext.ui.standalone import StandaloneHost

torch.set_num_threads(1)
ATTN = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_q"
TEXT = "lora_te_text_model_encoder_layers_0_mlp_fc1"


def tiny_lora(seed: int, rank: int = 4) -> NetworkWeights:
    g = torch.Generator().manual_seed(seed)
    modules = {
        name: ModuleWeights(
            {"lora_down.weight": torch.randn(rank, inp, generator=g) * 0.1,
             "lora_up.weight": torch.randn(out, rank, generator=g) * 0.1},
            alpha=rank / 2,
        )
        for name, out, inp in ((ATTN, 64, 64), (TEXT, 256, 64))  # the toy model's shapes
    }
    return NetworkWeights(modules)


@pytest.fixture
def client(tmp_path):
    """An HTTP client to the routes served on 127.0.0.1 (starlette's TestClient does not match this httpx)."""
    host = StandaloneHost(tmp_path / "Lora")
    (tmp_path / "Lora").mkdir()
    for seed, name in ((1, "first"), (2, "second")):
        save_network(tmp_path / "Lora" / f"{name}.safetensors", tiny_lora(seed), dtype=torch.float32)
    manager = JobManager(host)
    app = FastAPI()
    api.mount(app, manager)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        yield http, manager, tmp_path
    server.should_exit = True
    thread.join(10)


def wait_done(http, job_id, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snapshot = http.get(f"/lorakit/v1/jobs/{job_id}").json()
        if snapshot["status"] in ("done", "stopped", "cancelled", "failed"):
            return snapshot
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {snapshot}")


def test_merge_job_writes_under_the_lora_folder(client):
    http, _, tmp_path = client
    response = http.post("/lorakit/v1/merge", json={"models": ["first", "second"], "ratios": [1, -1],
                                                    "output_name": "diff", "save_precision": "float"})
    assert response.status_code == 200, response.text
    snapshot = wait_done(http, response.json()["id"])
    assert snapshot["status"] == "done", snapshot["error"]
    output = tmp_path / "Lora" / "lorakit" / "diff.safetensors"
    assert snapshot["result"]["output"] == str(output.resolve())
    assert len(snapshot["result"]["hash"]) == 12 and snapshot["result_line"].startswith("Saved ")
    merged, first, second = (load_network(p) for p in (output, tmp_path / "Lora" / "first.safetensors",
                                                        tmp_path / "Lora" / "second.safetensors"))
    shape = (64, 64)
    expected = first.modules[ATTN].delta(shape) - second.modules[ATTN].delta(shape)
    torch.testing.assert_close(merged.modules[ATTN].delta(shape), expected, rtol=1e-5, atol=1e-6)
    assert "diff" in http.get("/lorakit/v1/networks").json()
    assert [j["id"] for j in http.get("/lorakit/v1/jobs").json()] == [response.json()["id"]]


def test_resize_reports_retained_energy(client):
    http, _, tmp_path = client
    response = http.post("/lorakit/v1/merge", json={"mode": "resize", "models": ["first"], "new_rank": 2,
                                                    "output_name": "small"})
    snapshot = wait_done(http, response.json()["id"])
    assert snapshot["status"] == "done", snapshot["error"]
    result = snapshot["result"]
    assert result["rank_max"] == 2 and 0 < result["retained_energy"] < 1
    assert result["retained_energy"] == pytest.approx(1 - result["relative_error"] ** 2, abs=1e-5)


def test_second_job_is_409_and_stop_works(client):
    http, manager, _ = client
    started = threading.Event()

    def run(adapter, report, token):
        started.set()
        while not token.stop_requested:
            report(step=1, total=10)
            time.sleep(0.02)
        return {"files": []}

    record = manager.submit(Operation("train", "long job", run, needs_model=False))
    started.wait(5)
    response = http.post("/lorakit/v1/merge", json={"models": ["first"], "output_name": "x"})
    assert response.status_code == 409 and "long job is running" in response.json()["error"]
    stopped = http.post(f"/lorakit/v1/jobs/{record.id}/stop")
    assert stopped.status_code == 200
    assert wait_done(http, record.id)["status"] == "stopped"
    assert http.get("/lorakit/v1/jobs/task(nope)").status_code == 404


@pytest.mark.parametrize(
    "body, message",
    [
        ({"models": ["first"], "output_name": "x", "output_dir": "../../outside"}, "outside the Lora folder"),
        ({"models": ["/no/such/file.safetensors"], "output_name": "x"}, "models: /no/such/file.safetensors"),
        ({"models": ["first"], "output_name": " .. "}, "output_name"),
        ({"models": ["first"], "frobnicate": 1}, "unknown option 'frobnicate'"),
        ({"mode": "resize", "models": ["first"]}, "new_rank"),
        ({"models": ["first", "second"], "output_name": "second", "output_dir": "."}, "is one of the inputs (models)"),
        ({"mode": "resize", "models": ["first"], "new_rank": 1, "output_name": "first", "output_dir": "."},
         "is one of the inputs (models)"),
    ],
)
def test_merge_input_errors_are_400_with_one_line(client, body, message):
    http, manager, tmp_path = client
    response = http.post("/lorakit/v1/merge", json=body)
    assert response.status_code == 400 and message in response.json()["error"]
    assert "\n" not in response.json()["error"]
    assert manager.running() is None
    assert not (tmp_path / "outside").exists()


def test_sanitized_names_stay_in_the_folder(client):
    http, _, tmp_path = client
    response = http.post("/lorakit/v1/merge", json={"models": ["first"], "output_name": "a/../../b"})
    snapshot = wait_done(http, response.json()["id"])
    assert snapshot["status"] == "done"
    assert (tmp_path / "Lora" / "lorakit" / "a_.._.._b.safetensors").is_file()


def test_train_and_slider_input_errors(client):
    http, _, tmp_path = client
    response = http.post("/lorakit/v1/train", json={"train_data_dir": str(tmp_path), "output_dir": "/etc"})
    assert response.status_code == 400 and "outside the Lora folder" in response.json()["error"]
    response = http.post("/lorakit/v1/train", json={"learning_rat": 1})
    assert response.status_code == 400 and "did you mean 'learning_rate'" in response.json()["error"]
    response = http.post("/lorakit/v1/train", json={"pretrained_model_name_or_path": "x.safetensors"})
    assert response.status_code == 400 and "pretrained_model_name_or_path" in response.json()["error"]
    response = http.post("/lorakit/v1/copier", json={"b": str(tmp_path)})
    assert response.status_code == 400 and response.json()["error"] == "a: no folder given"
    response = http.post("/lorakit/v1/difference", json={"a": str(tmp_path), "b": str(tmp_path / "nope")})
    assert response.status_code == 400 and "b: " in response.json()["error"]


def test_slider_routes_take_the_methods_own_options(client):
    from lorakit_ext.slider.demo import toy_pair_set

    http, _, tmp_path = client
    toy_pair_set(tmp_path / "pairs", ("white",))
    pairs = {"a": str(tmp_path / "pairs" / "A"), "b": str(tmp_path / "pairs" / "B"), "report": False,
             "max_train_steps": 2}
    response = http.post("/lorakit/v1/difference", json={**pairs, "ensemble": 2, "verify_seeds": 1})
    assert response.status_code == 400
    assert response.json()["error"] == "ensemble: an option of the copier method, not of difference"
    response = http.post("/lorakit/v1/difference", json={**pairs, "anchor": 1e-3})
    assert response.status_code == 400 and "add --b-from-a" in response.json()["error"]
    response = http.post("/lorakit/v1/copier", json={**pairs, "ensemble": "two"})
    assert response.status_code == 400 and response.json()["error"] == "ensemble: expected int, got 'two'"
    response = http.post("/lorakit/v1/copier", json={**pairs, "ensemble": 2.0, "verify_seeds": 1,
                                                      "output_name": "two_runs", "train_batch_size": 1,
                                                      "save_every_n_epochs": 1})  # one pair: 1 step an epoch
    snapshot = wait_done(http, response.json()["id"], timeout=300)
    assert snapshot["status"] == "done", snapshot
    output = Path(snapshot["result"]["output"])
    assert load_network(output).metadata["lorakit_slider_ensemble"] == "2"
    # the job's files: the average of the runs' epoch-1 saves, then the final average
    assert snapshot["result"]["files"] == [str(output.with_name("two_runs-000001.safetensors")), str(output)]

    # LoRA A kept under a name of its own, then reused from the Lora list by that name
    response = http.post("/lorakit/v1/copier", json={**pairs, "verify_seeds": 1, "output_name": "first",
                                                      "keep_a": "first_a"})
    snapshot = wait_done(http, response.json()["id"], timeout=300)
    kept = Path(snapshot["result"]["output"]).with_name("first_a.safetensors")
    assert snapshot["status"] == "done" and kept.is_file(), snapshot
    assert snapshot["result"]["files"] == [str(kept), snapshot["result"]["output"]]  # the job lists A it kept
    response = http.post("/lorakit/v1/copier", json={**pairs, "verify_seeds": 1, "output_name": "second",
                                                      "reuse_a": "first_a"})
    snapshot = wait_done(http, response.json()["id"], timeout=300)
    assert snapshot["status"] == "done", snapshot
    source = json.loads(load_network(snapshot["result"]["output"]).metadata["lorakit_slider_a"])
    assert source == {"file": kept.name, "sshs_model_hash": load_network(kept).metadata["sshs_model_hash"]}
    response = http.post("/lorakit/v1/difference", json={**pairs, "reuse_a": "nope"})
    assert response.status_code == 400 and response.json()["error"] == "reuse_a: nope does not exist"
    response = http.post("/lorakit/v1/copier", json={**pairs, "output_name": "first_a", "reuse_a": "first_a"})
    assert response.status_code == 400  # the save would replace the A the slider was trained over
    assert response.json()["error"] == "reuse_a: first_a.safetensors is the slider's own file; give the slider another name"
    response = http.post("/lorakit/v1/copier", json={**pairs, "output_name": "same", "keep_a": "same"})
    assert response.status_code == 400 and response.json()["error"].startswith("keep_a: same.safetensors is the")


def test_merge_into_writes_a_new_checkpoint_beside_the_models(client):
    import safetensors.torch

    from lorakit_ext.toy.model import CHECKPOINT_PATH

    http, _, tmp_path = client
    response = http.post("/lorakit/v1/merge", json={"mode": "merge_into", "models": ["first"], "ratios": [0.5],
                                                    "output_name": "toy_plus_first", "save_precision": "float"})
    snapshot = wait_done(http, response.json()["id"])
    assert snapshot["status"] == "done", snapshot["error"]
    written = tmp_path / "Stable-diffusion" / "toy_plus_first.safetensors"
    assert snapshot["result"]["output"] == str(written)
    before, after = safetensors.torch.load_file(CHECKPOINT_PATH), safetensors.torch.load_file(written)
    changed = [key for key in before if not torch.equal(before[key].float(), after[key].float())]
    assert len(changed) == 2 and snapshot["result"]["weights_changed"] == 2
    config = written.with_suffix(".yaml")  # the WebUI builds a checkpoint from the config beside it
    assert config.read_bytes() == CHECKPOINT_PATH.with_suffix(".yaml").read_bytes()
    assert snapshot["result"]["files"] == [str(written), str(config)]


ROUTES = ("train", "copier", "difference", "slider", "merge", "dataset")


@pytest.mark.parametrize(
    "content, content_type, message",
    [
        ("{bad json", "application/json",
         "the request body is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 "
         "(char 1)"),
        ("[1,2]", "application/json", "the request body must be a JSON object"),
        ('"str"', "application/json", "the request body must be a JSON object"),
        ("null", "application/json", "the request body must be a JSON object"),
        ("", "application/json", "the request body must be a JSON object"),
        ('[["train_data_dir","/x"],["resolution",64]]', "application/json", "the request body must be a JSON object"),
        ('{"models": ["first"]}', "text/plain",
         "the request body must be a JSON object (Content-Type: application/json)"),
    ],
)
def test_bodies_must_be_json_objects(client, content, content_type, message):
    http, manager, _ = client
    for route in ROUTES:
        response = http.post(f"/lorakit/v1/{route}", content=content, headers={"Content-Type": content_type})
        assert (response.status_code, response.json()) == (400, {"error": message}), route
    assert manager.records() == []


def test_stop_refuses_a_cancel_that_is_not_a_flag_and_long_ids_are_cut(client):
    http, manager, _ = client
    record = manager.submit(Operation("merge", "quick job", lambda adapter, report, token: {"files": []},
                                      needs_model=False))
    response = http.post(f"/lorakit/v1/jobs/{record.id}/stop", params={"cancel": "maybe"})
    assert (response.status_code, response.json()) == (400, {"error": "cancel: expected true or false, got 'maybe'"})
    assert wait_done(http, record.id)["status"] == "done"
    assert http.post(f"/lorakit/v1/jobs/{record.id}/stop", params={"cancel": "true"}).status_code == 200
    response = http.get("/lorakit/v1/jobs/" + "x" * 10000)
    assert (response.status_code, response.json()) == (404, {"error": "no job " + "x" * 40 + "..."})
    body = http.get("/openapi.json").json()["paths"]["/lorakit/v1/merge"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["type"] == "object"


@pytest.mark.parametrize(
    "body, message",
    [
        ('{"models": null}', "models: expected a list of str, got None"),
        ('{"models": [1]}', "models: expected str, got 1"),
        ('{"models": "nd4"}', "models: expected a list of str, got 'nd4'"),
        ('{"models": ["first"], "new_rank": "2"}', "new_rank: expected int, got '2'"),
        ('{"models": ["first"], "new_rank": 2.5}', "new_rank: expected int, got 2.5"),
        ('{"models": ["first"], "new_rank": NaN}', "new_rank: nan is not a finite number"),
        ('{"models": ["first"], "new_rank": Infinity}', "new_rank: inf is not a finite number"),
        ('{"models": ["first"], "new_rank": true}', "new_rank: expected int, got True"),
        ('{"models": ["first"], "clamp_quantile": "0.5"}', "clamp_quantile: expected float, got '0.5'"),
        ('{"models": ["first"], "dynamic": 5}', "dynamic: expected str, got 5"),
        ('{"models": ["first"], "output_name": null}', "output_name: expected str, got None"),
        ('{"models": ["first"], "output_dir": 5}', "output_dir: expected str, got 5"),
        ('{"mode": "extract", "base": null, "tuned": 5}', "base: expected str, got None"),
        ('{"models": ["first"], "ratios": "1"}', "ratios: expected a list of float, got '1'"),
        ('{"models": ["first"], "ratios": [NaN]}', "ratios: nan is not a finite number"),
        ('{"models": ["' + "x" * 100 + '", 2]}', "models: expected str, got 2"),
        ('{"dynamic": ["' + "x" * 100 + '"]}', "dynamic: expected str, got ['" + "x" * 38 + "..."),  # cut
    ],
)
def test_merge_fields_are_type_checked(client, body, message):
    http, manager, _ = client
    response = http.post("/lorakit/v1/merge", content=body, headers={"Content-Type": "application/json"})
    assert (response.status_code, response.json()) == (400, {"error": message})
    assert manager.records() == []


@pytest.fixture
def pairs(client):
    from lorakit_ext.slider.demo import toy_pair_set

    _, _, tmp_path = client
    toy_pair_set(tmp_path / "pairs", ("white",))
    return {"a": str(tmp_path / "pairs" / "A"), "b": str(tmp_path / "pairs" / "B"), "report": False,
            "max_train_steps": 1}


@pytest.mark.parametrize(
    "route, options, message",
    [
        ("copier", '"ensemble": Infinity', "ensemble: inf is not a finite number"),
        ("copier", '"ensemble": NaN', "ensemble: nan is not a finite number"),
        ("copier", '"verify_seeds": 1e400', "verify_seeds: inf is not a finite number"),
        ("difference", '"rank": Infinity', "rank: inf is not a finite number"),
        ("copier", '"masked": "false"', "masked: expected bool, got 'false'"),
        ("difference", '"report": "false"', "report: expected bool, got 'false'"),
        ("copier", '"output_name": null', "output_name: expected str, got None"),
        ("difference", '"output_name": ["x"]', "output_name: expected str, got ['x']"),
        ("copier", '"reuse_a": "first", "keep_a": "kept"',
         "keep_a: A is reused (reuse_a), so there is no trained A to keep"),
        ("slider", '"ensemble": 2', "ensemble: an option of the copier method, not of paired"),
        ("slider", '"weight": -1', "--weight must be a positive number, got -1.0"),
    ],
)
def test_slider_options_are_type_checked(client, pairs, route, options, message):
    http, manager, _ = client
    body = json.dumps(pairs)[:-1] + ", " + options + "}"
    response = http.post(f"/lorakit/v1/{route}", content=body, headers={"Content-Type": "application/json"})
    assert (response.status_code, response.json()) == (400, {"error": message})
    assert manager.records() == []


def test_slider_route_trains_the_paired_method(client, pairs):
    http, _, _ = client
    response = http.post("/lorakit/v1/slider", json={**pairs, "weight": 2, "output_name": "paired"})
    snapshot = wait_done(http, response.json()["id"], timeout=300)
    assert snapshot["status"] == "done", snapshot
    output = Path(snapshot["result"]["output"])
    assert output.name == "paired.safetensors" and snapshot["result"]["files"] == [str(output)]
    metadata = load_network(output).metadata
    assert metadata["lorakit_slider_method"] == "paired" and metadata["lorakit_slider_weight"] == "2.0"
