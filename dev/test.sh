#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up the environment, run pytest, then the core's tests again on the
# WebUI era's library versions (dev/host-stack-test.sh). `.ci/run` runs exactly this. With arguments, only pytest
# runs, with them (e.g. `bash dev/test.sh tests/test_merge_svd.py`).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="$(bash "$root/dev/setup-env.sh" | tail -n 1)"
cd "$root"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
if [ "$#" -gt 0 ]; then
    exec "$python" -m pytest -q "$@"
fi
"$python" -m pytest -q
exec bash "$root/dev/host-stack-test.sh"
