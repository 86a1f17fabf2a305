#!/usr/bin/env bash
# The core's tests on the WebUI 1.10 era's library versions (dev/requirements-host.txt: accelerate 0.21,
# safetensors 0.3, transformers 4.30, pydantic 1), without diffusers, peft or gradio: what runs inside the host must
# run there. Creates (once) its own venv, then runs the test files below. dev/test.sh runs it after the main suite.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${LORAKIT_HOST_VENV:-$HOME/.cache/lorakit/host-venv}"
stamp="$venv/.lorakit-requirements.sha256"
want="$(cat "$root/dev/requirements-host.txt" "$root/dev/torchvision_cpu_shim.py" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$venv/bin/python" -m pip install -q "torch==2.13.0" >&2
    "$venv/bin/python" -m pip install -q -r "$root/dev/requirements-host.txt" >&2
    "$venv/bin/python" -m pip install -q --no-deps stable-diffusion-sdkit open_clip_torch==3.3.0 "torchvision==0.28.0" >&2
    "$venv/bin/python" -m pip install -q "setuptools==69.5.1" >&2
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    cp "$root/dev/torchvision_cpu_shim.py" "$site/_lorakit_torchvision_cpu_shim.py"
    echo "import _lorakit_torchvision_cpu_shim" > "$site/_lorakit_torchvision_cpu_shim.pth"
    echo "$want" > "$stamp"
fi
cd "$root"
# tests that need diffusers (the comparison against it) skip themselves or are deselected here
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_networks_functional.py tests/test_networks_modules.py \
    tests/test_format_kohya.py tests/test_format_safetensors_io.py \
    tests/test_merge_algebra.py tests/test_merge_svd.py tests/test_merge_checkpoint.py \
    tests/test_train_config.py tests/test_train_state.py tests/test_train_job.py tests/test_train_dataset.py \
    tests/test_train_toy.py tests/test_slider_toy.py tests/test_sampling.py tests/test_host_stack.py \
    tests/test_toy_model.py --deselect tests/test_toy_model.py::test_diffusers_unet_gives_the_same_output "$@"
