"""``python -m lorakit_ext ui``: the three tabs and the ``/lorakit/v1`` API on 127.0.0.1, outside the WebUI.

``StandaloneHost`` is the ``Host`` of this app: a model loaded once from ``--model`` (the toy model by default),
a Lora folder of its own (``--lora-dir``), a plain lock instead of the WebUI's queue, and the tab's own progress
bar. ``build_app`` returns the gradio app with the API routes added, for the verb and for tests.
"""

from __future__ import annotations

import argparse
import errno
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lorakit_ext.errors import LorakitError
from lorakit_ext.ui.host import Notice, ProgressView, unchanged_model

DEFAULT_PORT = 7870
MAX_PORT = 65535
OUTPUT_SUBFOLDER = "lorakit"


class StandaloneHost:
    """The standalone app's model, folders and lock (see the module docstring)."""

    title = "standalone"
    native_progress = False

    def __init__(self, lora_dir: Path, model: str | None = None):
        self.lora_dir = Path(lora_dir).resolve()
        self.model_path = model
        self._adapter = None
        self._lock = threading.Lock()
        self.last_progress: dict[str, ProgressView] = {}

    def notices(self) -> list[Notice]:
        model = self.model_path or "the toy model"
        return [Notice("info", f"Standalone mode: training on {model}; Lora files go to {self.lora_dir}.")]

    def lora_root(self) -> Path:
        return self.lora_dir

    def output_dir(self) -> Path:
        return self.lora_dir / OUTPUT_SUBFOLDER

    def list_networks(self) -> dict[str, Path]:
        if not self.lora_dir.is_dir():
            return {}
        return {path.stem: path for path in sorted(self.lora_dir.rglob("*.safetensors"))}

    def refresh_networks(self) -> None:
        """Nothing to do: ``list_networks`` reads the folder on every call."""

    def checkpoint_path(self) -> Path | None:
        from lorakit_ext.toy.model import CHECKPOINT_PATH

        return Path(self.model_path) if self.model_path else CHECKPOINT_PATH

    def checkpoint_output_dir(self) -> Path:
        return Path(self.model_path).resolve().parent if self.model_path else self.lora_dir.parent / "Stable-diffusion"

    def adapter(self):
        """The model, loaded on first use (so the page opens at once)."""
        if self._adapter is None:
            from lorakit_ext.train.cli import load_adapter

            self._adapter = load_adapter(self.model_path)
        return self._adapter

    @contextmanager
    def job_session(self, task_id: str, title: str, needs_model: bool) -> Iterator[Any]:
        with self._lock:
            if not needs_model:
                yield None
                return
            adapter = self.adapter()
            changed = f"{title}: the model's weights changed during the job; restart the app"
            # the whole model: an ldm LatentDiffusion holds the VAE too; a diffusers adapter keeps it beside
            whole = [adapter.model] if hasattr(adapter, "model") else [*adapter.components().values(), adapter.vae]
            with unchanged_model([m for m in whole if m is not None], changed):
                yield adapter

    def report(self, task_id: str, progress: ProgressView, preview: Any | None = None) -> None:
        self.last_progress[task_id] = progress

    def interrupted(self) -> bool:
        return False


def build_app(host: StandaloneHost):
    """The gradio Blocks (queued, so progress streams) with the ``/lorakit/v1`` routes; ``launch`` starts it."""
    import gradio as gr

    from lorakit_ext.ui.jobs import JobManager
    from lorakit_ext.ui.tabs import STYLE_PATH, LorakitTabs

    manager = JobManager(host)
    with gr.Blocks(title="LoRA Kit", analytics_enabled=False, css=STYLE_PATH.read_text()) as demo:
        with gr.Tabs():
            with gr.Tab("LoRA Kit"):
                LorakitTabs(host, manager).build()
    demo.queue(concurrency_count=4)
    demo.lorakit_manager = manager
    return demo


def launch(demo, port: int) -> str:
    """Start the server on 127.0.0.1 (in the background) and mount the API on its FastAPI app; returns the URL."""
    from lorakit_ext import api

    app, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, show_api=False,
                              quiet=True)
    api.mount(app, demo.lorakit_manager)
    return url


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="ldm checkpoint (.safetensors with its .yaml beside it); default: toy model")
    parser.add_argument("--lora-dir", type=Path, default=Path("Lora"), help="folder of Lora files (default ./Lora)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port on 127.0.0.1 (default {DEFAULT_PORT})")


def run(args: argparse.Namespace) -> int:
    from lorakit_ext.errors import writable_folder

    # what gradio's launch or the first job would fail on, refused before gradio starts and before any folder is made
    if not 1 <= args.port <= MAX_PORT:
        raise LorakitError(f"--port must be between 1 and {MAX_PORT}, got {args.port}")
    if args.model:
        check_model(Path(args.model))
    check_port_free(args.port)
    writable_folder(args.lora_dir, "--lora-dir")
    host = StandaloneHost(args.lora_dir, args.model)
    writable_folder(host.output_dir(), "--lora-dir")
    demo = build_app(host)
    url = launch(demo, args.port)
    print(f"LoRA Kit running at {url} (Lora folder {host.lora_root()}); Ctrl-C to quit", flush=True)
    demo.block_thread()
    return 0


def check_model(path: Path) -> None:
    """What loading ``--model`` on the first job needs, from the yaml's presence and the safetensors header alone (a
    few KB), so a LoRA or a checkpoint without its yaml is refused at start, not when the first job loads it."""
    from lorakit_ext.formats.safetensors_io import PICKLE_SUFFIXES, read_header
    from lorakit_ext.merge.checkpoint import checkpoint_arch

    if not path.is_file():
        raise LorakitError(f"--model {path}: no such file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LorakitError(f"--model {path}: not a .safetensors checkpoint (the only kind the app loads)")
    try:
        checkpoint_arch([key for key in read_header(path)[0] if key != "__metadata__"], path)
    except LorakitError as error:
        raise LorakitError(f"--model {error}") from None
    yaml = path.with_suffix(".yaml")
    if not yaml.is_file():
        raise LorakitError(f"--model {path}: the ldm config {yaml.name} must sit beside the checkpoint")


def check_port_free(port: int) -> None:
    """Bind the port as gradio does (127.0.0.1, SO_REUSEADDR), so a port in use is one line, not gradio's OSError."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise LorakitError(f"port {port} is in use: pick another with --port") from None
            raise LorakitError(f"--port {port}: cannot listen there ({error.strerror})") from None
