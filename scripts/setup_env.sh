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
REQUIREMENTS=${FOCAL_CUDA_REQUIREMENTS:-$ROOT/requirements-dev.txt}

# pip resolves every requirement again even when all are installed (about 20 s where it asks a
# remote index): skip it when the last successful install saw the same requirements-dev.txt,
# python and pip, and every requirement is still installed at a matching version (0.3 s).
pip_stamp_file="$VENV/.focal_cuda_pip_stamp"
pip_stamp() {
  { cat "$REQUIREMENTS"; "$PY" -c 'import sys; print(sys.version)'; "$PY" -m pip --version 2>/dev/null || true; } \
    | sha256sum | cut -d' ' -f1
}
requirements_installed() {
  "$PY" - "$REQUIREMENTS" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import PackageNotFoundError, version
from pip._vendor.packaging.requirements import Requirement

for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    req = Requirement(line)
    try:
        installed = version(req.name)
    except PackageNotFoundError:
        sys.exit(1)
    if not req.specifier.contains(installed, prereleases=True):
        sys.exit(1)
PYEOF
}
if [ -f "$pip_stamp_file" ] && [ "$(cat "$pip_stamp_file")" = "$(pip_stamp)" ] && requirements_installed; then
  echo "setup: torch and the test tools are installed ($REQUIREMENTS unchanged): skipping pip"
else
  # Old pips turn an editable install of a setup.py project into an isolated
  # `setup.py develop` that cannot see torch.
  "$PY" -m pip install --quiet --disable-pip-version-check --upgrade "pip>=25"
  echo "setup: installing torch and the test tools ($REQUIREMENTS)"
  "$PY" -m pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
  pip_stamp > "$pip_stamp_file"
fi

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

elapsed() {
  local s=$(( SECONDS - $1 ))
  printf '%dm%02ds' $(( s / 60 )) $(( s % 60 ))
}

# The sources a compiler is working on right now (ninja prints a step only when it ends).
compiling_now() {
  ps -eo args= 2>/dev/null | tr -s ' ' '\n' | grep -E '\.(cpp|cu)$' \
    | awk -v root="$ROOT/csrc/" 'index($0, root) == 1 { print substr($0, length(root) - 4) }' | sort -u | paste -sd' ' -
}

# Reads the build's output (pip -v: setup.py, ninja) and shows its progress: ninja's [n/N]
# step counter with the file each finished step compiled, the link, errors, and a status
# line with the elapsed time and what is being compiled (refreshed in place on a terminal,
# a line a minute otherwise).
show_build_progress() {
  local start=$1 line partial="" said="" done_steps="" every=60 last=$SECONDS tty=0 src status
  [ -t 1 ] && tty=1 && every=5
  while :; do
    if IFS= read -r -t "$every" line; then
      line=$partial$line
      partial=""
      [ $tty = 1 ] && printf '\r\033[K'
      case "${line#"${line%%[![:space:]]*}"}" in
        "focal_cuda: "*)
          # setup.py runs twice under pip (metadata, then the build): say it once
          [ "$line" = "$said" ] || echo "setup: ${line#*focal_cuda: }"
          said=$line ;;
        *"["[0-9]*/[0-9]*"] "*)
          done_steps=${line#*[}
          done_steps=${done_steps%%]*}
          src=$(grep -oE -- '-c [^ ]+\.(cpp|cu)' <<<"$line" | head -n 1 || true)
          src=${src#-c }
          echo "setup: [$done_steps] compiled ${src#"$ROOT"/} ($(elapsed "$start"))" ;;
        *" -shared "*" -o "*)
          echo "setup: linking ($(elapsed "$start"))" ;;
        *"error:"* | *"FAILED: "*)
          echo "setup: $line" ;;
      esac
      last=$SECONDS
    else
      [ $? -le 128 ] && break  # end of the output (a timeout returns > 128)
      partial+=$line
      [ $tty = 1 ] || [ $(( SECONDS - last )) -ge "$every" ] || continue
      status="setup: building, $(elapsed "$start") elapsed${done_steps:+, $done_steps steps done}"
      src=$(compiling_now || true)
      [ -n "$src" ] && status+="; compiling $src"
      if [ $tty = 1 ]; then printf '\r\033[K%s' "${status:0:$(( ${COLUMNS:-120} - 1 ))}"; else echo "$status"; fi
      last=$SECONDS
    fi
  done
  [ $tty = 1 ] && printf '\r\033[K'
  return 0
}

# Rebuild only when the sources or the build settings changed.
stamp_file="$VENV/.focal_cuda_build_stamp"
stamp=$( { cat "$ROOT/setup.py"; find "$ROOT/csrc" -type f | sort | xargs cat;
           echo "${FORCE_CUDA:-} ${FORCE_CPU:-} ${TORCH_CUDA_ARCH_LIST:-} ${CUDA_HOME:-}"; } | sha256sum | cut -d' ' -f1)
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && "$PY" -c "import focal_cuda" 2>/dev/null; then
  echo "setup: focal_cuda is built and up to date"
else
  build_log="$VENV/focal_cuda_build.log"
  echo "setup: building focal_cuda (MAX_JOBS=$MAX_JOBS); the full log goes to $build_log"
  start=$SECONDS
  if ! (cd "$ROOT" && "$PY" -m pip install --disable-pip-version-check --no-build-isolation -v -e . 2>&1) \
       | tee "$build_log" | show_build_progress "$start"; then
    tail -n 60 "$build_log"
    echo "setup: build failed after $(elapsed "$start") (full log: $build_log)" >&2
    exit 1
  fi
  echo "setup: built in $(elapsed "$start")"
  echo "$stamp" > "$stamp_file"
fi
"$PY" -c "import focal_cuda; print('setup: focal_cuda', focal_cuda.__version__, focal_cuda.build_info())"
