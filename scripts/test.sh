#!/usr/bin/env bash
# From a bare clone: make the environment, build (CUDA kernels included when a
# toolkit is present), then run the test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$PY" -m pytest tests "$@"
