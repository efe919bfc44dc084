"""Static report of the built extension's CUDA kernels: no GPU needed.

    python -m focal_cuda.kernel_report [--arch sm_90] [--csv PATH] [--loops]

For every kernel and architecture in the binary: registers, stack and spill bytes (local memory),
static shared memory, the theoretical resident warps per SM at the kernel's block size (from the
register and shared-memory limits of that architecture), the widest global load and store in its
machine code, and the number of global loads. Read with ``cuobjdump`` (from the CUDA toolkit, the
``nvidia-cuda-cuobjdump`` wheel, or the copy Triton ships).

``--loops`` adds, per kernel, its streaming loop as the machine code has it: the backward branch whose
body issues the most global loads, with its instruction count, loads (count and bytes), stores and
MUFU (special-function) instructions. Divide by the elements one iteration handles to get instructions
per element (docs/design.md, section 7). The loop chosen is the one with the most MUFU (special-function:
exp2, log2, reciprocal) instructions, where the element math is; branches inside its body (ignored
targets, edges, schedules) make the count an upper bound of what a warp issues per iteration.

The kernels that stage a row in dynamic shared memory (``long_rows``, ``positions`` with STAGED) take
more at run time, depending on the number of classes; their occupancy here counts registers and static
shared memory only.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

# Per-SM limits by architecture (CUDA C++ Programming Guide, "Technical Specifications per Compute
# Capability"): registers, resident warps, resident blocks, shared memory in bytes.
SM_LIMITS = {
    "sm_75": (65536, 32, 16, 64 * 1024),
    "sm_80": (65536, 64, 32, 164 * 1024),
    "sm_86": (65536, 48, 16, 100 * 1024),
    "sm_89": (65536, 48, 24, 100 * 1024),
    "sm_90": (65536, 64, 32, 228 * 1024),
    "sm_100": (65536, 64, 32, 228 * 1024),
    "sm_120": (65536, 48, 32, 100 * 1024),
}
DEFAULT_BLOCK = 256  # focal_cuda::device::kBlock


@dataclasses.dataclass
class KernelUsage:
    arch: str
    name: str  # demangled, shortened
    registers: int
    stack: int
    local: int
    shared: int
    block: int
    widest_load: int = 0  # bytes
    widest_store: int = 0
    loads: int = 0

    @property
    def warps_per_block(self) -> int:
        return (self.block + 31) // 32

    def resident_warps(self) -> Optional[int]:
        limits = SM_LIMITS.get(self.arch)
        if limits is None:
            return None
        regs, max_warps, max_blocks, smem = limits
        regs_per_warp = ((max(self.registers, 1) * 32 + 255) // 256) * 256  # allocated per warp in units of 256
        blocks = min(max_blocks, (regs // regs_per_warp) // self.warps_per_block, max_warps // self.warps_per_block)
        if self.shared:
            blocks = min(blocks, smem // (self.shared + 1024))  # 1 KB per block reserved by the driver
        return blocks * self.warps_per_block

    def occupancy(self) -> Optional[float]:
        warps = self.resident_warps()
        return None if warps is None else warps / SM_LIMITS[self.arch][1]


def find_cuobjdump() -> Optional[str]:
    candidates = [shutil.which("cuobjdump")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "cuobjdump"))
    for path in sys.path:
        candidates.append(os.path.join(path, "nvidia", "cu13", "bin", "cuobjdump"))
        candidates.append(os.path.join(path, "nvidia", "cuda_cuobjdump", "bin", "cuobjdump"))
        candidates.append(os.path.join(path, "triton", "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def _run(cuobjdump: str, *args: str, library: Path) -> str:
    return subprocess.run([cuobjdump, *args, str(library)], check=True, capture_output=True, text=True).stdout


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def shorten(demangled: str) -> str:
    s = demangled.replace("focal_cuda::device::", "").replace("__nv_bfloat16", "bf16").replace("__half", "half")
    s = re.sub(r"^void ", "", s)
    s = re.sub(r"\(.*\)$", "", s)
    return s


def block_size(short_name: str) -> int:
    m = re.match(r"softmax_focal_loss_long_rows_kernel<[^,]+, (\d+),", short_name)
    return int(m.group(1)) if m else DEFAULT_BLOCK


_WIDTH = {".128": 16, ".64": 8, ".U16": 2, ".S16": 2, ".U8": 1, ".S8": 1}


def _access_width(opcode: str) -> int:
    for suffix, width in _WIDTH.items():
        if suffix in opcode:
            return width
    return 4


def resource_usage(text: str) -> list[tuple[str, str, dict[str, int]]]:
    """(architecture, mangled kernel, {REG, STACK, SHARED, LOCAL, ...}) of every focal_cuda kernel in the output
    of ``cuobjdump --dump-resource-usage``."""
    usage: list[tuple[str, str, dict[str, int]]] = []
    arch = None
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\d+a?)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            usage.append((arch, m.group(1), {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line.split(":", 1)[1])}))
            continue
        # The figures may stand on the line after the function name.
        if usage and "REG:" in line and not usage[-1][2]:
            usage[-1] = (usage[-1][0], usage[-1][1], {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)})
    return [u for u in usage if "focal_cuda" in u[1]]


def sass_lines(text: str):
    """(architecture, mangled function, line) for every instruction line of ``cuobjdump -sass`` output."""
    arch, function = None, None
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\d+a?)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            function = m.group(1)
            continue
        if function is not None:
            yield arch, function, line


def collect(library: Path, cuobjdump: str) -> list[KernelUsage]:
    """Resource usage and global access widths of every focal_cuda kernel in ``library``."""
    usage = resource_usage(_run(cuobjdump, "--dump-resource-usage", library=library))
    names = demangle(sorted({u[1] for u in usage}))
    # Global access widths from the machine code, per (arch, mangled name): widest load, widest store, loads.
    widths: dict[tuple[str, str], list[int]] = {}
    for arch, function, line in sass_lines(_run(cuobjdump, "-sass", library=library)):
        w = widths.setdefault((arch, function), [0, 0, 0])
        m = re.search(r"\b(LDG|STG)(\.[A-Z0-9.]+)?\s", line)
        if m:
            width = _access_width(m.group(2) or "")
            if m.group(1) == "LDG":
                w[0] = max(w[0], width)
                w[2] += 1
            else:
                w[1] = max(w[1], width)
    rows = []
    for arch_, mangled, fields in usage:
        short = shorten(names.get(mangled, mangled))
        load, store, loads = widths.get((arch_, mangled), [0, 0, 0])
        rows.append(KernelUsage(arch_, short, fields.get("REG", 0), fields.get("STACK", 0), fields.get("LOCAL", 0),
                                fields.get("SHARED", 0), block_size(short), load, store, loads))
    return rows


@dataclasses.dataclass
class StreamingLoop:  # static counts over the loop's address range
    arch: str
    name: str
    instructions: int
    loads: int
    load_bytes: int
    stores: int
    store_bytes: int
    mufu: int


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);")


def streaming_loops(library: Path, cuobjdump: str) -> list[StreamingLoop]:
    """The streaming loop of each focal_cuda kernel, per architecture."""
    functions: dict[tuple[str, str], list[tuple[int, str, str]]] = {}
    for arch, function, line in sass_lines(_run(cuobjdump, "-sass", library=library)):
        code = functions.setdefault((arch, function), [])
        m = _SASS_LINE.search(line)
        if m:
            code.append((int(m.group(1), 16), m.group(3), m.group(4)))
    names = demangle(sorted({f for _, f in functions if "focal_cuda" in f}))
    out = []
    for (arch, mangled), code in functions.items():
        if "focal_cuda" not in mangled:
            continue
        best = None
        for address, opcode, operands in code:
            if not opcode.startswith("BRA"):
                continue
            target = re.search(r"0x([0-9a-f]+)", operands)
            if target is None or int(target.group(1), 16) >= address:
                continue
            body = [(o, a) for addr, o, a in code if int(target.group(1), 16) <= addr <= address]
            loads = [o for o, _ in body if o.startswith("LDG")]
            stores = [o for o, _ in body if o.startswith("STG")]
            loop = StreamingLoop(arch, shorten(names.get(mangled, mangled)), len(body), len(loads),
                                 sum(_access_width(o) for o in loads), len(stores),
                                 sum(_access_width(o) for o in stores), sum(o.startswith("MUFU") for o, _ in body))
            # The streaming loop does the math: most special-function instructions (exp, log, rcp); the
            # finishing block's loop over the partials issues loads but no MUFU.
            if best is None or (loop.mufu, loop.loads, -loop.instructions) > (best.mufu, best.loads, -best.instructions):
                best = loop
        if best is not None:
            out.append(best)
    return out


def format_loops(loops: list[StreamingLoop]) -> str:
    header = f"{'arch':7} {'instr':>5} {'LDGs':>4} {'ld B':>5} {'STGs':>4} {'st B':>5} {'MUFU':>4}  kernel (streaming loop)"
    lines = [header, "-" * len(header)]
    for k in sorted(loops, key=lambda r: (r.arch, r.name)):
        lines.append(f"{k.arch:7} {k.instructions:5} {k.loads:4} {k.load_bytes:5} {k.stores:4} {k.store_bytes:5} "
                     f"{k.mufu:4}  {k.name}")
    return "\n".join(lines)


def memory_bound(k: KernelUsage) -> bool:
    """The kernels the bandwidth targets are about: every streaming kernel but the float64 ones, which
    take 128 registers for their accurate double-precision math (a correctness dtype, not a speed one)."""
    return "<double" not in k.name and "double>" not in k.name


def format_table(rows: list[KernelUsage]) -> str:
    header = f"{'arch':7} {'regs':>4} {'stack':>5} {'local':>5} {'smem':>6} {'block':>5} {'warps/SM':>8} {'occ':>5} " \
             f"{'ld B':>4} {'st B':>4} {'LDGs':>5}  kernel"
    lines = [header, "-" * len(header)]
    for k in sorted(rows, key=lambda r: (r.arch, r.name)):
        warps = k.resident_warps()
        occ = k.occupancy()
        lines.append(f"{k.arch:7} {k.registers:4} {k.stack:5} {k.local:5} {k.shared:6} {k.block:5} "
                     f"{warps if warps is not None else '-':>8} {f'{occ:.0%}' if occ is not None else '-':>5} "
                     f"{k.widest_load:4} {k.widest_store:4} {k.loads:5}  {k.name}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m focal_cuda.kernel_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", help="only these architectures (e.g. sm_90); repeatable")
    parser.add_argument("--csv", type=Path, help="also write the rows to this CSV file")
    parser.add_argument("--loops", action="store_true", help="also print each kernel's streaming loop")
    parser.add_argument("--library", type=Path, help="the extension to read (default: the installed focal_cuda._C)")
    args = parser.parse_args(argv)
    library = args.library
    if library is None:
        import focal_cuda

        if not focal_cuda.build_info()["cuda"]:
            print("focal_cuda was built without CUDA kernels: nothing to report (build with FORCE_CUDA=1)")
            return 1
        library = Path(focal_cuda._C.__file__)
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        print("cuobjdump not found: install nvidia-cuda-cuobjdump or put the CUDA toolkit's bin on PATH")
        return 1
    rows = collect(library, cuobjdump)
    if args.arch:
        rows = [r for r in rows if r.arch in args.arch]
    print(format_table(rows))
    if args.loops:
        loops = streaming_loops(library, cuobjdump)
        if args.arch:
            loops = [r for r in loops if r.arch in args.arch]
        print()
        print(format_loops(loops))
    if args.csv:
        fields = [f.name for f in dataclasses.fields(KernelUsage)] + ["resident_warps", "occupancy"]
        with open(args.csv, "w") as f:
            f.write(",".join(fields) + "\n")
            for r in rows:
                values = [getattr(r, n) for n in fields[:-2]] + [r.resident_warps(), r.occupancy()]
                f.write(",".join(f'"{v}"' if isinstance(v, str) else str(v) for v in values) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
