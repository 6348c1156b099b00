#!/usr/bin/env python3
"""qmoe on a CUDA GPU: decode (or prefill) tables against the floor and PyTorch.

    python3 bench/gpu_bench.py --out DIR [--phase decode|prefill|crossover] [--quick]
        [--encodings int4,int8,int2,fp8,bf16] [--models mixtral-8x7b,...]
        [--batches 1,8,64] [--check] [--backend auto|package|shim --lib libqmoe.a]

Every number of a table is measured in the same process on the same card:

* the device copy bandwidth: a 1 GiB device-to-device copy, bytes read +
  written over its median time;
* decode floor of a row: (weights + scales + zeros of the experts that have
  tokens, + activations in + output out) / copy bandwidth;
* prefill floor: 2 T N K / the dense bf16 rate (torch.matmul 8192^3);
* qmoe: median time of >= 20 timed CUDA-graph replays after warm-up (device
  events); a graph holds R calls cycling over several copies of the inputs
  (weights, scales, zeros, activations), enough copies that the L2 cannot hold
  the data a call reads, R large enough that a replay lasts >= 0.3 ms;
* anchors on bf16 weights, same shapes, same timing: a per-expert torch loop
  (counts known on the host, experts without tokens skipped) and
  torch._grouped_mm where present (prefill also: torch.matmul at the same
  total size).

qmoe is called through the `qmoe` Python package (qmoe.moe_gemm_decode /
moe_gemm_prefill on torch CUDA tensors); when the package cannot be imported
(or --backend shim), through a small C shim compiled against the static
library given by --lib. Output: a markdown table on stdout and, under --out,
<phase>.json (every measurement) and <phase>.md.

--phase crossover: for each MoE layer shape, every expert given m tokens
(m = --tokens-per-expert), the decode and the prefill kernel timed on the same
inputs; the table gives the smallest m where prefill is the faster, which is
what `moe(..., phase="auto")`'s decode_threshold should be.

Routing of the MoE layers (DESIGN.md section 5): batch B tokens each pick
top_k distinct experts with a fixed seed; the gate/up product is
[E, 2I, H] and the down product [E, H, I]. Qwen1.5-MoE's shared expert is
a dense layer and is not part of these grouped products.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile

import torch

MODELS = {  # hidden H, expert intermediate I, experts E, top_k
    "qwen1.5-moe": (2048, 1408, 60, 4),
    "deepseek-v2-lite": (2048, 1408, 64, 6),
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
}
# ARK's grouped-GEMM reference shapes: (E, N, K, tokens, uneven split)
ARK_SHAPES = [(8, 4096, 4096, 252, False), (8, 4096, 14336, 528, False), (8, 14336, 4096, 528, False),
              (16, 2048, 2048, 256, False), (32, 2048, 2048, 256, False), (64, 2048, 2048, 256, False),
              (8, 4096, 4096, 610, True)]
# name: (weight type, bits for weight_bits=, asym)
ENCODINGS = {
    "bf16": ("native16", 16, False),
    "int8": ("int8", 8, False), "int8_asym": ("int8", 8, True),
    "int4": ("int4", 4, False), "int4_asym": ("int4", 4, True),
    "int2": ("int2", 2, False), "int2_asym": ("int2", 2, True),
    "fp8": ("fp8_e4m3", 8, False), "fp8_e4m3": ("fp8_e4m3", 8, False), "fp8_e5m2": ("fp8_e5m2", 8, False),
}
WTYPE_ID = {"native16": 0, "int8": 1, "int4": 2, "int2": 3, "fp8_e4m3": 4, "fp8_e5m2": 5}
PER_BYTE = {"int8": 1, "int4": 2, "int2": 4, "fp8_e4m3": 1, "fp8_e5m2": 1}

# ------------------------------------------------------------------ qmoe calls
SHIM = r"""
#include <cstdint>
#include <cstdio>
#include "qmoe/qmoe.h"
extern "C" int qmoe_call_c(int phase, int act, int wtype, int asym, long long E, long long N, long long K,
                           long long T, long long gs, const void* a, const void* w, const void* s,
                           const void* z, const void* counts, void* out, void* stream) {
  qmoe::MoeGemmParams p;
  p.act_type = qmoe::ActType(act);
  p.weight_type = qmoe::WeightType(wtype);
  p.asym = asym != 0;
  p.num_experts = E; p.n = N; p.k = K; p.total_tokens = T; p.group_size = gs;
  p.activations = a; p.weights = w; p.scales = s; p.zeros = z;
  p.tokens_per_expert = static_cast<const int32_t*>(counts); p.out = out;
  qmoe::Device d{qmoe::DeviceType::cuda, 0, stream};
  qmoe::Status st = phase == 1 ? qmoe::moe_gemm_decode(p, d) : qmoe::moe_gemm_prefill(p, d);
  if (!st.ok()) { std::fprintf(stderr, "qmoe: %s\n", st.message.c_str()); return int(st.code); }
  return 0;
}
"""


class Backend:
    """qmoe through the Python package, or through a C shim over libqmoe.a."""

    def __init__(self, kind: str, lib: str | None):
        self.pkg = None
        self.dll = None
        if kind in ("auto", "package"):
            try:
                import qmoe  # noqa: F401

                self.pkg = qmoe
                self.name = f"qmoe package {getattr(qmoe, '__version__', '?')}"
                return
            except Exception as ex:  # the package may not be built on this machine
                if kind == "package":
                    raise
                print(f"# qmoe package unavailable ({str(ex).splitlines()[0]}); using the C shim", file=sys.stderr)
        if not lib or not os.path.exists(lib):
            raise SystemExit("no qmoe backend: install the package or pass --lib path/to/libqmoe.a")
        self.dll = self._build_shim(lib)
        self.name = f"C shim over {lib}"

    @staticmethod
    def _build_shim(lib):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        tmp = tempfile.mkdtemp(prefix="qmoe_gpu_bench_")
        src, so = os.path.join(tmp, "shim.cpp"), os.path.join(tmp, "shim.so")
        with open(src, "w") as f:
            f.write(SHIM)
        cuda = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        subprocess.check_call(["g++", "-O2", "-shared", "-fPIC", "-std=c++17", src, "-I", os.path.join(root, "include"),
                               "-Wl,--whole-archive", os.path.abspath(lib), "-Wl,--no-whole-archive",
                               "-L", os.path.join(cuda, "lib64"), "-lcudart", "-lpthread", "-o", so])
        dll = ctypes.CDLL(so)
        dll.qmoe_call_c.restype = ctypes.c_int
        dll.qmoe_call_c.argtypes = ([ctypes.c_int] * 4 + [ctypes.c_longlong] * 5 + [ctypes.c_void_p] * 7)
        return dll

    def call(self, phase, prob, i):
        """One grouped product on input copy i; returns the [T, N] output."""
        act, w, s, z = prob.acts[i], prob.ws[i], prob.ss[i], prob.zs[i]
        if self.pkg is not None:
            fn = self.pkg.moe_gemm_decode if phase == "decode" else self.pkg.moe_gemm_prefill
            return fn(act, w, prob.counts_dev, scales=s, zeros=z, weight_bits=prob.bits,
                      group_size=prob.gs, asym=prob.asym)
        out = torch.empty(prob.T, prob.N, dtype=prob.dtype, device="cuda")
        rc = self.dll.qmoe_call_c(1 if phase == "decode" else 2, 1 if prob.dtype == torch.bfloat16 else 0,
                                  WTYPE_ID[prob.wtype], int(prob.asym), prob.E, prob.N, prob.K, prob.T, prob.gs,
                                  act.data_ptr(), w.data_ptr(), s.data_ptr() if s is not None else None,
                                  z.data_ptr() if z is not None else None, prob.counts_dev.data_ptr(), out.data_ptr(),
                                  torch.cuda.current_stream().cuda_stream)
        if rc != 0:
            raise RuntimeError(f"qmoe call failed with status {rc}")
        return out


# ------------------------------------------------------------------ timing
def timed(fn_i, copies, est_ms=None, reps=25, warm=3, min_replay_ms=0.3, max_calls=64):
    """Median ms per call: CUDA-graph replays of R calls fn_i(r % copies)."""
    if est_ms is None:
        fn_i(0)
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn_i(0)
        e1.record()
        torch.cuda.synchronize()
        est_ms = e0.elapsed_time(e1)
    calls = max(copies, int(math.ceil(min_replay_ms / max(est_ms, 1e-3))))
    calls = min(max(calls, 1), max(max_calls, copies))
    calls = int(math.ceil(calls / copies)) * copies
    if est_ms > 50:  # slow calls (a kernel that is not the fast path): fewer replays
        calls, reps = copies, max(5, min(reps, int(2000 / est_ms)))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for r in range(min(calls, copies)):
            fn_i(r % copies)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for r in range(calls):
            fn_i(r % copies)
    for _ in range(warm):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / calls)
    del graph
    return statistics.median(times), {"calls_per_replay": calls, "replays": reps,
                                      "spread": (max(times) - min(times)) / statistics.median(times)}


def copy_bandwidth():
    """Device copy bandwidth in bytes/s, counting bytes read + written."""
    n = 1 << 30
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        dst.copy_(src)
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
    del src, dst
    return 2 * n / statistics.median(times)


def dense_rate():
    """bf16 dense matrix rate (FLOP/s) of torch.matmul at 8192^3, random data."""
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms, _ = timed(lambda i: torch.matmul(a, b), 1, reps=20)
    del a, b
    return 2 * n ** 3 / (ms / 1e3)


# ------------------------------------------------------------------ problems
def route(B, E, top_k, seed):
    """Counts of B tokens each routed to top_k distinct experts (fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(B, E, generator=g).topk(top_k, dim=1).indices
    return torch.bincount(idx.flatten(), minlength=E).to(torch.int32)


def split(T, E, uneven):
    if not uneven:
        return torch.tensor([T // E + (e < T % E) for e in range(E)], dtype=torch.int32)
    counts, left = [], T
    for e in range(E):
        c = left if e + 1 == E else T * 2 * (e + 1) // (E * (E + 1))
        counts.append(c)
        left -= c
    return torch.tensor(counts, dtype=torch.int32)


class Problem:
    """Inputs of one grouped product, `copies` independent copies of each."""

    def __init__(self, E, N, K, counts, enc, dtype, gs, copies, seed):
        self.E, self.N, self.K = E, N, K
        self.counts = counts
        self.T = int(counts.sum())
        self.wtype, self.bits, self.asym = ENCODINGS[enc]
        self.dtype = dtype
        self.gs = gs if self.wtype != "native16" else K
        self.copies = copies
        self.counts_dev = counts.to("cuda")
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.acts, self.ws, self.ss, self.zs = [], [], [], []
        for _ in range(copies):
            self.acts.append((torch.randn(self.T, K, generator=g, device="cuda") * 0.5).to(dtype))
            if self.wtype == "native16":
                self.ws.append((torch.randn(E, N, K, generator=g, device="cuda", dtype=torch.float32) * 0.02).to(dtype))
                self.ss.append(None)
                self.zs.append(None)
                continue
            kp = K // PER_BYTE[self.wtype]
            w = torch.randint(0, 256, (E, N, kp), generator=g, device="cuda", dtype=torch.uint8)
            if self.wtype == "fp8_e4m3":
                w = torch.where((w & 0x7F) == 0x7F, w ^ 1, w).view(torch.float8_e4m3fn)
            elif self.wtype == "fp8_e5m2":
                w = torch.where((w & 0x7C) == 0x7C, w & 0xBB, w).view(torch.float8_e5m2)
            self.ws.append(w)
            base = {"fp8_e4m3": 1e-3, "fp8_e5m2": 1e-5}.get(self.wtype, 1e-2)
            groups = K // self.gs
            self.ss.append(((torch.rand(E, N, groups, generator=g, device="cuda") + 0.5) * base).to(dtype))
            if self.asym:
                levels = 1 << self.bits
                self.zs.append(torch.randint(0, levels, (E, N, groups), generator=g, device="cuda").to(dtype))
            else:
                self.zs.append(None)

    @property
    def active(self):
        return int((self.counts > 0).sum())

    def expert_bytes(self):
        """Weights + scales + zeros of one expert."""
        if self.wtype == "native16":
            return self.N * self.K * 2
        b = self.N * self.K // PER_BYTE[self.wtype]
        groups = self.K // self.gs
        return b + self.N * groups * 2 * (2 if self.asym else 1)

    def bytes_moved(self):
        return self.active * self.expert_bytes() + self.T * self.K * 2 + self.T * self.N * 2

    def dequant(self, e, i=0):
        """Expert e's [N, K] weights of copy i in float32 (torch, for --check)."""
        w = self.ws[i][e]
        if self.wtype == "native16":
            return w.float()
        if self.wtype.startswith("fp8"):
            q = w.float()
        else:
            per, bits = PER_BYTE[self.wtype], self.bits
            u = w.to(torch.int32)
            fields = [(u >> (bits * j)) & ((1 << bits) - 1) for j in range(per)]
            q = torch.stack(fields, dim=-1).reshape(self.N, self.K)
            if not self.asym:
                q = torch.where(q >= (1 << (bits - 1)), q - (1 << bits), q)
            q = q.float()
            if self.asym:
                q = q - self.zs[i][e].float().repeat_interleave(self.gs, dim=1)
        return q * self.ss[i][e].float().repeat_interleave(self.gs, dim=1)

    def reference(self, i=0):
        out = torch.zeros(self.T, self.N, dtype=torch.float32, device="cuda")
        t0 = 0
        for e, c in enumerate(self.counts.tolist()):
            if c:
                out[t0:t0 + c] = self.acts[i][t0:t0 + c].float() @ self.dequant(e, i).t()
            t0 += c
        return out


def copies_for(active_bytes, total_bytes, l2_bytes, mem_cap):
    """Enough input copies that one replay's working set is >= 4x the L2."""
    want = max(1, math.ceil(4 * l2_bytes / max(active_bytes, 1)))
    fit = max(1, int(mem_cap // max(total_bytes, 1)))
    return int(min(want, fit, 32))


def rotated_problem(E, N, K, counts, enc, dtype, gs, l2_bytes, mem_cap):
    """The Problem of one row with as many input copies as copies_for asks for
    (a one-copy probe first gives the bytes of an expert)."""
    probe = Problem(E, N, K, counts, enc, dtype, gs, 1, seed=7)
    active = int((counts > 0).sum())
    copies = copies_for(active * probe.expert_bytes(), E * probe.expert_bytes() + probe.T * K * 2, l2_bytes,
                        mem_cap)
    del probe
    return Problem(E, N, K, counts, enc, dtype, gs, copies, seed=11)


# ------------------------------------------------------------------ anchors
def torch_anchors(prob, phase, with_matmul=False):
    """Per-expert loop and torch._grouped_mm on bf16 weights (prob: a bf16 Problem)."""
    res = {}
    counts = prob.counts.tolist()
    offs = torch.cumsum(prob.counts, 0).to(torch.int32).to("cuda")
    outs = [torch.empty(prob.T, prob.N, dtype=prob.dtype, device="cuda") for _ in range(prob.copies)]

    def loop(i):
        t0 = 0
        for e, c in enumerate(counts):
            if c:
                torch.mm(prob.acts[i][t0:t0 + c], prob.ws[i][e].t(), out=outs[i][t0:t0 + c])
            t0 += c

    res["torch_loop_ms"], _ = timed(loop, prob.copies)
    res["grouped_mm_ms"] = None
    if hasattr(torch, "_grouped_mm"):
        try:
            def gmm(i):
                return torch._grouped_mm(prob.acts[i], prob.ws[i].transpose(-2, -1), offs=offs)

            ref = torch.empty(prob.T, prob.N, dtype=prob.dtype, device="cuda")
            loop(0)
            ref.copy_(outs[0])
            got = gmm(0)
            err = ((got.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
            if err > 2e-2:
                raise RuntimeError(f"torch._grouped_mm disagrees with the loop (rel err {err:.3g})")
            res["grouped_mm_ms"], _ = timed(gmm, prob.copies)
        except Exception as ex:  # not on this build/card/shape
            res["grouped_mm_note"] = str(ex).splitlines()[0][:160]
    if with_matmul:  # dense product of the same total size
        w2d = prob.ws[0][0]
        res["dense_same_size_ms"], _ = timed(lambda i: torch.matmul(prob.acts[i], w2d.t()), prob.copies)
    return res


# ------------------------------------------------------------------ rows
def decode_rows(args):
    rows = []
    for model in args.models:
        H, I, E, k = MODELS[model]
        for B in args.batches:
            counts = route(B, E, k, seed=1234 + B)
            for prod, (N, K) in (("gate_up", (2 * I, H)), ("down", (H, I))):
                rows.append(dict(label=f"{model} b{B} {prod}", model=model, batch=B, product=prod,
                                 E=E, N=N, K=K, counts=counts))
    return rows


def prefill_rows(args):
    rows = []
    for (E, N, K, T, uneven) in ARK_SHAPES:
        rows.append(dict(label=f"ark E{E} N{N} K{K} T{T}{' uneven' if uneven else ''}", model="ark", batch=T,
                         product="grouped", E=E, N=N, K=K, counts=split(T, E, uneven)))
    for model in args.models:
        H, I, E, k = MODELS[model]
        for B in args.prefill_batches:
            counts = route(B, E, k, seed=4321 + B)
            for prod, (N, K) in (("gate_up", (2 * I, H)), ("down", (H, I))):
                rows.append(dict(label=f"{model} b{B} {prod}", model=model, batch=B, product=prod,
                                 E=E, N=N, K=K, counts=counts))
    return rows


def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu-bench-out")
    ap.add_argument("--phase", choices=["decode", "prefill", "crossover"], default="decode")
    ap.add_argument("--tokens-per-expert", default="1,2,4,6,8,12,16,24,32,48,64",
                    help="crossover: tokens each expert gets")
    ap.add_argument("--encodings", default="int4,int8,int2,fp8,bf16")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default="1,8,64", help="decode batches (tokens before top-k)")
    ap.add_argument("--prefill-batches", default="512,4096")
    ap.add_argument("--products", default="gate_up,down,grouped")
    ap.add_argument("--act", choices=["bf16", "f16"], default="bf16")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--quick", action="store_true", help="batch 1 and 64 only, int4 and bf16 only")
    ap.add_argument("--check", action="store_true", help="compare every qmoe output with a float32 torch reference")
    ap.add_argument("--no-anchors", action="store_true")
    ap.add_argument("--backend", choices=["auto", "package", "shim"], default="auto")
    ap.add_argument("--lib", default="build/gpu/libqmoe.a")
    ap.add_argument("--mem-gib", type=float, default=24.0, help="device memory for input copies")
    ap.add_argument("--tag", default="", help="free text stored with the results")
    args = ap.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.prefill_batches = [int(b) for b in args.prefill_batches.split(",") if b]
    encs = [e for e in args.encodings.split(",") if e]
    if args.quick:
        args.batches = [b for b in args.batches if b in (1, 64)] or args.batches
        encs = [e for e in encs if e in ("int4", "bf16")] or encs
    for e in encs:
        if e not in ENCODINGS:
            raise SystemExit(f"unknown encoding {e}; known: {', '.join(ENCODINGS)}")
    products = set(args.products.split(","))
    dtype = torch.bfloat16 if args.act == "bf16" else torch.float16

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    backend = Backend(args.backend, args.lib)
    props = torch.cuda.get_device_properties(0)
    card = torch.cuda.get_device_name(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    bw = copy_bandwidth()
    rate = dense_rate() if args.phase == "prefill" else None
    meta = dict(card=card, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, backend=backend.name, sms=props.multi_processor_count, l2_bytes=l2,
                copy_bw_GBps=bw / 1e9, dense_bf16_TFLOPs=rate / 1e12 if rate else None, phase=args.phase,
                act=args.act, group_size=args.group_size, tag=args.tag,
                env={k: v for k, v in os.environ.items() if k.startswith("QMOE_")})
    print(f"# {card}: copy {bw / 1e12:.2f} TB/s (read + write)" +
          (f", dense bf16 {rate / 1e12:.0f} TFLOP/s" if rate else "") + f", L2 {l2 >> 20} MB; {backend.name}",
          flush=True)

    if args.phase == "crossover":
        return crossover(args, backend, meta, encs, dtype, l2, products)
    shapes = decode_rows(args) if args.phase == "decode" else prefill_rows(args)
    shapes = [s for s in shapes if s["product"] in products]
    mem_cap = args.mem_gib * (1 << 30)
    results = []
    for s in shapes:
        E, N, K, counts = s["E"], s["N"], s["K"], s["counts"]
        active = int((counts > 0).sum())
        anchors = {}
        per_enc = []
        for enc in (["bf16"] if not args.no_anchors else []) + [e for e in encs if e != "bf16"] + \
                (["bf16"] if "bf16" in encs and args.no_anchors else []):
            prob = rotated_problem(E, N, K, counts, enc, dtype, args.group_size, l2, mem_cap)
            copies = prob.copies
            row = dict(card=card, label=s["label"], model=s["model"], batch=s["batch"], product=s["product"],
                       encoding=enc, E=E, N=N, K=K, T=prob.T, active_experts=active,
                       max_tokens_per_expert=int(counts.max()), copies=copies,
                       active_weight_MB=active * prob.expert_bytes() / 1e6, bytes_moved=prob.bytes_moved(),
                       copy_bw_GBps=bw / 1e9)
            try:
                ms, info = timed(lambda i: backend.call(args.phase, prob, i), copies)
                row.update(qmoe_ms=ms, **info)
                if args.check:
                    got = backend.call(args.phase, prob, 0).float()
                    ref = prob.reference(0)
                    row["rel_err"] = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            except Exception as ex:
                row.update(qmoe_ms=None, error=str(ex).splitlines()[0][:200])
            if enc == "bf16" and not args.no_anchors and not anchors:
                anchors = torch_anchors(prob, args.phase, with_matmul=args.phase == "prefill")
            if enc in encs:
                per_enc.append(row)
            del prob
            torch.cuda.empty_cache()
        for row in per_enc:
            row.update(anchors)
            t = row.get("qmoe_ms")
            if args.phase == "decode":
                row["floor_ms"] = row["bytes_moved"] / bw * 1e3
            else:
                row["floor_ms"] = 2 * row["T"] * N * K / rate * 1e3
                row["dense_TFLOPs"] = rate / 1e12
                if t:
                    row["TFLOPs"] = 2 * row["T"] * N * K / (t / 1e3) / 1e12
            if t:
                row["pct_floor"] = 100 * row["floor_ms"] / t
                best = [x for x in (row.get("torch_loop_ms"), row.get("grouped_mm_ms")) if x]
                if best:
                    row["best_torch_ms"] = min(best)
                    row["speedup_vs_torch"] = min(best) / t
            results.append(row)
            print(f"{row['label']:<34} {row['encoding']:<9} act {row['active_experts']:>3} "
                  f"maxtok {row['max_tokens_per_expert']:>4} {row['active_weight_MB']:9.1f} MB  "
                  f"floor {fmt(row['floor_ms'] * 1e3)} us  qmoe {fmt(t and t * 1e3)} us  "
                  f"{fmt(row.get('pct_floor'))}% floor  loop {fmt(row.get('torch_loop_ms') and row['torch_loop_ms'] * 1e3)} "
                  f"gmm {fmt(row.get('grouped_mm_ms') and row['grouped_mm_ms'] * 1e3)} us  "
                  f"x{fmt(row.get('speedup_vs_torch'), 2)}" +
                  (f"  err {row['rel_err']:.2e}" if "rel_err" in row else "") +
                  (f"  ERROR {row['error']}" if "error" in row else ""), flush=True)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.phase}.json"), "w") as f:
        json.dump(dict(meta=meta, rows=results), f, indent=1, default=str)
    md = markdown(meta, results, args.phase)
    with open(os.path.join(args.out, f"{args.phase}.md"), "w") as f:
        f.write(md)
    print()
    print(md)


def crossover(args, backend, meta, encs, dtype, l2, products):
    """Decode vs prefill kernel on the same inputs, m tokens on every expert."""
    ms_list = [int(m) for m in args.tokens_per_expert.split(",") if m]
    mem_cap = args.mem_gib * (1 << 30)
    rows = []
    for model in args.models:
        H, I, E, k = MODELS[model]
        for prod, (N, K) in (("gate_up", (2 * I, H)), ("down", (H, I))):
            if prod not in products:
                continue
            for enc in encs:
                for m in ms_list:
                    counts = torch.full((E,), m, dtype=torch.int32)
                    prob = rotated_problem(E, N, K, counts, enc, dtype, args.group_size, l2, mem_cap)
                    copies = prob.copies
                    row = dict(card=meta["card"], model=model, product=prod, encoding=enc, E=E, N=N, K=K,
                               tokens_per_expert=m, T=prob.T)
                    for phase in ("decode", "prefill"):
                        try:
                            row[f"{phase}_ms"], _ = timed(lambda i: backend.call(phase, prob, i), copies)
                        except Exception as ex:
                            row[f"{phase}_ms"], row[f"{phase}_error"] = None, str(ex).splitlines()[0][:160]
                    rows.append(row)
                    print(f"{model:<18} {prod:<8} {enc:<5} m={m:<3} decode {fmt(row['decode_ms'] and row['decode_ms'] * 1e3)} us"
                          f"  prefill {fmt(row['prefill_ms'] and row['prefill_ms'] * 1e3)} us", flush=True)
                    del prob
                    torch.cuda.empty_cache()
    # The crossover of each (model, product, encoding): the smallest m from
    # which prefill stays at least as fast for every larger m measured.
    summary = {}
    for r in rows:
        summary.setdefault((r["model"], r["product"], r["encoding"]), []).append(r)
    lines = [f"## decode / prefill crossover on {meta['card']} ({meta['date']})", "",
             f"Every expert gets m tokens; activations {meta['act']}, group size {meta['group_size']}; "
             f"times in us (CUDA-graph replays, inputs rotated past the L2); {meta['backend']}.", "",
             "| layer | product | enc | " + " | ".join(f"m={m}" for m in ms_list) + " | prefill from m |",
             "|---|---|---|" + "---|" * len(ms_list) + "---|"]
    for (model, prod, enc), rs in summary.items():
        cells, cross = [], None
        for r in sorted(rs, key=lambda r: r["tokens_per_expert"]):
            d, p = r.get("decode_ms"), r.get("prefill_ms")
            cells.append(f"{fmt(d and d * 1e3)} / {fmt(p and p * 1e3)}")
        for r in sorted(rs, key=lambda r: -r["tokens_per_expert"]):
            d, p = r.get("decode_ms"), r.get("prefill_ms")
            if d and p and p <= d:
                cross = r["tokens_per_expert"]
            else:
                break
        lines.append(f"| {model} | {prod} | {enc} | " + " | ".join(cells) + f" | {cross if cross else '-'} |")
    lines.append("")
    lines.append("Cells: decode us / prefill us.")
    md = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "crossover.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
    with open(os.path.join(args.out, "crossover.md"), "w") as f:
        f.write(md)
    print()
    print(md)


def markdown(meta, rows, phase):
    lines = [f"## qmoe {phase} on {meta['card']} ({meta['date']})", "",
             f"Device copy bandwidth {meta['copy_bw_GBps']:.0f} GB/s (bytes read + written)" +
             (f"; dense bf16 {meta['dense_bf16_TFLOPs']:.0f} TFLOP/s" if meta.get('dense_bf16_TFLOPs') else "") +
             f"; activations {meta['act']}, group size {meta['group_size']}; torch {meta['torch']}; {meta['backend']}."
             + (f" Tuning env: {meta['env']}." if meta.get("env") else ""), ""]
    if phase == "decode":
        lines += ["| row | enc | active experts | max tok/expert | active MB | floor us | qmoe us | % floor | "
                  "torch loop us | _grouped_mm us | vs best torch |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['label']} | {r['encoding']} | {r['active_experts']} | {r['max_tokens_per_expert']} | "
                         f"{r['active_weight_MB']:.1f} | {r['floor_ms'] * 1e3:.1f} | "
                         f"{fmt(r.get('qmoe_ms') and r['qmoe_ms'] * 1e3)} | {fmt(r.get('pct_floor'))} | "
                         f"{fmt(r.get('torch_loop_ms') and r['torch_loop_ms'] * 1e3)} | "
                         f"{fmt(r.get('grouped_mm_ms') and r['grouped_mm_ms'] * 1e3)} | "
                         f"{fmt(r.get('speedup_vs_torch'), 2)}x |")
    else:
        lines += ["| row | enc | T | qmoe us | TFLOP/s | % dense rate | matmul same size us | _grouped_mm us | "
                  "torch loop us | vs best torch |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['label']} | {r['encoding']} | {r['T']} | {fmt(r.get('qmoe_ms') and r['qmoe_ms'] * 1e3)} | "
                         f"{fmt(r.get('TFLOPs'))} | {fmt(r.get('pct_floor'))} | "
                         f"{fmt(r.get('dense_same_size_ms') and r['dense_same_size_ms'] * 1e3)} | "
                         f"{fmt(r.get('grouped_mm_ms') and r['grouped_mm_ms'] * 1e3)} | "
                         f"{fmt(r.get('torch_loop_ms') and r['torch_loop_ms'] * 1e3)} | "
                         f"{fmt(r.get('speedup_vs_torch'), 2)}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
