#!/usr/bin/env python3
"""Times qmoe's CUDA prefill grouped GEMM against its anchors, in one process.

    python3 bench/prefill_bench.py --lib build/gpu/libqmoe.a [--quick] [--check]

qmoe is called through a tiny C shim (compiled here with g++ against the
static library and the public header), so this runs without the Python
package. Anchors, measured in the same run on the same card:
  * dense cuBLAS bf16 (torch.matmul) at the same total size [T, K] x [K, N],
    and 8192^3 for the card's dense rate;
  * torch._grouped_mm on bf16 weights (where present);
  * a per-expert torch loop on bf16 weights (counts known on the host);
  * the device copy bandwidth (bytes read + written).
Every time is the median of >= 25 CUDA-graph replays after warm-up, timed
with device events; a graph holds R calls on R different input sets so the
L2 (50-60 MB) cannot hold them. Floor of a row = max(bytes / copy bandwidth,
2 T N K / dense rate), bytes = active experts' weights + scales + zeros +
activations in + output out (DESIGN.md).

A/B against earlier kernel paths (environment, read once per process, so
one run per setting): QMOE_PREFILL_SCALES=ldg (scales by plain loads instead
of cp.async), QMOE_PREFILL_TILES=256 (no 128-row small-tile schedule) or =128
(always 128-row tiles), QMOE_PREFILL_WGMMA=0 (no Hopper wgmma kernel). The
settings are printed and stored in the JSON.

The two tensor-core kernels in one run, row by row on the same card:
    --paths wgmma,mma     (wgmma: the sm_90a kernel where it applies; mma: the
                           mma.sync kernel; forced through the library's test
                           switch, so the environment's choice is overridden)
"""
import argparse
import ctypes
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_bench import copy_bandwidth, timed  # noqa: E402  (one timing method for every GPU benchmark)

SHIM = r"""
#include <cstdint>
#include <cstdio>
#include "qmoe/qmoe.h"
extern "C" int qmoe_prefill_c(int act, int wtype, int asym, long long E, long long N, long long K,
                              long long T, long long gs, const void* a, const void* w, const void* s,
                              const void* z, const void* counts, void* out, void* stream, int phase,
                              int layout) {
  qmoe::MoeGemmParams p;
  p.act_type = qmoe::ActType(act);
  p.weight_type = qmoe::WeightType(wtype);
  p.asym = asym != 0;
  p.num_experts = E; p.n = N; p.k = K; p.total_tokens = T; p.group_size = gs;
  p.activations = a; p.weights = w; p.scales = s; p.zeros = z;
  p.tokens_per_expert = static_cast<const int32_t*>(counts); p.out = out;
  qmoe::Device d{qmoe::DeviceType::cuda, 0, stream};
  p.layout = qmoe::WeightLayout(layout);
  qmoe::Status st = layout ? qmoe::moe_gemm(p, d) : qmoe::moe(p, d, qmoe::Phase(phase));
  if (!st.ok()) { std::fprintf(stderr, "qmoe: %s\n", st.message.c_str()); return int(st.code); }
  return 0;
}
namespace qmoe::cuda::prefill { void set_wgmma_override(int on); }
namespace qmoe::cuda::prefill { int last_path(); }
extern "C" void qmoe_prefill_path_c(int on) { qmoe::cuda::prefill::set_wgmma_override(on); }
extern "C" int qmoe_prefill_last_path_c() { return qmoe::cuda::prefill::last_path(); }
"""

# The kernel the library's last prefill call took (qmoe::cuda::prefill::last_path):
# moe_gemm_prefill takes the decode kernel for few tokens an expert (quantized weights).
KERNELS = {1: "mma", 2: "wgmma", 3: "decode"}

# ekn16: 16-bit weights in moe_gemm's [E, K, N] layout (qmoe.moe_gemm).
WTYPES = {"native16": 0, "ekn16": 0, "int8": 1, "int4": 2, "int2": 3, "fp8_e4m3": 4, "fp8_e5m2": 5}
BITS = {"native16": 16, "ekn16": 16, "int8": 8, "int4": 4, "int2": 2, "fp8_e4m3": 8, "fp8_e5m2": 8}


