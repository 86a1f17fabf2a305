#!/usr/bin/env bash
# The core's tests on the WebUI 1.10 era's library versions (dev/requirements-host.txt: accelerate 0.21,
# safetensors 0.3, transformers 4.30, pydantic 1), without diffusers, peft or gradio: what runs inside the host must
# run there. Creates (once) its own venv with dev/setup-env.sh, then runs the test files below. dev/test.sh runs it
# after the main suite.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="$(LORAKIT_VENV="${LORAKIT_HOST_VENV:-$HOME/.cache/lorakit/host-venv}" \
    LORAKIT_REQUIREMENTS="$root/dev/requirements-host.txt" bash "$root/dev/setup-env.sh" | tail -n 1)"
cd "$root"
# tests that need diffusers (the comparison against it) skip themselves or are deselected here
exec "$python" -m pytest -q -p no:cacheprovider \
    tests/test_networks_functional.py tests/test_networks_modules.py \
    tests/test_format_kohya.py tests/test_format_safetensors_io.py \
    tests/test_merge_algebra.py tests/test_merge_svd.py tests/test_merge_checkpoint.py \
    tests/test_train_config.py tests/test_train_state.py tests/test_train_job.py tests/test_train_dataset.py \
    tests/test_train_toy.py tests/test_slider_toy.py tests/test_sampling.py tests/test_host_stack.py \
    tests/test_toy_model.py --deselect tests/test_toy_model.py::test_diffusers_unet_gives_the_same_output "$@"
