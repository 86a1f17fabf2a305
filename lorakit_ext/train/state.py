"""A resumable training state as a folder of safetensors + JSON, never a pickle (a state may come from anyone).

``tensors.lorakit-state`` (safetensors bytes under a name no Lora list picks up: a state folder may sit in the
WebUI's Lora folder) holds the network factors (``network.<module>.<suffix>``) and every tensor of the
optimizer state (``optimizer.<param index>.<key>``); ``state.json`` holds the rest: progress (epoch, step, the
position in the epoch's batch order), the optimizer's param groups and non-tensor state, the scheduler's state and
the config the run was started with. Data order, noise and timesteps are pure functions of (seed, epoch, step), so
a step count restores every random draw; no RNG state needs saving.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorakit_ext.errors import LorakitError, check_option
from lorakit_ext.formats import safetensors_io
from lorakit_ext.networks.network import Network

TENSORS_FILE = "tensors.lorakit-state"
STATE_FILE = "state.json"
STATE_VERSION = 1


@dataclass(frozen=True)
class Progress:
    """Where a run is: ``global_step`` optimizer steps done, ``epoch`` (0-based) under way and ``batch_group``
    optimizer steps of it already done (the position in the epoch's deterministic order)."""

    global_step: int
    epoch: int
    batch_group: int


def save_state(
    folder: str | Path,
    network: Network,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress,
    config: dict,
) -> Path:
    """Write the state folder (each file atomically; ``state.json`` last, so a folder with it is complete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"network.{name}.{suffix}": t.detach().cpu().contiguous() for name, suffix, t in _factors(network)}
    optimizer_state = optimizer.state_dict()
    scalars: dict[str, dict[str, object]] = {}
    for index, values in optimizer_state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    safetensors_io.save_tensors_atomic(folder / TENSORS_FILE, tensors)
    document = {
        "version": STATE_VERSION,
        "progress": asdict(progress),
        "optimizer": {"param_groups": _json_safe(optimizer_state["param_groups"]), "scalars": _json_safe(scalars)},
        "scheduler": _json_safe(scheduler.state_dict()),
        "config": config,
    }
    safetensors_io.write_atomic(folder / STATE_FILE, [json.dumps(document, indent=1).encode()])
    return folder


def check_state_folder(folder: str | Path) -> None:
    """Refuse a ``resume`` folder that is not a state folder, before training (``load_state`` reads it later)."""
    folder = Path(folder)
    check_option(folder.is_dir(), "resume", f"state folder {folder} not found")
    check_option((folder / STATE_FILE).is_file(), "resume:", f"{folder} is not a state folder (no {STATE_FILE})")


def load_state(
    folder: str | Path,
    network: Network,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    check_config: Callable[[dict], None] | None = None,
) -> tuple[Progress, dict]:
    """Restore network, optimizer and scheduler in place from a state folder; returns the progress and config.
    ``check_config`` sees the saved config first (and raises to refuse it) before anything is restored."""
    folder = Path(folder)
    try:
        document = json.loads((folder / STATE_FILE).read_text())
    except OSError:
        raise LorakitError(f"resume: {folder} is not a state folder (no {STATE_FILE})") from None
    except json.JSONDecodeError as error:
        raise LorakitError(f"resume: {folder / STATE_FILE} is not valid JSON ({error})") from None
    if document.get("version") != STATE_VERSION:
        raise LorakitError(f"resume: {folder} has state version {document.get('version')}, expected {STATE_VERSION}")
    if check_config is not None:
        check_config(document["config"])
    tensors = safetensors_io.load_tensors(folder / TENSORS_FILE)
    with torch.no_grad():
        for name, suffix, param in _factors(network):
            key = f"network.{name}.{suffix}"
            if key not in tensors or tensors[key].shape != param.shape:
                raise LorakitError(f"resume: {folder} does not match this network ({key})")
            param.copy_(tensors[key])
    states: dict[int, dict[str, object]] = {}
    for key, tensor in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            states.setdefault(int(index), {})[name] = tensor
    for index, values in document["optimizer"]["scalars"].items():
        states.setdefault(int(index), {}).update(values)
    try:
        optimizer.load_state_dict({"state": states, "param_groups": document["optimizer"]["param_groups"]})
    except (ValueError, KeyError) as error:
        raise LorakitError(f"resume: {folder} optimizer state does not fit ({error})") from None
    scheduler.load_state_dict(document["scheduler"])
    return Progress(**document["progress"]), document["config"]


def _factors(network: Network):
    for name, module in network.lora_modules.items():
        for suffix, tensor in module.weights().tensors.items():
            yield name, suffix, tensor


def _json_safe(value):
    """Param groups and scheduler state as JSON: numbers, strings, lists, None (tuples and tensors become lists)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise LorakitError(f"cannot save scheduler state value of type {type(value).__name__}")