def build_shim(lib):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tmp = tempfile.mkdtemp(prefix="qmoe_shim_")
    src, so = os.path.join(tmp, "shim.cpp"), os.path.join(tmp, "shim.so")
    with open(src, "w") as f:
        f.write(SHIM)
    cuda = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    cmd = ["g++", "-O2", "-shared", "-fPIC", "-std=c++17", src, "-I", os.path.join(root, "include"),
           "-Wl,--whole-archive", os.path.abspath(lib), "-Wl,--no-whole-archive",
           "-L", os.path.join(cuda, "lib64"), "-lcudart", "-lpthread", "-o", so]
    subprocess.check_call(cmd)
    dll = ctypes.CDLL(so)
    dll.qmoe_prefill_c.restype = ctypes.c_int
    dll.qmoe_prefill_c.argtypes = ([ctypes.c_int] * 3 + [ctypes.c_longlong] * 5 + [ctypes.c_void_p] * 7
                                   + [ctypes.c_int] * 2)
    dll.qmoe_prefill_path_c.argtypes = [ctypes.c_int]
    dll.qmoe_prefill_last_path_c.restype = ctypes.c_int
    return dll


def timed_graph(fn, reps=25, warm=3):
    """Median ms of one call of fn() (gpu_bench.timed: CUDA-graph replays, device events)."""
    return timed(lambda i: fn(), 1, reps=reps, warm=warm)[0]


