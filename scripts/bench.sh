#!/usr/bin/env bash
# From a bare clone: make the environment, build (CUDA kernels included when a
# toolkit is present), then run the bench suite on the available device (CUDA if
# present, else CPU). Extra arguments go to `python -m bench` (see --help).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$PY" -m bench "$@"
