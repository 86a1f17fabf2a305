#!/usr/bin/env bash
# Create (once) and update (when dev/requirements-test.txt changes) the virtual environment the tests and the CLI
# run in. Idempotent and fast when nothing changed. Prints the venv's python path on its last line.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${LORAKIT_VENV:-$HOME/.cache/lorakit/venv}"
# dev/host-stack-test.sh builds its venv the same way from dev/requirements-host.txt
requirements="${LORAKIT_REQUIREMENTS:-$root/dev/requirements-test.txt}"
stamp="$venv/.lorakit-requirements.sha256"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    # torch alone first: the CPU wheel; then everything else with torch pinned so nothing swaps it for a CUDA build.
    "$venv/bin/python" -m pip install -q "torch==2.13.0" >&2
    "$venv/bin/python" -m pip install -q -r "$requirements" >&2
    # The real `ldm` package the WebUI uses for SD1/SD2 (its own pins are years old, so no dependencies).
    "$venv/bin/python" -m pip install -q --no-deps stable-diffusion-sdkit >&2
    # open_clip (ldm's SD2/SDXL text encoders) without its torchvision/timm pins.
    "$venv/bin/python" -m pip install -q --no-deps open_clip_torch==3.3.0 >&2
    # pytorch-lightning 1.9 (the WebUI's pin, which ldm's imports need) wants pkg_resources: setuptools after torch.
    "$venv/bin/python" -m pip install -q "setuptools==69.5.1" >&2
    # ldm imports torchvision.utils; PyPI's torchvision (no deps: it would pull a CUDA torch) needs a CPU shim.
    "$venv/bin/python" -m pip install -q --no-deps "torchvision==0.28.0" >&2
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    cp "$root/dev/torchvision_cpu_shim.py" "$site/_lorakit_torchvision_cpu_shim.py"
    echo "import _lorakit_torchvision_cpu_shim" > "$site/_lorakit_torchvision_cpu_shim.pth"
    echo "$want" > "$stamp"
fi
# Browser tests drive Debian's Chromium through Playwright (never a downloaded browser).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq chromium) >&2
fi
echo "$venv/bin/python"
