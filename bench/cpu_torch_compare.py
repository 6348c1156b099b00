#!/usr/bin/env python3
"""qmoe's CPU kernels against PyTorch's CPU per-expert loop, same shapes, same run.

For every encoding (16-bit, int8/int4/int2 sym and asym, fp8 e4m3/e5m2) and
both activation dtypes, times

  * qmoe:  qmoe.moe_gemm_prefill (or moe_gemm_decode) on the quantized weights;
  * torch: the per-expert loop ``out[rows_e] = act[rows_e] @ W_e.T`` on bf16
    weights (the dequantized weights in bfloat16, activations cast to
    bfloat16: PyTorch's fast CPU path, oneDNN with AVX512_BF16 where present),

with the same number of threads (torch.set_num_threads = qmoe.set_num_threads),
median of --runs timed runs after warm-up, and checks that both agree.

Anchors (DESIGN.md §5): the peaks of the instructions computed with, for each
activation dtype the one qmoe-bench names (the AMX tile product TDPBF16PS where qmoe's
prefill runs on AMX, else vdpbf16ps for bf16 or fp32 FMA; oneDNN's bf16 path uses the
same units), from `qmoe-bench`'s register-only loops
(--anchors-bin, found under build/ by default), measured before and after each
activation dtype's rows: the dev VM's two vCPUs sometimes share one core, which
halves every figure, so ratios are the comparable numbers. Each row's % of
peak uses the larger of its two anchors.

Usage:
  python bench/cpu_torch_compare.py                       # E=4, N=K=4096, 256 tokens/expert
  python bench/cpu_torch_compare.py --experts 8 --n 4096 --k 14336 --tokens 256
  python bench/cpu_torch_compare.py --decode              # 1 and 8 tokens/expert as well
  python bench/cpu_torch_compare.py --quick               # small shapes, few runs
Prints a Markdown table (and --json FILE writes the rows).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import glob
import re
import statistics
import subprocess
import time

import torch

import qmoe

ENCODINGS = [  # (label, weight_bits, asym, fp8)
    ("bf16/fp16 weights", 16, False, None),
    ("int8 sym", 8, False, None),
    ("int8 asym", 8, True, None),
    ("int4 sym", 4, False, None),
    ("int4 asym", 4, True, None),
    ("int2 sym", 2, False, None),
    ("int2 asym", 2, True, None),
    ("fp8 e4m3", 8, False, "e4m3"),
    ("fp8 e5m2", 8, False, "e5m2"),
]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def find_bench_bin() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = sorted(glob.glob(os.path.join(root, "build", "*", "bench", "qmoe-bench")), key=os.path.getmtime)
    return found[-1] if found else ""


def measure_peaks(bench_bin: str, threads: int) -> dict:
    """{'dot', 'fma': GFLOP/s of the instruction qmoe's prefill computes bf16 / fp16
    activations with (AMX TDPBF16PS, vdpbf16ps or fp32 FMA: qmoe-bench names it, in
    'dot_name' / 'fma_name')} on `threads` threads (0.0 if unknown)."""
    peaks = {"dot": 0.0, "fma": 0.0, "dot_name": "bf16 peak", "fma_name": "fp16 peak"}
    if not bench_bin:
        return peaks
    for act, key, pat in (("bf16", "dot", r"; ([^;]*?) peak ([0-9.]+) GFLOP/s"),
                          ("f16", "fma", r"; ([^;]*?) peak ([0-9.]+) GFLOP/s")):
        try:
            r = subprocess.run([bench_bin, "--device", "cpu", "--quick", "--phase", "prefill",
                                "--encodings", "bf16", "--shapes", "ark", "--act", act,
                                "--threads", str(threads)],
                               capture_output=True, text=True, timeout=120)
            m = re.search(pat, r.stdout)
            if m:
                peaks[key] = float(m.group(2))
                peaks[key + "_name"] = m.group(1)
        except (OSError, subprocess.SubprocessError):
            pass
    time.sleep(0.2)
    return peaks


def median_ms(fn, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_case(args, act_dtype, label, bits, asym, fp8, tokens_per_expert, phase):
    E, N, K, gs = args.experts, args.n, args.k, args.group_size
    g = torch.Generator().manual_seed(0)
    w = torch.randn(E, N, K, generator=g) * 0.05
    if bits == 16:
        qw, scales, zeros = w.to(act_dtype), None, None
        w_bf16 = w.to(act_dtype).to(torch.bfloat16)
    else:
        qw, scales, zeros = qmoe.quantize(w, weight_bits=bits, group_size=gs, asym=asym,
                                          dtype=act_dtype, fp8=fp8)
        w_bf16 = qmoe.dequantize(qw, scales, zeros, weight_bits=bits, group_size=gs,
                                 asym=asym).to(torch.bfloat16)
    counts = torch.full((E,), tokens_per_expert, dtype=torch.int32)
    T = E * tokens_per_expert
    act = (torch.rand(T, K, generator=g) * 2 - 1).to(act_dtype)

    call = qmoe.moe_gemm_prefill if phase == "prefill" else qmoe.moe_gemm_decode
    kw = dict(scales=scales, zeros=zeros, weight_bits=bits, group_size=gs, asym=asym)

    def qmoe_fn():
        return call(act, qw, counts, **kw)

    offsets = [0]
    for c in counts.tolist():
        offsets.append(offsets[-1] + c)
    act_bf16 = act.to(torch.bfloat16)
    out_t = torch.empty(T, N, dtype=torch.bfloat16)

    def torch_fn():
        a = act_bf16 if act_dtype != torch.bfloat16 else act
        for e in range(E):
            s, t = offsets[e], offsets[e + 1]
            if t > s:
                torch.matmul(a[s:t], w_bf16[e].t(), out=out_t[s:t])
        return out_t

    # qmoe first, then PyTorch (whose OpenMP workers may spin for a while
    # after a call; a pause keeps them off qmoe's cores and the other way round).
    out_q = qmoe_fn()
    tq = median_ms(qmoe_fn, args.runs)
    time.sleep(0.2)
    ref = torch_fn().float()
    tt = median_ms(torch_fn, args.runs)
    time.sleep(0.2)
    err = rel_err(out_q.float(), ref)
    flops = 2.0 * T * N * K
    wbytes = qw.numel() * qw.element_size() + sum(
        x.numel() * x.element_size() for x in (scales, zeros) if x is not None)
    return {
        "phase": phase, "act": str(act_dtype).replace("torch.", ""), "encoding": label,
        "E": E, "N": N, "K": K, "tokens_per_expert": tokens_per_expert,
        "qmoe_ms": tq, "torch_bf16_loop_ms": tt, "speedup": tt / tq,
        "qmoe_gflops": flops / tq / 1e6, "torch_gflops": flops / tt / 1e6,
        "qmoe_weight_gbs": wbytes / tq / 1e6, "rel_err_vs_torch": err,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=256, help="tokens per expert (prefill)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="0: all hardware threads")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--decode", action="store_true", help="also 1 and 8 tokens per expert")
    ap.add_argument("--act", choices=["bf16", "fp16", "both"], default="both")
    ap.add_argument("--only", default="", help="substring of the encoding labels to run")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default="")
    ap.add_argument("--anchors-bin", default=None,
                    help="qmoe-bench binary for the peak anchors (default: newest build/*/bench/qmoe-bench; '' skips)")
    args = ap.parse_args()
    bench_bin = find_bench_bin() if args.anchors_bin is None else args.anchors_bin
    if args.quick:
        args.experts, args.n, args.k, args.runs = 2, 1024, 1024, 5

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    qmoe.set_num_threads(threads)

    acts = {"bf16": [torch.bfloat16], "fp16": [torch.float16],
            "both": [torch.bfloat16, torch.float16]}[args.act]
    cases = [("prefill", args.tokens)]
    if args.decode:
        cases += [("decode", 1), ("decode", 8)]

    print(f"# qmoe CPU vs PyTorch per-expert loop on bf16 weights")
    print(f"# {cpu_model()}, {threads} threads, torch {torch.__version__}, qmoe {qmoe.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# E={args.experts} N={args.n} K={args.k} group_size={args.group_size}, "
          f"median of {args.runs} runs")
    print()
    print(f"# anchors from {bench_bin or '(none)'}: peaks in GFLOP/s, before -> after each block")
    print()
    print("| phase | act | encoding | tok/exp | qmoe ms | torch bf16 loop ms | qmoe / torch speed | "
          "qmoe GFLOP/s | torch GFLOP/s | qmoe % of peak | torch % of dot peak | qmoe weight GB/s | rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows, anchors = [], []
    before = measure_peaks(bench_bin, threads)
    for phase, tpe in cases:
        for act_dtype in acts:
            block = []
            for label, bits, asym, fp8 in ENCODINGS:
                if args.only and args.only not in label:
                    continue
                block.append(run_case(args, act_dtype, label, bits, asym, fp8, tpe, phase))
            after = measure_peaks(bench_bin, threads)
            anchors.append({"phase": phase, "act": str(act_dtype), "before": before, "after": after})
            dot = max(before["dot"], after["dot"])
            own = dot if act_dtype == torch.bfloat16 else max(before["fma"], after["fma"])
            for r in block:
                r["qmoe_pct_of_peak"] = 100 * r["qmoe_gflops"] / own if own else None
                r["torch_pct_of_dot_peak"] = 100 * r["torch_gflops"] / dot if dot else None
                pct = lambda v: f"{v:.0f}%" if v is not None else "-"
                rows.append(r)
                print(f"| {phase} | {r['act']} | {r['encoding']} | {tpe} | {r['qmoe_ms']:.2f} | "
                      f"{r['torch_bf16_loop_ms']:.2f} | {r['speedup']:.2f}x | {r['qmoe_gflops']:.0f} | "
                      f"{r['torch_gflops']:.0f} | {pct(r['qmoe_pct_of_peak'])} | "
                      f"{pct(r['torch_pct_of_dot_peak'])} | {r['qmoe_weight_gbs']:.1f} | "
                      f"{r['rel_err_vs_torch']:.1e} |", flush=True)
            print(f"# anchors for {phase} {r['act'] if block else act_dtype}: "
                  f"{after['dot_name']} {before['dot']:.0f} -> {after['dot']:.0f}, "
                  f"{after['fma_name']} {before['fma']:.0f} -> {after['fma']:.0f} "
                  f"(qmoe computes with {after['dot_name'] if act_dtype == torch.bfloat16 else after['fma_name']})",
                  flush=True)
            before = after
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "threads": threads, "anchors": anchors, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
