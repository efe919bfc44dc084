#!/usr/bin/env bash
# Makes the environment and builds focal_cuda into it, from a bare clone:
#   .venv with torch 2.15 (CUDA 13 build) and the test tools, then the
#   extension, CUDA kernels included whenever a CUDA toolkit is found (no GPU needed).
# Sourced by scripts/test.sh and scripts/bench.sh; safe to run again (skips what is done).
#
# Environment: FOCAL_CUDA_VENV (default .venv), PYTHON (default python3),
# FOCAL_CUDA_REQUIREMENTS (default requirements-dev.txt; .ci/requirements-oldest.txt: the oldest supported torch),
# CUDA_HOME (default: found), FOCAL_CUDA_CPU_ONLY=1 (skip the CUDA kernels),
# FOCAL_CUDA_REQUIRE_CUDA=1 (fail rather than build without them),
# TORCH_CUDA_ARCH_LIST (default: the visible GPUs, else sm_75..sm_120 + PTX), MAX_JOBS.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${FOCAL_CUDA_VENV:-$ROOT/.venv}
PYTHON_BIN=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON_BIN" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# Old pips turn an editable install of a setup.py project into an isolated
# `setup.py develop` that cannot see torch.
"$PY" -m pip install --quiet --disable-pip-version-check --upgrade "pip>=25"
REQUIREMENTS=${FOCAL_CUDA_REQUIREMENTS:-$ROOT/requirements-dev.txt}
echo "setup: installing torch and the test tools ($REQUIREMENTS)"
"$PY" -m pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS"

# A CUDA toolkit: CUDA_HOME, the usual places, or the directory a `nvcc` wrapper script execs.
find_cuda_home() {
  local candidates=()
  [ -n "${CUDA_HOME:-}" ] && candidates+=("$CUDA_HOME")
  candidates+=(/usr/local/cuda /usr/local/cuda-13* /opt/cuda)
  local nvcc
  if nvcc=$(command -v nvcc 2>/dev/null); then
    nvcc=$(readlink -f "$nvcc")
    candidates+=("$(dirname "$(dirname "$nvcc")")")
    if head -c 2 "$nvcc" | grep -q '#!'; then
      local target
      target=$(grep -oE '/[^ "]*/bin/nvcc' "$nvcc" | head -n 1 || true)
      [ -n "$target" ] && candidates+=("$(dirname "$(dirname "$target")")")
    fi
  fi
  local dir
  for dir in "${candidates[@]}"; do
    if [ -f "$dir/bin/nvcc" ] && [ -f "$dir/include/cuda_runtime.h" ] && ! head -c 2 "$dir/bin/nvcc" | grep -q '#!'; then
      echo "$dir"
      return 0
    fi
  done
  return 1
}

if [ "${FOCAL_CUDA_CPU_ONLY:-0}" = "1" ]; then
  export FORCE_CPU=1
  unset FORCE_CUDA || true
  echo "setup: FOCAL_CUDA_CPU_ONLY=1: building the CPU kernels only"
elif CUDA_HOME=$(find_cuda_home); then
  export CUDA_HOME FORCE_CUDA=1
  export PATH="$CUDA_HOME/bin:$PATH"
  echo "setup: CUDA toolkit at $CUDA_HOME: building the CUDA kernels too (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default})"
elif [ "${FOCAL_CUDA_REQUIRE_CUDA:-0}" = "1" ]; then
  echo "setup: FOCAL_CUDA_REQUIRE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)" >&2
  exit 1
else
  unset CUDA_HOME || true
  echo "setup: no CUDA toolkit found: building the CPU kernels only"
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

# Rebuild only when the sources or the build settings changed.
stamp_file="$VENV/.focal_cuda_build_stamp"
stamp=$( { cat "$ROOT/setup.py"; find "$ROOT/csrc" -type f | sort | xargs cat;
           echo "${FORCE_CUDA:-} ${FORCE_CPU:-} ${TORCH_CUDA_ARCH_LIST:-} ${CUDA_HOME:-}"; } | sha256sum | cut -d' ' -f1)
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && "$PY" -c "import focal_cuda" 2>/dev/null; then
  echo "setup: focal_cuda is built and up to date"
else
  echo "setup: building focal_cuda (MAX_JOBS=$MAX_JOBS; log in $VENV/focal_cuda_build.log)"
  start=$(date +%s)
  if ! (cd "$ROOT" && "$PY" -m pip install --disable-pip-version-check --no-build-isolation -v -e . \
        > "$VENV/focal_cuda_build.log" 2>&1); then
    tail -n 60 "$VENV/focal_cuda_build.log"
    echo "setup: build failed" >&2
    exit 1
  fi
  grep -E "^ *focal_cuda: " "$VENV/focal_cuda_build.log" | head -n 1 || true
  echo "setup: built in $(( $(date +%s) - start )) s"
  echo "$stamp" > "$stamp_file"
fi
"$PY" -c "import focal_cuda; print('setup: focal_cuda', focal_cuda.__version__, focal_cuda.build_info())"
