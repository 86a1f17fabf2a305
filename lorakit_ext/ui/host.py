"""``Host``: the few things the tabs, the job manager and the HTTP API need from whoever serves them.

Two hosts exist: the AUTOMATIC1111 WebUI (``lorakit_ext.webui.host``) and the standalone app
(``lorakit_ext.ui.standalone``). Everything a host does differently (which model, which lock, which progress bar,
where Lora files live, how the Lora list refreshes) is here, so the tabs and routes never branch on the host.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from lorakit_ext.errors import LorakitError
from lorakit_ext.models.base import ModelAdapter


@dataclass(frozen=True)
class Notice:
    """A line the tab shows above its controls. ``blocking`` notices disable the whole tab (unsupported fork)."""

    level: Literal["error", "warning", "info"]
    message: str
    blocking: bool = False


@dataclass(frozen=True)
class ProgressView:
    """One progress update as every front end shows it (the WebUI's bar, our own bar, the HTTP API)."""

    fraction: float  # 0..1
    text: str  # one line: "step 12/40, epoch 1/2, loss 0.1234, lr 1.0e-04"
    step: int = 0
    total: int = 0


class Host(Protocol):
    """What a front end needs from the program it runs in."""

    title: str  # "AUTOMATIC1111 WebUI v1.10.1", "standalone"
    # True when the host draws its own progress bar from ``report`` (the WebUI's requestProgress), so the tab
    # does not draw a second one.
    native_progress: bool

    def notices(self) -> list[Notice]:
        """What the user should know before starting anything (unsupported fork, Lora extension disabled, ...)."""
        ...

    def lora_root(self) -> Path:
        """The folder every output must stay under (the WebUI's ``--lora-dir``)."""
        ...

    def output_dir(self) -> Path:
        """The default folder for new files, under ``lora_root()``."""
        ...

    def list_networks(self) -> dict[str, Path]:
        """Network files the host can use, by the name ``<lora:name:w>`` takes."""
        ...

    def refresh_networks(self) -> None:
        """Make newly written files usable at once (the WebUI's Lora list), without a restart."""
        ...

    def checkpoint_path(self) -> Path | None:
        """The file of the checkpoint the host has loaded (for merge-into), or None."""
        ...

    def checkpoint_output_dir(self) -> Path:
        """Where merge-into writes new checkpoints (the WebUI: beside the loaded one, where it lists them)."""
        ...

    def job_session(self, task_id: str, title: str, needs_model: bool) -> AbstractContextManager[ModelAdapter | None]:
        """Exclusive use of the host for one job: waits for generation to finish, holds it off while the job runs,
        and (``needs_model``) yields an adapter over the loaded model, restored exactly on exit whatever happens."""
        ...

    def report(self, task_id: str, progress: ProgressView, preview: Any | None = None) -> None:
        """Mirror a job's progress (and the newest sample image, a PIL image) into the host's own display."""
        ...

    def interrupted(self) -> bool:
        """True when the host's own Interrupt was pressed during the current job."""
        ...


def model_checksum(modules) -> str:
    """A fingerprint of every parameter and buffer of ``modules`` (per tensor: sum and sum of squares in float64,
    computed where the tensor lives), to prove a job left the host's model exactly as it found it."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for module in modules:
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                values = tensor.detach().double()
                stats = torch.stack([values.sum(), (values * values).sum()]).cpu()
                digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
                digest.update(stats.numpy().tobytes())
    return digest.hexdigest()


class ModelChanged(LorakitError):
    """A job left the host's model different from how it found it (a bug; the model should be reloaded)."""


@contextmanager
def unchanged_model(modules, problem: str) -> Iterator[None]:
    """Checksum ``modules`` before and after the block; ``ModelChanged(problem)`` when they differ. When the block
    itself failed, that error is named in the same message and chained, so neither hides the other."""
    before = model_checksum(modules)
    try:
        yield
    except Exception as error:
        if model_checksum(modules) != before:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ModelChanged(f"{problem} (the job itself ended with: {first})") from error
        raise
    if model_checksum(modules) != before:
        raise ModelChanged(problem)