def split_tokens(T, E, kind, gen):
    if kind == "even":
        c = [T // E + (1 if i < T % E else 0) for i in range(E)]
    elif kind == "routed":  # each token copy to a uniformly random expert, as random routing does
        c = torch.bincount(torch.randint(E, (T,), generator=gen), minlength=E).tolist()
    else:  # uneven: skewed random split, some experts empty for small T
        w = torch.rand(E, generator=gen) ** 3
        c = (w / w.sum() * T).floor().long().tolist()
        c[0] += T - sum(c)
    return c


class Problem:
    def __init__(self, E, N, K, T, enc, asym, gs, counts, dtype, gen):
        self.E, self.N, self.K, self.T, self.enc, self.asym, self.gs = E, N, K, T, enc, asym, gs
        self.dtype = dtype
        dev = "cuda"
        self.act = (torch.rand(T, K, generator=gen, device=dev) * 2 - 1).to(dtype)
        self.counts = torch.tensor(counts, dtype=torch.int32, device=dev)
        self.out = torch.empty(T, N, dtype=dtype, device=dev)
        if enc in ("native16", "ekn16"):
            shape = (E, K, N) if enc == "ekn16" else (E, N, K)
            self.w = ((torch.rand(*shape, generator=gen, device=dev) * 2 - 1) * 0.05).to(dtype)
            self.s = self.z = None
        else:
            kp = K * BITS[enc] // 8
            w = torch.randint(0, 256, (E, N, kp), dtype=torch.uint8, generator=gen, device=dev)
            if enc == "fp8_e4m3":
                w = torch.where((w & 0x7F) == 0x7F, w ^ 1, w)
            if enc == "fp8_e5m2":
                w = torch.where((w & 0x7C) == 0x7C, w & 0xBB, w)
            self.w = w
            base = {"fp8_e4m3": 1e-3, "fp8_e5m2": 1e-5}.get(enc, 1e-2)
            self.s = (base * (0.5 + torch.rand(E, N, K // gs, generator=gen, device=dev))).to(dtype)
            self.z = (torch.randint(0, (1 << BITS[enc]), (E, N, K // gs), generator=gen, device=dev).to(dtype)
                      if asym else None)

    def nbytes_weights(self, active):
        per = self.w[0].numel() * self.w.element_size()
        if self.s is not None:
            per += self.s[0].numel() * 2 * (2 if self.z is not None else 1)
        return per * active

    def call(self, dll, phase=2):
        ptr = lambda t: t.data_ptr() if t is not None else None
        rc = dll.qmoe_prefill_c(0 if self.dtype == torch.float16 else 1, WTYPES[self.enc], int(self.asym),
                                self.E, self.N, self.K, self.T, self.gs, ptr(self.act), ptr(self.w),
                                ptr(self.s), ptr(self.z), ptr(self.counts), ptr(self.out),
                                torch.cuda.current_stream().cuda_stream, phase, int(self.enc == "ekn16"))
        if rc != 0:
            raise RuntimeError(f"qmoe call failed ({rc})")

    def dequant_bf16(self):
        """[E, N, K] float32 dequantized weights (int4 sym / native16 only), for the spot check."""
        if self.enc == "native16":
            return self.w.float()
        if self.enc == "ekn16":
            return self.w.float().transpose(-2, -1)
        assert self.enc == "int4" and not self.asym
        lo = (self.w & 0xF).to(torch.int16)
        hi = (self.w >> 4).to(torch.int16)
        q = torch.stack([lo, hi], dim=-1).reshape(self.E, self.N, self.K)
        q = torch.where(q >= 8, q - 16, q).float()
        s = self.s.float().repeat_interleave(self.gs, dim=-1)
        return q * s


def torch_anchors(E, N, K, T, counts, gen):
    """Median ms of dense cuBLAS (one expert's weights, all T tokens), torch._grouped_mm and the torch
    per-expert loop, on bf16 weights."""
    act = (torch.rand(T, K, generator=gen, device="cuda") * 2 - 1).to(torch.bfloat16)
    wb = ((torch.rand(E, N, K, generator=gen, device="cuda") - 0.5) * 0.1).to(torch.bfloat16)
    dense_b = wb[0].T.contiguous() if N * K * 2 < 1 << 31 else None
    ms_dense = timed_graph(lambda: torch.matmul(act, dense_b)) if dense_b is not None else float("nan")
    offs = torch.tensor(counts, dtype=torch.int32, device="cuda").cumsum(0).to(torch.int32)
    ms_gmm = float("nan")
    if hasattr(torch, "_grouped_mm"):
        try:
            ms_gmm = timed_graph(lambda: torch._grouped_mm(act, wb.transpose(-2, -1), offs=offs))
        except Exception as ex:  # noqa: BLE001
            print(f"  torch._grouped_mm unavailable: {ex}".splitlines()[0])
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    outl = torch.empty(T, N, dtype=torch.bfloat16, device="cuda")

    def loop():
        for e in range(E):
            if counts[e]:
                torch.matmul(act[bounds[e]:bounds[e + 1]], wb[e].T, out=outl[bounds[e]:bounds[e + 1]])

    ms_loop = timed_graph(loop)
    del wb, dense_b
    return ms_dense, ms_gmm, ms_loop


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default="build/gpu/libqmoe.a")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--check", action="store_true", help="end-to-end check against torch first")
    ap.add_argument("--encodings", default="native16,ekn16,int4,int4a,int8,int8a,fp8_e4m3,int2,int2a",
                    help="ekn16: 16-bit weights [E, K, N] through qmoe.moe_gemm")
    ap.add_argument("--shapes", default="", help="comma-separated substrings of shape labels to run")
    ap.add_argument("--profile", default="", help="E,N,K,T,enc[,even]: three plain calls (for ncu), no timing; "
                    "tokens split unevenly unless 'even' is given")
    ap.add_argument("--no-anchors", action="store_true",
                    help="skip the per-shape torch anchors (A/B runs of qmoe libraries: only qmoe's times compare)")
    ap.add_argument("--paths", default="", help="comma list of wgmma,mma: time each kernel (default: the library's choice)")
    ap.add_argument("--json", default="", help="write the rows here (default: $OUT/prefill_bench*.json "
                    "where $OUT is set); bench/compare_runs.py reads such files side by side")
    args = ap.parse_args()
    known = set(BITS) | {e + "a" for e in BITS if e not in ("native16", "ekn16")}
    bad = [e for e in args.encodings.split(",") if e and e not in known]
    if bad:
        ap.error(f"unknown encodings {bad}: choose from {', '.join(sorted(known))}")
    dll = build_shim(args.lib)
    if args.profile:
        E, N, K, T, encname, *split = args.profile.split(",")
        E, N, K, T = int(E), int(N), int(K), int(T)
        asym = encname.endswith("a") and encname != "native16"
        counts = split_tokens(T, E, "even" if split == ["even"] else "uneven", torch.Generator().manual_seed(99))
        pr = Problem(E, N, K, T, encname[:-1] if asym else encname, asym, 128, counts, torch.bfloat16,
                     torch.Generator(device="cuda").manual_seed(5))
        for _ in range(3):
            pr.call(dll)
        torch.cuda.synchronize()
        print("profiled", args.profile, counts)
        return 0
    torch.manual_seed(0)
    gen = torch.Generator(device="cuda").manual_seed(1234)
    name = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    print(f"card: {name}, {props.multi_processor_count} SMs, torch {torch.__version__}")
    switches = {k: os.environ.get(k, "") for k in ("QMOE_PREFILL_SCALES", "QMOE_PREFILL_TILES", "QMOE_PREFILL_WGMMA")}
    paths = [p for p in args.paths.split(",") if p] or ["auto"]
    print("kernel switches: " + ", ".join(f"{k}={v or 'auto'}" for k, v in switches.items()))

    # Ceilings: copy bandwidth (gpu_bench's 1 GiB device copy, the same anchor
    # as the decode tables) and dense bf16 rate.
    copy_bw = copy_bandwidth()
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = timed_graph(lambda: torch.matmul(a, b))
    dense_rate = 2 * 8192 ** 3 / (ms * 1e-3)
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s, dense bf16 8192^3 {dense_rate / 1e12:.0f} TFLOP/s")
    del a, b

    if args.check:
        for enc in ("int4", "native16", "ekn16"):
            E, N, K = 4, 384, 512
            counts = [100, 0, 37, 300]
            pr = Problem(E, N, K, sum(counts), enc, False, 128, counts, torch.bfloat16, gen)
            pr.out.fill_(float("nan"))
            pr.call(dll)
            torch.cuda.synchronize()
            W = pr.dequant_bf16()
            ref = torch.empty(pr.T, N, dtype=torch.float64, device="cuda")
            off = 0
            for e, c in enumerate(counts):
                ref[off:off + c] = pr.act[off:off + c].double() @ W[e].double().T
                off += c
            err = ((pr.out.double() - ref).norm() / ref.norm()).item()
            print(f"check {enc}: rel err {err:.2e}, nan {torch.isnan(pr.out).sum().item()}")

    shapes = [  # (label, E, N, K, T, split)
        ("ark 8x4096x4096 t252", 8, 4096, 4096, 252, "even"),
        ("ark 8x4096x14336 t528", 8, 4096, 14336, 528, "even"),
        ("ark 8x14336x4096 t528", 8, 14336, 4096, 528, "even"),
        ("ark 16x2048x2048 t256", 16, 2048, 2048, 256, "even"),
        ("ark 32x2048x2048 t256", 32, 2048, 2048, 256, "even"),
        ("ark 64x2048x2048 t256", 64, 2048, 2048, 256, "even"),
        ("ark 8x4096x4096 t610u", 8, 4096, 4096, 610, "uneven"),
        ("mixtral w13 t4096x2", 8, 14336, 4096, 8192, "uneven"),
        ("mixtral w2 t4096x2", 8, 4096, 14336, 8192, "uneven"),
        # The gate/up products of three layers at 512 tokens (uniform random
        # routing): 34, 48 and 32 token copies an expert on average.
        ("qwen1.5 w13 t512x4", 60, 2816, 2048, 2048, "routed"),
        ("deepseek w13 t512x6", 64, 2816, 2048, 3072, "routed"),
        ("qwen3 w13 t512x8", 128, 1536, 2048, 4096, "routed"),
    ]
    if args.quick:
        shapes = [shapes[0], shapes[3], shapes[7]]
    if args.shapes:
        keys = args.shapes.split(",")
        shapes = [sh for sh in shapes if any(k in sh[0] for k in keys)]
    encs = args.encodings.split(",")
    rows = []
    print(f"{'shape':24s} {'enc':9s} {'path':6s} {'qmoe us':>9s} {'TFLOP/s':>8s} {'%dense':>7s} {'%floor':>7s} "
          f"{'gmm us':>8s} {'x gmm':>6s} {'loop us':>8s} {'dense us':>9s}  kernel", flush=True)
    for label, E, N, K, T, split in shapes:
        # Each shape's split from its own seed: the same counts whichever shapes run.
        counts = split_tokens(T, E, split, torch.Generator().manual_seed(99))
        active = sum(1 for c in counts if c > 0)
        flops = 2 * T * N * K
        # Anchors on bf16 weights (one set; weights exceed L2 for the large shapes).
        if args.no_anchors:
            ms_dense = ms_gmm = ms_loop = float("nan")
        else:
            ms_dense, ms_gmm, ms_loop = torch_anchors(E, N, K, T, counts, gen)
        dense_here = flops / (ms_dense * 1e-3)
        for encname in encs:
            asym = encname.endswith("a") and not encname.endswith("16")
            enc = encname[:-1] if asym else encname
            gs = 128
            one = Problem(E, N, K, T, enc, asym, gs, counts, torch.bfloat16, gen)
            set_bytes = one.nbytes_weights(E) + one.act.numel() * 2
            R = max(1, min(6, -(-150_000_000 // set_bytes)))
            probs = [one] + [Problem(E, N, K, T, enc, asym, gs, counts, torch.bfloat16, gen) for _ in range(R - 1)]

            def run_all():
                for pr in probs:
                    pr.call(dll)

            for path in paths:
                dll.qmoe_prefill_path_c({"auto": -1, "wgmma": 1, "mma": 0}[path])
                ms = timed_graph(run_all) / R
                moved = one.nbytes_weights(active) + T * K * 2 + T * N * 2
                floor_s = max(moved / copy_bw, flops / dense_rate)
                r = dict(shape=label, enc=encname, path=path, us=ms * 1e3, tflops=flops / (ms * 1e-3) / 1e12,
                         pct_dense=100 * (flops / (ms * 1e-3)) / dense_here, pct_floor=100 * floor_s / (ms * 1e-3),
                         gmm_us=ms_gmm * 1e3, x_gmm=ms_gmm / ms, loop_us=ms_loop * 1e3, dense_us=ms_dense * 1e3,
                         kernel=KERNELS.get(dll.qmoe_prefill_last_path_c(), "?"))
                rows.append(r)
                print(f"{label:24s} {encname:9s} {path:6s} {r['us']:9.1f} {r['tflops']:8.1f} {r['pct_dense']:6.1f}% "
                      f"{r['pct_floor']:6.1f}% {r['gmm_us']:8.1f} {r['x_gmm']:6.2f} {r['loop_us']:8.1f} "
                      f"{r['dense_us']:9.1f}  {r['kernel']}", flush=True)
            dll.qmoe_prefill_path_c(-1)
            del probs, one
            torch.cuda.empty_cache()
    out = os.environ.get("OUT")
    if out or args.json:
        import json
        tag = "".join(f"_{k.split('_')[-1].lower()}-{v}" for k, v in switches.items() if v)
        with open(args.json or os.path.join(out, f"prefill_bench{tag}.json"), "w") as f:
            json.dump(dict(card=name, copy_bw=copy_bw, dense_rate=dense_rate, switches=switches, rows=rows), f,
                      indent=1)


if __name__ == "__main__":
    sys.exit(main())
