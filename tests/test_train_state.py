"""Resumable state folders: safetensors + JSON, exact round trip of network, optimizer and scheduler."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from torch import nn

from lorakit_ext.errors import LorakitError
from lorakit_ext.models.base import Target
from lorakit_ext.networks.network import NetworkSpec, create_network
from lorakit_ext.train.optim import build_optimizer, build_scheduler
from lorakit_ext.train.state import STATE_FILE, TENSORS_FILE, Progress, load_state, save_state


def _setup(optimizer_type: str, seed: int = 0):
    torch.manual_seed(seed)
    host = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    targets = [Target(f"lora_unet_l{i}", layer, "unet", "transformer") for i, layer in enumerate(host)]
    network = create_network(targets, NetworkSpec(dim=2, alpha=1.0)).attach()
    optimizer = build_optimizer(optimizer_type, [{"params": list(network.parameters())}], 1e-2, [])
    scheduler = build_scheduler("cosine", optimizer, 2, 10)
    return host, network, optimizer, scheduler


def _steps(host, optimizer, scheduler, count: int):
    for step in range(count):
        torch.manual_seed(100 + step)
        loss = host(torch.randn(3, 6)).pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


PRODIGY = pytest.param(
    "Prodigy",
    marks=pytest.mark.skipif(
        importlib.util.find_spec("prodigyopt") is None, reason="prodigyopt is not installed (install.py adds it)"
    ),
)


@pytest.mark.parametrize("optimizer_type", ["AdamW", PRODIGY])
def test_resumed_state_continues_bit_for_bit(tmp_path, optimizer_type):
    host, network, optimizer, scheduler = _setup(optimizer_type)
    _steps(host, optimizer, scheduler, 3)
    save_state(tmp_path / "s", network, optimizer, scheduler, Progress(3, 1, 2), {"seed": 1})
    _steps(host, optimizer, scheduler, 4)
    expected = {k: v.clone() for k, v in network.state_dict().items()}

    host2, network2, optimizer2, scheduler2 = _setup(optimizer_type, seed=5)  # different init: all comes from the state
    progress, config = load_state(tmp_path / "s", network2, optimizer2, scheduler2)
    assert progress == Progress(3, 1, 2) and config == {"seed": 1}
    with torch.no_grad():  # the host weights are the model's, not part of the state
        for a, b in zip(host.parameters(), host2.parameters()):
            b.copy_(a)
    _steps(host2, optimizer2, scheduler2, 4)
    for key, value in network2.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()


def test_state_is_safetensors_and_json_only(tmp_path):
    host, network, optimizer, scheduler = _setup("AdamW")
    _steps(host, optimizer, scheduler, 1)
    folder = save_state(tmp_path / "s", network, optimizer, scheduler, Progress(1, 0, 1), {})
    assert sorted(p.name for p in folder.iterdir()) == sorted([STATE_FILE, TENSORS_FILE])
    # a state folder may sit in the WebUI's Lora folder, which lists every *.safetensors in it as a LoRA
    assert not [p for p in folder.rglob("*") if p.suffix in {".safetensors", ".pt", ".ckpt"}]
    document = json.loads((folder / STATE_FILE).read_text())
    assert document["progress"] == {"global_step": 1, "epoch": 0, "batch_group": 1}


def test_mismatched_or_missing_state_is_refused(tmp_path):
    host, network, optimizer, scheduler = _setup("AdamW")
    with pytest.raises(LorakitError, match="is not a state folder"):
        load_state(tmp_path, network, optimizer, scheduler)
    save_state(tmp_path / "s", network, optimizer, scheduler, Progress(0, 0, 0), {})
    other = nn.Linear(6, 7)
    bigger = create_network([Target("lora_unet_l0", other, "unet", "transformer")], NetworkSpec(dim=2)).attach()
    opt = build_optimizer("AdamW", [{"params": list(bigger.parameters())}], 1e-2, [])
    with pytest.raises(LorakitError, match="does not match this network"):
        load_state(tmp_path / "s", bigger, opt, build_scheduler("constant", opt, 0, 1))
