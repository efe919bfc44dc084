#!/usr/bin/env bash
# From a bare clone: make the environment, build, then run the loss on the
# available device against the reference, printing agreement and time.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$PY" scripts/demo.py "$@"
