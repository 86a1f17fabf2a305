"""The core must run inside the WebUI, whose environment has no diffusers or peft and an old transformers: importing
the code the WebUI path uses must not pull any of them in (they are CLI and test extras only)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# every core module the WebUI path imports; models.diffusers_adapter and toy.* are CLI/test-only
WEBUI_PATH_MODULES = [
    "lorakit_ext.cli",
    "lorakit_ext.errors",
    "lorakit_ext.networks.functional",
    "lorakit_ext.networks.weights",
    "lorakit_ext.networks.modules",
    "lorakit_ext.networks.network",
    "lorakit_ext.formats.safetensors_io",
    "lorakit_ext.formats.kohya",
    "lorakit_ext.formats.info",
    "lorakit_ext.models.base",
    "lorakit_ext.models.naming",
    "lorakit_ext.models.configs",
    "lorakit_ext.models.targets",
    "lorakit_ext.models.ldm",
    "lorakit_ext.sampling",
]
EXTRAS = ("diffusers", "peft", "transformers")


def test_core_modules_import_without_the_cli_extras():
    code = (
        "import importlib, sys\n"
        f"for module in {WEBUI_PATH_MODULES!r}:\n"
        "    importlib.import_module(module)\n"
        f"    extras = [m for m in {EXTRAS!r} if m in sys.modules]\n"
        "    if extras:\n"
        "        sys.exit(f'{module} imports {extras}')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
