#!/usr/bin/env python3
"""Model-level MoE benchmark, after ARK's (AutoRound PR #1813, test_moe_model_perf.py).

    python3 bench/model_bench.py --out DIR                 # tiny slices (CI-sized)
    QMOE_FULL=1 python3 bench/model_bench.py --out DIR     # full-size models (GPU)

Table 1, the models: Qwen1.5-MoE-A2.7B and DeepSeek-V2-Lite built with
transformers from their published configurations (written below; nothing is
downloaded) with random weights. By default a tiny slice (2 decoder layers, 4
routed experts, top-k at most 2, every other dimension as published); the
whole model with QMOE_FULL=1 (or --full). For each activation dtype (fp16,
bf16): the unquantized transformers model (its default experts
implementation, named in the output), then the same model with its MoE blocks
replaced by qmoe (qmoe.integrations.transformers.quantize_moe: routed and
shared experts in the encoding, one qmoe.fused_moe call per block) for each
encoding (int4, int8, int2, fp8 e4m3). Measured, tokenizer-free, on a fixed
random prompt of 128 token ids:

* prefill: one forward of the prompt (with a KV cache), median of 3 after a
  warm-up;
* decode per token: generate 32 new tokens (greedy, no early stop) after a
  4-token generate warm-up; the time from the first generated token to the
  last over 31, marked by a logits processor (CUDA events on a GPU), so the
  prefill is not in it; median of 3 generate calls;
* tokens/s and the speedup against the unquantized model of the same dtype.

Eager generate spends most of a decode step in Python and kernel launches;
--compiled runs every model's decode steps through transformers' static KV
cache with the forward compiled (torch.compile, mode reduce-overhead: CUDA
graphs on a GPU; transformers skips the compile on a CPU and says so), warmed
up with two generate calls of the measured length.

On the CPU the defaults are smaller, to run in minutes on a 2-core CI machine:
bf16 only, encodings int4 and int8, layer batches 1 and 8 (--all: the GPU's
lists; or name them with --dtypes, --encodings, --batches).

The program exits with status 1 if qmoe decodes a token slower than the
unquantized model in any row (ARK's guard allowed 2x; this one allows none),
2 on an error.

Table 2, the MoE layer alone, for the four model shapes of DESIGN.md section 5
(Qwen1.5-MoE-A2.7B, DeepSeek-V2-Lite, Mixtral-8x7B, Qwen3-30B-A3B) at batch 1,
8, 64, 512, 4096 tokens (CPU: 1, 8): qmoe.fused_moe (routing from logits,
grouping, both products, SiLU-mul, weighted sum, shared expert; int4 by
default) against PyTorch on bf16 weights: the per-expert loop of
transformers' eager experts and the torch._grouped_mm path of its
"grouped_mm" experts (where torch has it), with the same routing in torch.
Beside them the byte floor of what qmoe reads: the weights, scales and zeros
of the experts the batch touches (and of the shared expert) over the measured
bandwidth (GPU: device copy, bytes read + written; CPU: read bandwidth of a
sum over 512 MiB).

Timing: on a GPU, CUDA events; the layer calls as the median of >= 20 timed
CUDA-graph replays (qmoe and grouped_mm; the per-expert loop synchronises
with the host and runs eagerly), inputs rotated over copies so that the L2
does not hold them; on the CPU, wall clock. Output: markdown on stdout and,
with --out DIR, model_bench.md and model_bench.json (written as rows finish).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------
# Published configurations (config.json of the Hugging Face checkpoints)
# ---------------------------------------------------------------------------

QWEN15_MOE_A27B = dict(  # Qwen/Qwen1.5-MoE-A2.7B
    architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe",
    attention_dropout=0.0, bos_token_id=151643, eos_token_id=151643, hidden_act="silu",
    hidden_size=2048, initializer_range=0.02, intermediate_size=5632,
    max_position_embeddings=8192, max_window_layers=21, num_attention_heads=16,
    num_hidden_layers=24, num_key_value_heads=16, rms_norm_eps=1e-06, rope_theta=1000000.0,
    sliding_window=32768, tie_word_embeddings=False, use_cache=True, use_sliding_window=False,
    vocab_size=151936, decoder_sparse_step=1, moe_intermediate_size=1408,
    shared_expert_intermediate_size=5632, num_experts_per_tok=4, num_experts=60,
    norm_topk_prob=False, output_router_logits=False, router_aux_loss_coef=0.001,
)
DEEPSEEK_V2_LITE = dict(  # deepseek-ai/DeepSeek-V2-Lite
    architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2",
    attention_bias=False, attention_dropout=0.0, aux_loss_alpha=0.001, bos_token_id=100000,
    eos_token_id=100001, first_k_dense_replace=1, hidden_act="silu", hidden_size=2048,
    initializer_range=0.02, intermediate_size=10944, kv_lora_rank=512,
    max_position_embeddings=163840, moe_intermediate_size=1408, moe_layer_freq=1, n_group=1,
    n_routed_experts=64, n_shared_experts=2, norm_topk_prob=False, num_attention_heads=16,
    num_experts_per_tok=6, num_hidden_layers=27, num_key_value_heads=16, pretraining_tp=1,
    q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, rms_norm_eps=1e-06,
    rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                  "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                  "type": "yarn"},
    rope_theta=10000, routed_scaling_factor=1.0, scoring_func="softmax", seq_aux=True,
    tie_word_embeddings=False, topk_group=1, topk_method="greedy", use_cache=True,
    v_head_dim=128, vocab_size=102400,
)
MODELS = {
    "qwen1.5-moe-a2.7b": ("Qwen1.5-MoE-A2.7B", QWEN15_MOE_A27B, "num_experts"),
    "deepseek-v2-lite": ("DeepSeek-V2-Lite", DEEPSEEK_V2_LITE, "n_routed_experts"),
}

# The MoE layers of DESIGN.md section 5: hidden, expert intermediate, experts, top-k,
# shared expert width (0: none), its sigmoid gate, renormalised top-k weights.
LAYERS = {
    "Qwen1.5-MoE-A2.7B": dict(H=2048, I=1408, E=60, k=4, Is=5632, gate=True, renorm=False),
    "DeepSeek-V2-Lite": dict(H=2048, I=1408, E=64, k=6, Is=2 * 1408, gate=False, renorm=False),
    "Mixtral-8x7B": dict(H=4096, I=14336, E=8, k=2, Is=0, gate=False, renorm=True),
    "Qwen3-30B-A3B": dict(H=2048, I=768, E=128, k=8, Is=0, gate=False, renorm=True),
}

ENCODINGS = {  # name -> quantize_moe / quantize_experts arguments
    "int4": dict(weight_bits=4), "int4_asym": dict(weight_bits=4, asym=True),
    "int8": dict(weight_bits=8), "int8_asym": dict(weight_bits=8, asym=True),
    "int2": dict(weight_bits=2), "int2_asym": dict(weight_bits=2, asym=True),
    "fp8_e4m3": dict(fp8="e4m3"), "fp8_e5m2": dict(fp8="e5m2"),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
L2_BYTES = 50 << 20  # Hopper's L2, an upper bound for the rotation of inputs


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


class Clock:
    """Wall clock on the CPU, CUDA events on a GPU (each interval is a median sample)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def samples(self, fn, runs: int, warmup: int = 1) -> list[float]:
        """Seconds of each of `runs` calls of fn (after `warmup` calls)."""
        for _ in range(warmup):
            fn()
        self.sync()
        out = []
        for _ in range(runs):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                out.append(a.elapsed_time(b) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
        return out

    def median(self, fn, runs: int, warmup: int = 1) -> float:
        return statistics.median(self.samples(fn, runs, warmup))


def graph_time(fns, runs: int = 20) -> float:
    """Median seconds of one call, from CUDA-graph replays of all `fns` (one call each,
    several input copies); eager warm-up on a side stream first."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    clock = Clock(torch.device("cuda"))
    return clock.median(g.replay, runs, warmup=3) / len(fns)


def bandwidth(device: torch.device) -> tuple[float, str]:
    """(bytes/s, how): GPU device copy (read + written), CPU read of a 512 MiB sum."""
    clock = Clock(device)
    if device.type == "cuda":
        n = 1 << 30
        src = torch.empty(n, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        t = clock.median(lambda: dst.copy_(src), runs=20, warmup=3)
        del src, dst
        return 2 * n / t, "device copy of 1 GiB, bytes read + written"
    x = torch.ones(128 << 20, dtype=torch.float32)
    t = clock.median(lambda: x.sum(), runs=10, warmup=2)
    return x.numel() * 4 / t, f"read (torch.sum of 512 MiB, {torch.get_num_threads()} threads)"


# ---------------------------------------------------------------------------
# Table 1: the models
# ---------------------------------------------------------------------------


def model_config(key: str, full: bool, num_layers: int | None, num_experts: int | None):
    import transformers

    title, published, experts_key = MODELS[key]
    cfg = dict(published)
    cfg.pop("architectures")
    model_type = cfg.pop("model_type")
    if not full:
        cfg["num_hidden_layers"] = num_layers or 2
        cfg[experts_key] = num_experts or 4
        cfg["num_experts_per_tok"] = min(cfg["num_experts_per_tok"], max(1, cfg[experts_key] // 2))
    else:
        if num_layers:
            cfg["num_hidden_layers"] = num_layers
        if num_experts:
            cfg[experts_key] = num_experts
    cls = transformers.AutoConfig.for_model(model_type).__class__
    return title, cls(**cfg)


def build_model(config, dtype, device, seed: int):
    import transformers

    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def step_clock(cuda: bool):
    """A StepClock (a transformers LogitsProcessor) for one generate call."""
    from transformers import LogitsProcessor

    class _StepClock(StepClock, LogitsProcessor):
        pass

    return _StepClock(cuda)


class StepClock:
    """A logits processor that marks the time of every generated token: generate
    calls it after each forward (the prompt's, then one per decode step). On a GPU
    the marks are CUDA events recorded in the stream (no synchronisation)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks = []

    def __call__(self, input_ids, scores):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())
        return scores

    def decode_seconds(self) -> float:
        """Mean seconds a decode step, from the first token's mark to the last's."""
        n = len(self.marks) - 1
        if self.cuda:
            self.marks[-1].synchronize()
            return self.marks[0].elapsed_time(self.marks[-1]) / 1e3 / n
        return (self.marks[-1] - self.marks[0]) / n


def measure_model(model, clock: Clock, prompt, new_tokens: int, runs: int, compiled: bool = False) -> dict:
    """Prefill and decode times of `model`. compiled: decode steps through
    transformers' static KV cache with the forward compiled (torch.compile,
    mode reduce-overhead: CUDA graphs on a GPU), the same for every model; the
    warm-up then runs the measured length twice (compile, graph capture)."""
    from transformers import LogitsProcessorList

    gen_kw = dict(do_sample=False, pad_token_id=0)
    if compiled:
        from transformers import CompileConfig

        torch._dynamo.reset()  # graphs of an earlier model (or experts implementation) go
        if hasattr(model, "_compiled_call"):
            del model._compiled_call
        gen_kw.update(cache_implementation="static",
                      compile_config=CompileConfig(fullgraph=False, mode="reduce-overhead"))

    def prefill():
        with torch.no_grad():
            model(prompt, use_cache=True)

    def generate(n, step_clock=None):
        procs = LogitsProcessorList([step_clock] if step_clock else [])
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, logits_processor=procs,
                                 **gen_kw)
        assert out.shape[1] == prompt.shape[1] + n, out.shape
        return out

    if compiled:
        generate(new_tokens)
        generate(new_tokens)
    else:
        generate(4)  # the 4-token warm-up
    t_prefill = clock.median(prefill, runs, warmup=1)
    per_run = []
    for _ in range(runs):
        sc = step_clock(clock.cuda)
        generate(new_tokens, sc)
        per_run.append(sc.decode_seconds())
    decode = statistics.median(per_run)
    return dict(prefill_ms=t_prefill * 1e3, prefill_tok_s=prompt.shape[1] / t_prefill,
                decode_ms_per_token=decode * 1e3, decode_tok_s=1.0 / decode,
                decode_runs_ms=[t * 1e3 for t in per_run])


