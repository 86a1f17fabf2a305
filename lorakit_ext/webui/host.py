"""``WebUIHost``: the AUTOMATIC1111 WebUI (1.7-1.10) as a lorakit ``Host``.

A job holds ``modules.call_queue.queue_lock`` from start to end, so generation waits; it trains the checkpoint
the WebUI has loaded (``shared.sd_model``) in place: the built-in Lora's patches are undone first, the attention
optimisations that have no backward are swapped out (as the WebUI's own embedding training does), and the weights'
checksum is compared after the job, whatever its outcome. ``--lowvram`` and fp8 weight storage are refused;
``--medvram`` keeps the UNet on the GPU for the job. Progress goes to ``shared.state`` and
``modules.progress`` under the page's ``id_task``, which is what the WebUI's progress bar polls.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lorakit_ext.errors import LorakitError
from lorakit_ext.ui.host import Notice, ProgressView, unchanged_model

OUTPUT_SUBFOLDER_OPTION = "lorakit_output_subfolder"
DEFAULT_OUTPUT_SUBFOLDER = "lorakit"
STEPS_PER_JOB = 1000  # the progress bar's resolution: sampling_step / sampling_steps


def detect_fork() -> str | None:
    """The name of a WebUI fork lorakit does not support yet, or None for AUTOMATIC1111's WebUI."""
    if importlib.util.find_spec("modules_forge") is not None:
        return "Stable Diffusion WebUI Forge"
    try:
        from modules import launch_utils

        tag = launch_utils.git_tag() or ""
    except Exception:  # an unknown fork may lack launch_utils; that alone is no reason to refuse
        return None
    return "Stable Diffusion WebUI Forge" if tag.startswith("f") and "v1." in tag else None


def builtin_lora():
    """The built-in Lora extension's ``networks`` module, or None when that extension is disabled."""
    module = sys.modules.get("networks")
    return module if module is not None and hasattr(module, "list_available_networks") else None


