#!/usr/bin/env python3
"""Instruction mix of a kernel's SASS, and of its loops, from a cubin.

    nvcc -std=c++17 -O3 -arch=sm_90a -Iinclude -Isrc --expt-relaxed-constexpr \\
         -cubin -o /tmp/decode.cubin src/cuda/decode.cu
    python3 scripts/sass_mix.py /tmp/decode.cubin --kernel 'decode_kernel.*IntEncodingILi4ELb0E.*Li16E.*ScaleModeE1.*PipeE1'

prints, for each kernel whose mangled name matches --kernel (a regular
expression), its instruction count and opcode histogram, and for each loop
(a backward branch: from its target label to the branch) that holds an mma
(HMMA, HGMMA, IMMA) the same, innermost loops first, with instructions per
mma. Static counts of the code, not of an execution: a loop's count is one
trip through its body, every branch taken or not.

nvdisasm: $NVDISASM, else on PATH, else in the CUDA toolkit's bin, else the
PyPI package nvidia-cuda-nvdisasm (`pip install nvidia-cuda-nvdisasm`).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys

MMA = ("HMMA", "HGMMA", "IMMA", "QGMMA")


def find_nvdisasm() -> str:
    for cand in (os.environ.get("NVDISASM"), shutil.which("nvdisasm"), "/usr/local/cuda/bin/nvdisasm"):
        if cand and os.path.exists(cand):
            return cand
    for site in sys.path:
        for hit in glob.glob(os.path.join(site, "nvidia", "cu*", "bin", "nvdisasm")):
            return hit
    sys.exit("nvdisasm not found: set NVDISASM, or pip install nvidia-cuda-nvdisasm")


def parse(text: str) -> dict[str, list[tuple[int, str, str]]]:
    """kernel name -> [(address, opcode, full text)], labels as opcode ':label'."""
    kernels: dict[str, list[tuple[int, str, str]]] = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r"^\s*\.text\.(\S+):", line)
        if m:
            cur = m.group(1)
            kernels[cur] = []
            continue
        if cur is None:
            continue
        m = re.match(r"^(\.L\w+):", line.strip())
        if m:
            kernels[cur].append((-1, ":" + m.group(1), line))
            continue
        m = re.match(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            kernels[cur].append((int(m.group(1), 16), m.group(3), line.strip()))
    return kernels


def base(op: str) -> str:
    return op.split(".")[0]


def histogram(instrs: list[tuple[int, str, str]]) -> collections.Counter:
    return collections.Counter(base(op) for addr, op, _ in instrs if addr >= 0)


def loops(instrs: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """(first, last) indices of each backward branch's body."""
    label_at: dict[str, int] = {}
    for i, (_, op, _) in enumerate(instrs):
        if op.startswith(":"):
            label_at[op[1:]] = i
    out = []
    for i, (addr, op, text) in enumerate(instrs):
        if base(op) != "BRA":
            continue
        m = re.search(r"`\((\.L\w+)\)", text)
        if m and m.group(1) in label_at and label_at[m.group(1)] < i:
            out.append((label_at[m.group(1)], i))
    return out


def show(title: str, instrs: list[tuple[int, str, str]], top: int) -> None:
    h = histogram(instrs)
    n = sum(h.values())
    mmas = sum(h[m] for m in MMA)
    per = f", {n / mmas:.1f} a mma" if mmas else ""
    print(f"{title}: {n} instructions, {mmas} mma{per}")
    print("   " + ", ".join(f"{op} {c}" for op, c in h.most_common(top)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cubin")
    ap.add_argument("--kernel", default=".", help="regular expression on the mangled kernel name")
    ap.add_argument("--top", type=int, default=14, help="opcodes shown a histogram")
    ap.add_argument("--loops", type=int, default=4, help="loops shown a kernel (most mma first)")
    args = ap.parse_args()
    text = subprocess.run([find_nvdisasm(), "-c", args.cubin], check=True, capture_output=True, text=True).stdout
    kernels = {k: v for k, v in parse(text).items() if re.search(args.kernel, k)}
    if not kernels:
        sys.exit(f"no kernel matches {args.kernel!r}")
    for name, instrs in kernels.items():
        print(f"== {name}")
        show("kernel", instrs, args.top)
        found = []
        for first, last in loops(instrs):
            body = instrs[first:last + 1]
            h = histogram(body)
            if any(h[m] for m in MMA):
                found.append((sum(h[m] for m in MMA), last - first, first, last))
        # innermost (shortest) first among those with the most mma
        for _, _, first, last in sorted(found, key=lambda x: (-x[0], x[1]))[: args.loops]:
            a0, a1 = instrs[first + 1][0] if first + 1 < len(instrs) else 0, instrs[last][0]
            show(f"  loop {a0:#x}-{a1:#x}", instrs[first:last + 1], args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