def model_rows(args, device, clock, rows, sink):
    """Appends the rows of table 1 to `rows`, calling sink() after each."""
    import qmoe.integrations.transformers as qt

    for key in args.models:
        title, config = model_config(key, args.full, args.layers, args.experts)
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            if device.type == "cpu" and dtype == torch.float16 and not args.full:
                pass  # runs, only slowly (PyTorch's CPU fp16 GEMMs)
            log(f"[model] {title} {dname}: building ({config.num_hidden_layers} layers)")
            t0 = time.perf_counter()
            model = build_model(config, dtype, device, seed=0)
            gen = torch.Generator().manual_seed(1234)
            prompt = torch.randint(100, min(config.vocab_size, 30000), (1, args.prompt),
                                   generator=gen).to(device)
            base_impl = getattr(model.config, "_experts_implementation", None) or "eager"
            n_moe = len(qt.find_moe_blocks(model))
            log(f"[model] built in {time.perf_counter() - t0:.1f} s; {n_moe} MoE blocks; "
                f"experts implementation {base_impl}")
            base = measure_model(model, clock, prompt, args.new_tokens, args.runs, args.compiled)
            row = dict(model=title, dtype=dname, impl=f"transformers ({base_impl})",
                       encoding=dname, layers=config.num_hidden_layers, moe_blocks=n_moe, **base,
                       prefill_speedup=1.0, decode_speedup=1.0)
            rows.append(row)
            sink()
            for enc in args.encodings:
                t0 = time.perf_counter()
                try:
                    qt.quantize_moe(model, group_size=args.group_size, keep_original=True,
                                    quantize_shared=not args.shared_16bit, **ENCODINGS[enc])
                except Exception as e:  # an encoding the build cannot run: say so, go on
                    log(f"[model] {title} {dname} {enc}: {type(e).__name__}: {e}")
                    rows.append(dict(model=title, dtype=dname, impl="qmoe", encoding=enc,
                                     error=f"{type(e).__name__}: {e}"))
                    sink()
                    continue
                tq = time.perf_counter() - t0
                try:
                    m = measure_model(model, clock, prompt, args.new_tokens, args.runs, args.compiled)
                    row = dict(model=title, dtype=dname, impl="qmoe", encoding=enc,
                               layers=config.num_hidden_layers, moe_blocks=n_moe,
                               quantize_s=tq, **m,
                               prefill_speedup=base["prefill_ms"] / m["prefill_ms"],
                               decode_speedup=base["decode_ms_per_token"] / m["decode_ms_per_token"])
                    row["guard"] = "ok" if m["decode_ms_per_token"] <= base["decode_ms_per_token"] \
                        else "SLOWER"
                except Exception as e:
                    log(traceback.format_exc())
                    row = dict(model=title, dtype=dname, impl="qmoe", encoding=enc,
                               error=f"{type(e).__name__}: {e}")
                rows.append(row)
                sink()
                qt.restore_moe(model)
                log(f"[model] {title} {dname} {enc}: {fmt_row(row)}")
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()


