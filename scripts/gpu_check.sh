#!/usr/bin/env bash
# Checks focal_cuda on this machine's GPU in one command, with the torch already installed here and no
# network. Usage:
#
#   bash scripts/gpu_check.sh LOGDIR
#
# 1. builds the extension for the visible GPU's architecture (in place, MAX_JOBS = all cores);
# 2. runs the CUDA-parametrised tests;
# 3. runs compute-sanitizer (memcheck, racecheck, synccheck, initcheck) over scripts/gpu_kernel_tour.py,
#    which launches every kernel variant at small sizes (when compute-sanitizer exists);
# 4. collects ncu metrics (DRAM throughput, achieved occupancy, warp stall reasons) for the roofline
#    workloads (when ncu works; clocks left alone);
# 5. times the roofline workloads (bench/roofline.py: focal_cuda's full training step against the floor
#    bytes and the measured copy bandwidth, next to the predictions of docs/design.md) and a short bench
#    suite run side by side with the baselines;
# 6. prints a verdict table. Logs and CSVs go to LOGDIR. Budget: under 8 minutes on one H100 / H200.
set -uo pipefail

LOGDIR=${1:?usage: bash scripts/gpu_check.sh LOGDIR}
mkdir -p "$LOGDIR"
LOGDIR=$(cd "$LOGDIR" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$(date +%s)
declare -A verdict
stamp() { echo "[gpu_check $(( $(date +%s) - start ))s] $*"; }

if ! "$PY" -c "import torch" 2> /dev/null; then
  echo "gpu_check: $PY cannot import torch: set PYTHON to the interpreter that has your torch" >&2
  exit 2
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no GPU visible to torch ($("$PY" -c 'import torch; print(torch.__version__)' 2>&1))" >&2
  exit 2
fi
"$PY" - <<'EOF' | tee "$LOGDIR/device.txt"
import torch
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB; "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

# 1. Build for the visible architecture.
ARCH=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH} FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
stamp "building for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST (log: $LOGDIR/build.log)"
if "$PY" setup.py build_ext --inplace > "$LOGDIR/build.log" 2>&1; then
  verdict[build]=passed
else
  verdict[build]=FAILED
  tail -n 40 "$LOGDIR/build.log"
  echo "gpu_check: the build failed; nothing else can run" >&2
  exit 1
fi
"$PY" -m focal_cuda.kernel_report --arch "sm_${ARCH/./}" --csv "$LOGDIR/kernel_report.csv" > "$LOGDIR/kernel_report.txt" 2>&1 || true

# 2. The CUDA-parametrised tests (the CPU ones ran in CI), the slow training tests left out.
stamp "CUDA tests (log: $LOGDIR/tests.log)"
timeout 240 "$PY" -m pytest tests -q -x -k "cuda and not training and not ddp" -p no:cacheprovider \
    --junitxml="$LOGDIR/tests.xml" > "$LOGDIR/tests.log" 2>&1
rc=$?
if [ $rc -eq 0 ]; then
  verdict[tests]=passed
elif [ $rc -eq 124 ]; then
  verdict[tests]="cut short at 240 s (no failure before; see tests.log)"
else
  verdict[tests]=FAILED
fi
tail -n 3 "$LOGDIR/tests.log"

# 3. compute-sanitizer over every kernel variant.
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1 || true)
if [ -n "$SANITIZER" ]; then
  for tool in memcheck racecheck synccheck initcheck; do
    stamp "compute-sanitizer --tool $tool"
    if timeout 120 "$SANITIZER" --tool "$tool" --error-exitcode 99 "$PY" scripts/gpu_kernel_tour.py \
        > "$LOGDIR/sanitizer_$tool.log" 2>&1; then
      verdict[sanitizer_$tool]=passed
    else
      verdict[sanitizer_$tool]=FAILED
      grep -m 5 -E "ERROR|Invalid|FAIL|hazard" "$LOGDIR/sanitizer_$tool.log" || tail -n 5 "$LOGDIR/sanitizer_$tool.log"
    fi
  done
else
  verdict[sanitizer]="skipped (no compute-sanitizer)"
fi

# 4. ncu metrics of the fused kernels on the roofline workloads (one launch each).
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1 || true)
if [ -n "$NCU" ]; then
  stamp "ncu (clocks left alone)"
  if timeout 150 "$NCU" --clock-control none --target-processes all -k regex:focal_cuda \
      --metrics dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes.sum,gpu__time_duration.sum,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__pcsamp_warps_issue_stalled_long_scoreboard,smsp__pcsamp_warps_issue_stalled_lg_throttle,smsp__pcsamp_warps_issue_stalled_math_pipe_throttle,smsp__pcsamp_warps_issue_stalled_mio_throttle,smsp__pcsamp_warps_issue_stalled_wait \
      --csv "$PY" -m bench.roofline --once > "$LOGDIR/ncu.csv" 2> "$LOGDIR/ncu.log"; then
    verdict[ncu]=collected
  else
    verdict[ncu]="failed (see ncu.log)"
  fi
else
  verdict[ncu]="skipped (no ncu)"
fi

# 5. Timings: the roofline table (the verdict), then a short bench suite run with the baselines.
stamp "roofline workloads (log: $LOGDIR/roofline.log)"
if timeout 150 "$PY" -m bench.roofline --csv "$LOGDIR/roofline.csv" --ncu-csv "$LOGDIR/ncu.csv" \
    > "$LOGDIR/roofline.log" 2>&1; then
  verdict[roofline]=measured
else
  verdict[roofline]=FAILED
fi
stamp "bench suite (log: $LOGDIR/bench.log)"
# Eager baselines only: the compiled ones spend the budget compiling.
if timeout 120 "$PY" -m bench --device cuda --modes full --reps 10 --csv "$LOGDIR/bench.csv" \
    --providers focal_cuda,reference,lean_cross_entropy,torchvision,liger_cross_entropy \
    > "$LOGDIR/bench.log" 2>&1; then
  verdict[bench]=measured
else
  verdict[bench]="failed or cut short (see bench.log)"
fi

# 6. Verdict.
echo
cat "$LOGDIR/device.txt"
cat "$LOGDIR/roofline.log" | sed -n '/^workload/,$p'
echo
printf '%-22s %s\n' check result
for key in build tests sanitizer sanitizer_memcheck sanitizer_racecheck sanitizer_synccheck sanitizer_initcheck ncu roofline bench; do
  [ -n "${verdict[$key]:-}" ] && printf '%-22s %s\n' "$key" "${verdict[$key]}"
done
echo "logs: $LOGDIR ($(( $(date +%s) - start )) s)"
for key in build tests sanitizer_memcheck sanitizer_racecheck sanitizer_synccheck sanitizer_initcheck roofline; do
  [ "${verdict[$key]:-passed}" = "FAILED" ] && exit 1
done
exit 0
