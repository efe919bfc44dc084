"""The per-element instruction counts of docs/design.md section 7: each bench workload's kernel compiled for sm_90
with the bench's arguments fixed at compile time (gamma 2, no class weights, its reduction and target dtype), so
that ptxas drops the code of the other arguments and the streaming loop holds the path the bench runs plus a few
untaken branches. Needs nvcc (CUDA_HOME or PATH) and cuobjdump; no GPU.

    python scripts/streaming_loops_fixed_args.py [--arch sm_90]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from focal_cuda.kernel_report import find_cuobjdump, format_loops, streaming_loops  # noqa: E402

SOFTMAX_FIX = """SoftmaxArgs<typename AccumulateType<scalar_t>::type> a_in) {
  SoftmaxArgs<typename AccumulateType<scalar_t>::type> a = a_in;
  a.gamma.pieces = 1; a.gamma.gammas[0] = 2; a.class_weight = nullptr; a.reduction = kReductionMean;
  a.compute_grad = true; a.target_kind = FIX_TARGET; a.fold_mean_into_forward = true;"""
SIGMOID_FIX = """SigmoidArgs<typename AccumulateType<scalar_t>::type> a_in) {
  SigmoidArgs<typename AccumulateType<scalar_t>::type> a = a_in;
  a.gamma.pieces = 1; a.gamma.gammas[0] = 2; a.reduction = kReductionSum; a.use_alpha = true;
  a.compute_grad = true; a.target_kind = kTargetInt64; a.image_normalizer = nullptr; a.normalizer = nullptr;"""

KERNELS = """#include "cuda/sigmoid_focal_loss_kernels.cuh"
#include "cuda/softmax_focal_loss_kernels.cuh"
namespace fd = focal_cuda::device;
#define SA(T) const T*, T*, fd::LossOut<T>, fd::Geometry, fd::SoftmaxArgs<fd::AccumulateType<T>::type>
// detection_index fp16, detection_dense fp16 (sum, alpha 0.25, gamma 2)
template __global__ void fd::sigmoid_focal_loss_index_kernel<__half, 8>(const __half*, __half*, fd::LossOut<__half>,
    long long, long long, fd::FastDivider, fd::SigmoidArgs<float>);
template __global__ void fd::sigmoid_focal_loss_dense_kernel<__half, __half, 8>(const __half*, const __half*, __half*,
    fd::LossOut<__half>, long long, fd::SigmoidArgs<float>);
// segmentation bf16 / fp32 (C = 19), classification fp32 (C = 1000), vocabulary bf16 (C = 100000); mean, gamma 2
template __global__ void fd::softmax_focal_loss_channels_kernel<__nv_bfloat16, 24>(SA(__nv_bfloat16));
template __global__ void fd::softmax_focal_loss_channels_kernel<float, 24>(SA(float));
template __global__ void fd::softmax_focal_loss_rows_kernel<float, 64>(SA(float));
template __global__ void fd::softmax_focal_loss_long_rows_kernel<__nv_bfloat16, 1024, true>(SA(__nv_bfloat16));
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_90")
    args = parser.parse_args()
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    cuobjdump = find_cuobjdump()
    if not os.path.exists(nvcc) or cuobjdump is None:
        print("needs nvcc and cuobjdump")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        csrc = Path(tmp) / "csrc"
        shutil.copytree(ROOT / "csrc", csrc)
        for name, fix in (("softmax_focal_loss_kernels.cuh", SOFTMAX_FIX), ("sigmoid_focal_loss_kernels.cuh", SIGMOID_FIX)):
            path = csrc / "cuda" / name
            text = path.read_text()
            signature = fix.split("a_in) {")[0] + "a) {"
            assert signature in text, f"{name}: kernel signature not found"
            path.write_text(text.replace(signature, fix))
        source = Path(tmp) / "fixed.cu"
        source.write_text(KERNELS)
        results = []
        for target in ("kTargetUInt8", "kTargetInt64"):  # segmentation masks, classification labels
            obj = Path(tmp) / f"fixed_{target}.o"
            subprocess.run([nvcc, "-std=c++17", f"-arch={args.arch}", "--ftz=true", "-O3", f"-DFIX_TARGET={target}",
                            "-I", str(csrc), "-c", str(source), "-o", str(obj)], check=True, capture_output=True)
            for loop in streaming_loops(obj, cuobjdump):
                segmentation = "channels" in loop.name
                if (target == "kTargetUInt8") == segmentation or "sigmoid" in loop.name and target == "kTargetInt64":
                    results.append(loop)
        print(format_loops(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