def fmt_row(r):
    if "error" in r:
        return r["error"]
    return (f"prefill {r['prefill_ms']:.2f} ms, decode {r['decode_ms_per_token']:.3f} ms/token "
            f"(x{r['decode_speedup']:.2f})")


# ---------------------------------------------------------------------------
# Table 2: the MoE layer alone
# ---------------------------------------------------------------------------


def torch_route(logits, k, renorm):
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(probs, k, dim=-1)
    if renorm:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, ids


def torch_loop_layer(x, logits, w, shape):
    """transformers' eager experts: a loop over the experts with tokens (host sync)."""
    k, E = shape["k"], shape["E"]
    tw, ids = torch_route(logits, k, shape["renorm"])
    out = torch.zeros_like(x)
    mask = F.one_hot(ids, num_classes=E).permute(2, 1, 0)
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit:
        e = e[0]
        pos, tok = torch.where(mask[e])
        g, u = F.linear(x[tok], w["gate_up"][e]).chunk(2, dim=-1)
        y = F.linear(F.silu(g) * u, w["down"][e]) * tw[tok, pos, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out + shared_torch(x, w, shape)


def shared_torch(x, w, shape):
    if not shape["Is"]:
        return 0
    g, u = F.linear(x, w["shared_gate_up"]).chunk(2, dim=-1)
    y = F.linear(F.silu(g) * u, w["shared_down"])
    if shape["gate"]:
        y = torch.sigmoid(F.linear(x, w["shared_gate"][None])) * y
    return y


def grouped_mm_layer(x, logits, w, shape):
    """transformers' "grouped_mm" experts: sort by expert, two torch._grouped_mm."""
    k, E = shape["k"], shape["E"]
    tw, ids = torch_route(logits, k, shape["renorm"])
    flat = ids.reshape(-1)
    sorted_ids, perm = torch.sort(flat)
    xs = x[perm // k]
    counts = torch.histc(sorted_ids.float() if x.device.type == "cpu" else sorted_ids.int(),
                         bins=E, min=0, max=E - 1)
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
    gu = torch._grouped_mm(xs, w["gate_up"].transpose(-2, -1), offs=offs)
    g, u = gu.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(g) * u, w["down"].transpose(-2, -1), offs=offs)
    y = y * tw.reshape(-1)[perm].unsqueeze(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=x.device)
    out = y[inv].view(x.shape[0], k, -1).sum(dim=1).to(x.dtype)
    return out + shared_torch(x, w, shape)


def layer_weights(shape, device, gen_seed: int, enc: str):
    """bf16 weights (torch anchors) and their qmoe encoding (routed and shared)."""
    import qmoe

    H, I, E, Is = shape["H"], shape["I"], shape["E"], shape["Is"]
    g = torch.Generator(device=device).manual_seed(gen_seed)

    def rand(*s, fan):  # drawn on the benchmark's device, in bf16
        return torch.randn(*s, generator=g, dtype=torch.bfloat16, device=device) / math.sqrt(fan)

    w16 = {"gate_up": rand(E, 2 * I, H, fan=H), "down": rand(E, H, I, fan=I)}
    if Is:
        w16["shared_gate_up"] = rand(2 * Is, H, fan=H)
        w16["shared_down"] = rand(H, Is, fan=Is)
        if shape["gate"]:
            w16["shared_gate"] = rand(H, fan=H)
    kw = ENCODINGS[enc]
    q = {"gate_up": qmoe.quantize_experts(w16["gate_up"], group_size=128, **kw),
         "down": qmoe.quantize_experts(w16["down"], group_size=128, **kw)}
    if Is:
        q["shared_gate_up"] = qmoe.quantize_experts(w16["shared_gate_up"][None], group_size=128, **kw)
        q["shared_down"] = qmoe.quantize_experts(w16["shared_down"][None], group_size=128, **kw)
    return w16, q


def qmoe_layer(x, logits, q, w16, shape):
    import qmoe

    kw = {}
    if shape["Is"]:
        kw = dict(shared_gate_up_weights=q["shared_gate_up"], shared_down_weights=q["shared_down"],
                  shared_gate=w16.get("shared_gate"))
    return qmoe.fused_moe(x, q["gate_up"], q["down"], router_logits=logits, top_k=shape["k"],
                          renormalize=shape["renorm"], **kw)


def touched_bytes(ids_list, q, shape) -> float:
    """Mean bytes qmoe reads per call: experts with tokens (+ the shared expert)."""
    per_expert = q["gate_up"].nbytes_per_expert + q["down"].nbytes_per_expert
    shared = 0
    if shape["Is"]:
        shared = q["shared_gate_up"].nbytes_per_expert + q["shared_down"].nbytes_per_expert
    n = [int(torch.unique(ids).numel()) for ids in ids_list]
    return statistics.mean(n) * per_expert + shared


KERNEL_NAMES = (  # short names of qmoe's kernels in the profiler's (demangled) names
    ("route_group_kernel", "route+group"), ("route_count_kernel", "route+count"), ("route_warp_kernel", "route"),
    ("route_kernel", "route"),
    ("group_kernel", "group"), ("group_count_kernel", "group"), ("group_place_kernel", "group"),
    ("gather_kernel", "gather"), ("swiglu_kernel", "swiglu"),
    ("combine_kernel", "combine"), ("decode_kernel", "decode product"), ("prefill", "prefill product"),
    ("generic_kernel", "generic product"), ("shared_prologue_kernel", "shared prologue"))


def kernel_breakdown(fn, calls: int = 10) -> dict:
    """Mean device time (us) of each qmoe kernel kind in one call of fn, from
    torch.profiler's CUDA kernel records (graph-free eager calls). On sm_90 the
    layer launches its kernels early (programmatic dependent launch): a record
    then starts at the early launch and includes the wait for the kernel before
    (QMOE_PDL=0 gives records without it)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out: dict = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        short = next((s for key, s in KERNEL_NAMES if key in ev.name), None)
        if short is None:
            short = "other (" + ev.name[:40] + ")"
        out[short] = out.get(short, 0.0) + ev.device_time / calls
    return out


def layer_rows(args, device, clock, bw, rows, sink):
    """Appends the rows of table 2 to `rows`, calling sink() after each."""
    has_grouped = hasattr(torch, "_grouped_mm")
    for name in args.layer_models:
        shape = LAYERS[name]
        for enc in args.layer_encodings:
            log(f"[layer] {name} {enc}: weights")
            w16, q = layer_weights(shape, device, 7, enc)
            for B in args.batches:
                gen = torch.Generator().manual_seed(B)
                copies = 1
                if device.type == "cuda":  # rotate inputs so the L2 cannot hold them
                    copies = 4 if B <= 64 else 2
                xs = [torch.randn(B, shape["H"], generator=gen).to(torch.bfloat16).to(device)
                      for _ in range(copies)]
                ls = [torch.randn(B, shape["E"], generator=gen).to(device) for _ in range(copies)]
                ids = [torch_route(lg, shape["k"], False)[1] for lg in ls]
                floor_bytes = touched_bytes(ids, q, shape)
                impls = {"qmoe": lambda i: qmoe_layer(xs[i], ls[i], q, w16, shape),
                         "torch loop": lambda i: torch_loop_layer(xs[i], ls[i], w16, shape)}
                if has_grouped:
                    impls["torch._grouped_mm"] = lambda i: grouped_mm_layer(xs[i], ls[i], w16, shape)
                row = dict(layer=name, encoding=enc, batch=B, floor_bytes=floor_bytes,
                           floor_ms=floor_bytes / bw * 1e3)
                ref = grouped_mm_layer(xs[0], ls[0], w16, shape) if has_grouped else \
                    torch_loop_layer(xs[0], ls[0], w16, shape)
                got = qmoe_layer(xs[0], ls[0], q, w16, shape)
                row["rel_err_vs_bf16"] = ((got.float() - ref.float()).norm() /
                                          ref.float().norm()).item()
                for iname, fn in impls.items():
                    try:
                        t = None
                        if device.type == "cuda" and iname != "torch loop":
                            try:
                                t = graph_time([lambda i=i: fn(i) for i in range(copies)])
                            except Exception as e:  # not capturable: eager events
                                log(f"[layer] {name} B={B} {iname}: no graph ({e}); eager")
                        if t is None:
                            state = {"i": 0}

                            def call():
                                fn(state["i"] % copies)
                                state["i"] += 1

                            t = clock.median(call, args.layer_runs,
                                             warmup=2 if device.type == "cuda" else 1)
                        row[f"{iname}_ms"] = t * 1e3
                    except Exception as e:
                        row[f"{iname}_ms"] = None
                        row[f"{iname}_error"] = f"{type(e).__name__}: {e}"
                        log(f"[layer] {name} B={B} {iname}: {type(e).__name__}: {e}")
                if row.get("qmoe_ms"):
                    row["qmoe_x_floor"] = row["qmoe_ms"] / row["floor_ms"]
                if device.type == "cuda" and B in (1, 64, 4096):
                    try:  # where the layer's time goes, kernel by kernel
                        row["kernels_us"] = kernel_breakdown(lambda: qmoe_layer(xs[0], ls[0], q, w16, shape))
                    except Exception as e:
                        log(f"[layer] {name} B={B}: no kernel breakdown ({type(e).__name__}: {e})")
                rows.append(row)
                sink()
                log(f"[layer] {name} {enc} B={B}: " + ", ".join(
                    f"{k} {v:.3f}" for k, v in row.items() if k.endswith("_ms") and v))
            del w16, q
            if device.type == "cuda":
                torch.cuda.empty_cache()


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def f(x, d=2):
    if x is None:
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.{d}f}"


def markdown(meta, mrows, lrows) -> str:
    out = [f"# qmoe model-level benchmark ({meta['date']})", "",
           f"- device: {meta['device_name']}", f"- torch {meta['torch']}, transformers "
           f"{meta.get('transformers', '—')}, qmoe {meta['qmoe']}",
           f"- models: {'full size' if meta['full'] else 'tiny slice (2 layers, 4 experts, top-k ≤ 2)'}; "
           f"prompt {meta['prompt']} tokens; decode per token = (last − first token of generate "
           f"{meta['new_tokens']}) / {meta['new_tokens'] - 1}; median of {meta['runs']}; "
           f"{'static KV cache, forward compiled (reduce-overhead)' if meta.get('compiled') else 'eager generate'}",
           f"- qmoe blocks: routed{'' if meta['shared_16bit'] else ' and shared'} experts in the "
           f"encoding, group size {meta['group_size']}",
           f"- bandwidth: {meta['bandwidth_gb_s']:.1f} GB/s ({meta['bandwidth_how']})", ""]
    if mrows:
        out += ["## Models", "",
                "| model | dtype | impl | experts | prefill (ms) | prefill tok/s | decode (ms/tok) "
                "| decode tok/s | prefill speedup | decode speedup | guard |",
                "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in mrows:
            if "error" in r:
                out.append(f"| {r['model']} | {r['dtype']} | {r['impl']} | {r['encoding']} | "
                           f"error: {r['error']} ||||||")
                continue
            out.append(
                f"| {r['model']} | {r['dtype']} | {r['impl']} | {r['encoding']} | "
                f"{f(r['prefill_ms'])} | {f(r['prefill_tok_s'], 0)} | "
                f"{f(r['decode_ms_per_token'], 3)} | {f(r['decode_tok_s'], 1)} | "
                f"{f(r['prefill_speedup'])}× | {f(r['decode_speedup'])}× | {r.get('guard', '')} |")
        out.append("")
    if lrows:
        out += ["## MoE layer alone (bf16 activations)", "",
                "| layer | qmoe enc. | batch | floor (ms) | qmoe (ms) | qmoe / floor | "
                "torch loop (ms) | torch._grouped_mm (ms) | vs loop | vs grouped_mm | rel. err vs bf16 |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in lrows:
            q = r.get("qmoe_ms")
            lp, gm = r.get("torch loop_ms"), r.get("torch._grouped_mm_ms")
            out.append(
                f"| {r['layer']} | {r['encoding']} | {r['batch']} | {f(r['floor_ms'], 4)} | "
                f"{f(q, 4)} | {f(r.get('qmoe_x_floor'))} | {f(lp, 3)} | {f(gm, 3)} | "
                f"{f(lp / q) + '×' if q and lp else '—'} | {f(gm / q) + '×' if q and gm else '—'} | "
                f"{f(r['rel_err_vs_bf16'], 4)} |")
        out.append("")
        brk = [r for r in lrows if r.get("kernels_us")]
        if brk:
            out += ["## Where the qmoe layer's time goes (CUDA, device time per call, us)", "",
                    "From torch.profiler's kernel records of eager calls (the sum can differ from the "
                    "graph-replay time above: launch gaps are not in it).", "",
                    "| layer | enc. | batch | kernels (us each kind) | sum |", "|---|---|---:|---|---:|"]
            for r in brk:
                k = r["kernels_us"]
                out.append(f"| {r['layer']} | {r['encoding']} | {r['batch']} | " +
                           ", ".join(f"{n} {v:.1f}" for n, v in sorted(k.items(), key=lambda kv: -kv[1])) +
                           f" | {sum(k.values()):.1f} |")
            out.append("")
    return "\n".join(out)


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="directory for model_bench.md and model_bench.json")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--full", action="store_true", default=os.environ.get("QMOE_FULL") == "1",
                   help="full-size models (also QMOE_FULL=1)")
    p.add_argument("--models", default=",".join(MODELS), help=f"of {','.join(MODELS)}")
    p.add_argument("--dtypes", default=None, help="default fp16,bf16 (CPU: bf16)")
    p.add_argument("--encodings", default=None,
                   help="qmoe encodings of the models (default int4,int8,int2,fp8_e4m3; CPU: int4,int8)")
    p.add_argument("--all", action="store_true",
                   help="on the CPU too: every dtype, encoding and batch of the GPU defaults")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--shared-16bit", action="store_true",
                   help="keep the shared experts 16-bit (default: in the encoding)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (tiny default 2)")
    p.add_argument("--experts", type=int, default=None, help="routed experts (tiny default 4)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--compiled", action="store_true",
                   help="decode with a static KV cache and the forward compiled (CUDA graphs on a GPU), "
                        "for every model alike (default: eager generate)")
    p.add_argument("--layer-models", default=",".join(LAYERS))
    p.add_argument("--layer-encodings", default="int4")
    p.add_argument("--batches", default=None, help="default 1,8,64,512,4096 (CPU: 1,8)")
    p.add_argument("--layer-runs", type=int, default=None, help="default 20 (GPU), 3 (CPU)")
    p.add_argument("--skip-models", action="store_true")
    p.add_argument("--skip-layers", action="store_true")
    a = p.parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    a.models = [m for m in a.models.split(",") if m]
    for m in a.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r} (known: {', '.join(MODELS)})")
    small = a.device == "cpu" and not a.all  # minutes on a 2-core CI machine
    a.dtypes = [d for d in (a.dtypes or ("bf16" if small else "fp16,bf16")).split(",") if d]
    for d in a.dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}")
    default_enc = "int4,int8" if small else "int4,int8,int2,fp8_e4m3"
    a.encodings = [e for e in (a.encodings or default_enc).split(",") if e]
    a.layer_encodings = [e for e in a.layer_encodings.split(",") if e]
    for e in a.encodings + a.layer_encodings:
        if e not in ENCODINGS:
            p.error(f"unknown encoding {e!r} (known: {', '.join(ENCODINGS)})")
    names = {n.lower(): n for n in LAYERS}
    a.layer_models = [names.get(m.lower(), m) for m in a.layer_models.split(",") if m]
    for m in a.layer_models:
        if m not in LAYERS:
            p.error(f"unknown layer {m!r} (known: {', '.join(LAYERS)})")
    default_b = "1,8,64,512,4096" if a.device == "cuda" else ("1,8" if small else "1,8,64")
    a.batches = [int(b) for b in (a.batches or default_b).split(",")]
    if a.layer_runs is None:
        a.layer_runs = 20 if a.device == "cuda" else 3
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    import qmoe

    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                device=str(device), device_name=device_name(device), torch=torch.__version__,
                qmoe=qmoe.__version__, full=args.full, prompt=args.prompt,
                new_tokens=args.new_tokens, runs=args.runs, group_size=args.group_size,
                shared_16bit=args.shared_16bit, compiled=args.compiled, argv=sys.argv[1:])
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        transformers = None
    clock = Clock(device)
    bw, how = bandwidth(device)
    meta.update(bandwidth_gb_s=bw / 1e9, bandwidth_how=how)
    log(f"device {meta['device_name']}; bandwidth {bw / 1e9:.1f} GB/s ({how})")

    mrows, lrows = [], []

    def sink():
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "model_bench.json"), "w") as fh:
                json.dump(dict(meta=meta, models=mrows, layers=lrows), fh, indent=1)
            with open(os.path.join(args.out, "model_bench.md"), "w") as fh:
                fh.write(markdown(meta, mrows, lrows))

    status = 0
    try:
        if not args.skip_models:
            if transformers is None:
                log("transformers is not installed: the model table is skipped "
                    "(pip install 'transformers>=5')")
            else:
                model_rows(args, device, clock, mrows, sink)
        if not args.skip_layers:
            layer_rows(args, device, clock, bw, lrows, sink)
    except Exception:
        log(traceback.format_exc())
        status = 2
    sink()
    print(markdown(meta, mrows, lrows))
    slower = [r for r in mrows if r.get("guard") == "SLOWER"]
    errors = [r for r in mrows if "error" in r]
    if slower:
        log("GUARD: qmoe decodes slower than the unquantized model in: " + "; ".join(
            f"{r['model']} {r['dtype']} {r['encoding']} ({r['decode_speedup']:.2f}x)" for r in slower))
        status = status or 1
    if errors:
        status = status or 2
    return status


if __name__ == "__main__":
    sys.exit(main())