class WebUIHost:
    """See the module docstring. Every method reads the WebUI's state when called (it changes while it runs)."""

    title = "AUTOMATIC1111 WebUI"
    native_progress = True

    def __init__(self):
        # The task whose session holds the queue lock and has called ``state.begin()``; the WebUI's Interrupt
        # counts only then (``state.end()`` leaves ``interrupted`` set until the next ``begin()``).
        self._begun_task: str | None = None

    def notices(self) -> list[Notice]:
        from modules import shared

        fork = detect_fork()
        if fork:
            return [Notice("error", f"LoRA Kit does not support {fork} yet; use AUTOMATIC1111's WebUI 1.7-1.10.",
                           blocking=True)]
        notes = []
        if builtin_lora() is None:
            notes.append(Notice("warning", "The built-in Lora extension is disabled: training and merging work, "
                                           "but <lora:name:w> in prompts will not until you enable it."))
        if shared.cmd_opts.lowvram:
            notes.append(Notice("error", "Training is not possible with --lowvram; restart with --medvram or "
                                         "without either (merging still works)."))
        weights = next(iter(shared.sd_model.parameters()), None) if shared.sd_model is not None else None
        if weights is not None and weights.dtype in (torch.float16, torch.bfloat16):
            notes.append(Notice("info", f"The loaded checkpoint is in {str(weights.dtype).removeprefix('torch.')}: "
                                        "set mixed_precision (Training options) to fp16 or bf16 to train on it."))
        return notes

    def lora_root(self) -> Path:
        from modules import shared

        return Path(shared.cmd_opts.lora_dir).resolve()

    def output_dir(self) -> Path:
        from modules import shared

        from lorakit_ext.ui.paths import output_dir

        subfolder = getattr(shared.opts, OUTPUT_SUBFOLDER_OPTION, DEFAULT_OUTPUT_SUBFOLDER)
        return output_dir(self.lora_root(), subfolder or "", option=OUTPUT_SUBFOLDER_OPTION)

    def list_networks(self) -> dict[str, Path]:
        lora = builtin_lora()
        if lora is None:
            root = self.lora_root()
            return {p.stem: p for p in sorted(root.rglob("*.safetensors"))} if root.is_dir() else {}
        return {name: Path(entry.filename) for name, entry in lora.available_networks.items()}

    def refresh_networks(self) -> None:
        lora = builtin_lora()
        if lora is not None:
            lora.list_available_networks()

    def checkpoint_path(self) -> Path | None:
        from modules import shared

        info = getattr(shared.sd_model, "sd_checkpoint_info", None)
        return Path(info.filename) if info is not None else None

    def checkpoint_output_dir(self) -> Path:
        checkpoint = self.checkpoint_path()
        if checkpoint is None:
            raise LorakitError("no checkpoint is loaded in the WebUI")
        return checkpoint.parent

    @contextmanager
    def job_session(self, task_id: str, title: str, needs_model: bool) -> Iterator[Any]:
        from modules import call_queue, progress, shared

        progress.add_task_to_queue(task_id)
        with call_queue.queue_lock:
            shared.state.begin(job=f"lorakit: {title}")
            shared.state.job_count = 1
            shared.state.sampling_steps = STEPS_PER_JOB
            shared.state.textinfo = title
            progress.start_task(task_id)
            self._begun_task = task_id
            try:
                if needs_model:
                    with self._model_for_training(title) as adapter:
                        yield adapter
                else:
                    yield None
            finally:
                self._begun_task = None
                progress.finish_task(task_id)
                shared.state.end()

    @contextmanager
    def _model_for_training(self, title: str) -> Iterator[Any]:
        """The loaded model, cleared of the built-in Lora's patches, with backward-capable attention, restored
        (and checked by checksum) on exit."""
        from modules import devices, sd_hijack, shared

        from lorakit_ext.models.ldm import LdmAdapter
        from lorakit_ext.train.model_source import ModelSource

        if shared.cmd_opts.lowvram:
            raise LorakitError("training needs the whole model on the GPU: restart the WebUI without --lowvram")
        model = shared.sd_model
        if model is None:
            raise LorakitError("no checkpoint is loaded in the WebUI")
        if getattr(devices, "fp8", False) or any("float8" in str(p.dtype) for p in model.parameters()):
            raise LorakitError("training cannot use fp8 weight storage: set Settings > Optimizations > FP8 weight "
                               "to Disable and reload the checkpoint")
        self._undo_lora_patches(model)
        adapter = LdmAdapter(model)
        info = getattr(model, "sd_checkpoint_info", None)
        if info is not None:  # the name and the hash the WebUI shows, for the trained files' ss_sd_model_* fields
            calculate = getattr(info, "calculate_shorthash", None)  # the WebUI's cached hashing, else ours once
            known_hash = getattr(info, "shorthash", None) or (calculate() if calculate else None)
            adapter.source = ModelSource(info.filename, known_hash)
        swap_attention = not getattr(shared.opts, "training_xattention_optimizations", False)
        # --medvram: the WebUI's hooks move each part to the GPU when its wrapper runs; training calls the UNet
        # directly, so it is put there for the job (text encoder and VAE still move by their hooks).
        medvram = bool(getattr(model, "lowvram", False))
        changed = f"{title}: the checkpoint's weights changed; reload it (Settings > Actions)"
        with unchanged_model([model], changed):  # the whole model: UNet, text encoder(s) and VAE
            if swap_attention:
                sd_hijack.undo_optimizations()
            if medvram:
                adapter.unet.to(devices.device)
            try:
                yield adapter
            finally:
                if swap_attention:
                    sd_hijack.apply_optimizations()
                if medvram:
                    from modules import lowvram

                    adapter.unet.to(devices.cpu)
                    lowvram.send_everything_to_cpu()  # forget which part is on the GPU, so the next use moves it
                devices.torch_gc()

    @staticmethod
    def _undo_lora_patches(model) -> None:
        """Put back the weights the built-in Lora patched in and forget its loaded networks, so training sees the
        bare checkpoint (the next generation re-applies whatever its prompt asks for)."""
        lora = builtin_lora()
        if lora is None:
            return
        with torch.no_grad():  # the WebUI restores in place, as its own generation does under no_grad
            for module in model.modules():
                if getattr(module, "network_current_names", ()):
                    lora.network_restore_weights_from_backup(module)
                    lora.network_reset_cached_weight(module)
        lora.loaded_networks.clear()

    def report(self, task_id: str, progress: ProgressView, preview: Any | None = None) -> None:
        from modules import shared

        shared.state.sampling_step = round(progress.fraction * STEPS_PER_JOB)
        shared.state.textinfo = progress.text
        if preview is not None:
            shared.state.assign_current_image(preview)

    def interrupted(self) -> bool:
        """The WebUI's Interrupt, pressed since our job's ``state.begin()`` (an Interrupt of a generation before it,
        or of the one it waited for, is not ours)."""
        from modules import shared

        return self._begun_task is not None and bool(shared.state.interrupted)
