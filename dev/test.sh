#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up the environment, then run pytest. `.ci/run` runs exactly this.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="$(bash "$root/dev/setup-env.sh" | tail -n 1)"
cd "$root"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "$python" -m pytest -q "$@"
