#!/usr/bin/env bash
# Set up the environment (once), then run `python -m lorakit_ext "$@"` in it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="$(bash "$root/dev/setup-env.sh" | tail -n 1)"
cd "$root"
exec "$python" -m lorakit_ext "$@"
