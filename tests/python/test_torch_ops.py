"""qmoe's torch.library ops: registration, opcheck, torch.compile(fullgraph=True)
against eager, and CUDA graph capture (skipped without a GPU)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch.library ops need PyTorch")

import qmoe  # noqa: E402
import qmoe.ops  # noqa: E402

OPS = ("moe_gemm_decode", "moe_gemm_prefill", "moe", "moe_gemm", "fused_moe", "fused_moe_ws",
       "moe_route")


def bits_equal(a, b):
    if isinstance(a, (tuple, list)):
        return all(bits_equal(x, y) for x, y in zip(a, b))
    if a.dtype in (torch.float16, torch.bfloat16):
        return torch.equal(a.view(torch.int16), b.view(torch.int16))
    return torch.equal(a, b)


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def gemm_inputs(gen, E=4, N=48, K=64, counts=(3, 0, 2, 5), bits=4, act=torch.bfloat16,
                device="cpu"):
    w = torch.randn(E, N, K, generator=gen)
    T = sum(counts)
    x = torch.randn(T, K, generator=gen).to(act)
    c = torch.tensor(counts, dtype=torch.int32)
    if bits == 16:
        q, s, z = w.to(act), None, None
    else:
        q, s, z = qmoe.quantize(w, weight_bits=bits, group_size=32, dtype=act)
    kw = dict(scales=s, zeros=z, weight_bits=bits, group_size=32, asym=False)
    return [t.to(device) for t in (x, q, c)], {k: (v.to(device) if torch.is_tensor(v) else v)
                                               for k, v in kw.items()}


def layer_inputs(gen, T=6, H=64, I=32, E=8, bits=4, shared=True, act=torch.bfloat16,
                 device="cpu"):
    wgu = torch.randn(E, 2 * I, H, generator=gen) / math.sqrt(H)
    wd = torch.randn(E, H, I, generator=gen) / math.sqrt(I)
    gu = qmoe.quantize_experts(wgu, weight_bits=bits, group_size=32, dtype=act)
    dn = qmoe.quantize_experts(wd, weight_bits=bits, group_size=32, dtype=act)
    x = torch.randn(T, H, generator=gen).to(act)
    kw = dict(router_logits=torch.randn(T, E, generator=gen), top_k=2, renormalize=True)
    if shared:
        kw["shared_gate_up_weights"] = qmoe.quantize_experts(
            torch.randn(1, 64, H, generator=gen) / math.sqrt(H), weight_bits=16, dtype=act)
        kw["shared_down_weights"] = qmoe.quantize_experts(
            torch.randn(1, H, 32, generator=gen) / math.sqrt(32), weight_bits=8, group_size=32,
            dtype=act)
        kw["shared_gate"] = (torch.randn(H, generator=gen) / math.sqrt(H)).to(act)
    if device != "cpu":
        gu, dn = gu.to(device), dn.to(device)
        x = x.to(device)
        kw = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in kw.items()}
    return x, gu, dn, kw


@pytest.fixture
def gen():
    g = torch.Generator().manual_seed(1234)
    return g


# ---------------------------------------------------------------------------
# Registration and opcheck
# ---------------------------------------------------------------------------


def test_ops_registered():
    for name in OPS:
        op = getattr(torch.ops.qmoe, name)
        assert op.default._schema.name == f"qmoe::{name}"
    schema = str(torch.ops.qmoe.fused_moe_ws.default._schema)
    assert re.search(r"Tensor\(a\d*!\) workspace", schema), schema
    assert "workspace" not in str(torch.ops.qmoe.fused_moe.default._schema)


def test_import_registers_ops_when_torch_is_imported_first():
    from test_package import run_python

    out = run_python("""
        import torch, qmoe
        print(hasattr(torch.ops.qmoe, "fused_moe"))
    """)
    assert out.strip() == "True"


@pytest.mark.parametrize("name", ["moe_gemm_decode", "moe_gemm_prefill", "moe"])
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_opcheck_grouped_products(gen, name, bits):
    (x, q, c), kw = gemm_inputs(gen, bits=bits)
    args = (x, q, c, kw["scales"], kw["zeros"], kw["weight_bits"], kw["group_size"], kw["asym"])
    if name == "moe":
        args = args + ("auto", 4)
    torch.library.opcheck(getattr(torch.ops.qmoe, name).default, args)


def test_opcheck_moe_gemm(gen):
    E, K, N = 3, 32, 40
    w = torch.randn(E, K, N, generator=gen).bfloat16()
    x = torch.randn(7, K, generator=gen).bfloat16()
    c = torch.tensor([2, 5, 0], dtype=torch.int32)
    s = torch.rand(E, N, generator=gen).bfloat16()
    torch.library.opcheck(torch.ops.qmoe.moe_gemm.default, (x, w, c, s))
    torch.library.opcheck(torch.ops.qmoe.moe_gemm.default, (x, w, c, None))


def _fused_args(x, gu, dn, kw, *workspace):
    flat = qmoe.ops._flat
    return (x, *flat(gu, "g"), *flat(dn, "d"), kw.get("router_logits"), kw.get("topk_ids"),
            kw.get("topk_weights"), kw.get("top_k") or 0, kw.get("scoring", "softmax"),
            kw.get("renormalize", False), kw.get("correction_bias"), kw.get("num_groups", 1),
            kw.get("topk_groups", 1), kw.get("group_score", "max"),
            float(kw.get("scaling_factor", 1.0)), *flat(kw.get("shared_gate_up_weights"), "s"),
            *flat(kw.get("shared_down_weights"), "s"), kw.get("shared_gate"), *workspace)


@pytest.mark.parametrize("shared", [False, True])
def test_opcheck_fused_moe(gen, shared):
    x, gu, dn, kw = layer_inputs(gen, shared=shared)
    torch.library.opcheck(torch.ops.qmoe.fused_moe.default, _fused_args(x, gu, dn, kw))


def test_opcheck_fused_moe_topk_and_workspace(gen):
    x, gu, dn, kw = layer_inputs(gen, shared=False)
    ids, w = qmoe.moe_route(kw["router_logits"], top_k=2)
    n = qmoe.fused_moe_workspace_size(x.shape[0], x.shape[1], dn.k, gu.num_experts, 2)
    ws = torch.empty(n, dtype=torch.uint8)
    kw2 = dict(topk_ids=ids, topk_weights=w)
    torch.library.opcheck(torch.ops.qmoe.fused_moe_ws.default, _fused_args(x, gu, dn, kw2, ws))
    torch.library.opcheck(torch.ops.qmoe.fused_moe.default, _fused_args(x, gu, dn, kw2))


def test_opcheck_moe_route(gen):
    logits = torch.randn(9, 16, generator=gen)
    bias = torch.rand(16, generator=gen) * 0.1
    torch.library.opcheck(torch.ops.qmoe.moe_route.default,
                          (logits, 4, "sigmoid", True, bias, 4, 2, "top2_sum", 2.5))
    torch.library.opcheck(torch.ops.qmoe.moe_route.default,
                          (logits.bfloat16(), 2, "softmax", False, None, 1, 1, "max", 1.0))


def test_ops_match_package_functions(gen):
    (x, q, c), kw = gemm_inputs(gen)
    assert bits_equal(qmoe.ops.moe(x, q, c, **kw), qmoe.moe(x, q, c, **kw))
    assert bits_equal(qmoe.ops.moe_gemm_decode(x, q, c, **kw), qmoe.moe_gemm_decode(x, q, c, **kw))
    x, gu, dn, kw = layer_inputs(gen)
    assert bits_equal(qmoe.ops.fused_moe(x, gu, dn, **kw), qmoe.fused_moe(x, gu, dn, **kw))
    assert bits_equal(qmoe.ops.moe_route(kw["router_logits"], top_k=3),
                      qmoe.moe_route(kw["router_logits"], top_k=3))


def test_op_errors_are_the_package_errors(gen):
    x, gu, dn, kw = layer_inputs(gen)
    with pytest.raises(ValueError, match="top_k must be in"):
        qmoe.ops.fused_moe(x, gu, dn, **dict(kw, top_k=99))
    (x, q, c), kw = gemm_inputs(gen)
    with pytest.raises(ValueError, match="group_size"):
        qmoe.ops.moe(x, q, c, **dict(kw, group_size=24))


# ---------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# ---------------------------------------------------------------------------


def compiled(fn, backend="aot_eager", **kw):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend, **kw)


def test_compile_package_functions(gen):
    """A function calling the package functions (not torch.ops) compiles in one graph."""
    (x, q, c), kw = gemm_inputs(gen)
    xl, gu, dn, lkw = layer_inputs(gen)

    def f(x, q, c, s, xl, logits, sgate):
        a = qmoe.moe(x * 2, q, c, scales=s, weight_bits=4, group_size=32)
        b = qmoe.moe_gemm_decode(x, q, c, scales=s, weight_bits=4, group_size=32)
        d = qmoe.moe_gemm_prefill(x, q, c, scales=s, weight_bits=4, group_size=32)
        y = qmoe.fused_moe(xl + 1, gu, dn, router_logits=logits, top_k=2, renormalize=True,
                           shared_gate_up_weights=lkw["shared_gate_up_weights"],
                           shared_down_weights=lkw["shared_down_weights"], shared_gate=sgate)
        ids, w = qmoe.moe_route(logits, top_k=2)
        return a + b - d, y * 2, ids, w

    args = (x, q, c, kw["scales"], xl, lkw["router_logits"], lkw["shared_gate"])
    assert bits_equal(compiled(f)(*args), f(*args))


def test_compile_moe_gemm(gen):
    w = torch.randn(3, 32, 40, generator=gen).bfloat16()
    x = torch.randn(7, 32, generator=gen).bfloat16()
    c = torch.tensor([2, 5, 0], dtype=torch.int32)

    def f(x, w, c):
        return qmoe.moe_gemm(x.relu(), w, c) + 1

    assert bits_equal(compiled(f)(x, w, c), f(x, w, c))


def test_compile_inductor_fused_moe(gen):
    """The inductor backend (C++ code generation on the CPU) around fused_moe."""
    x, gu, dn, kw = layer_inputs(gen, shared=True)

    def f(x, logits):
        h = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],)).to(x.dtype)
        return x + qmoe.fused_moe(h, gu, dn, router_logits=logits, top_k=2, renormalize=True,
                                  shared_gate_up_weights=kw["shared_gate_up_weights"],
                                  shared_down_weights=kw["shared_down_weights"],
                                  shared_gate=kw["shared_gate"])

    got = compiled(f, backend="inductor")(x, kw["router_logits"])
    want = f(x, kw["router_logits"])
    assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    # The op's output itself is bitwise the eager one.
    h = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],)).to(x.dtype)
    g = compiled(lambda h, l: qmoe.fused_moe(h, gu, dn, router_logits=l, top_k=2), "inductor")
    assert bits_equal(g(h, kw["router_logits"]),
                      qmoe.fused_moe(h, gu, dn, router_logits=kw["router_logits"], top_k=2))


def test_compile_dynamic_tokens(gen):
    """One graph for every number of tokens (dynamic shapes in the fake kernels)."""
    x, gu, dn, kw = layer_inputs(gen, T=16, shared=False)
    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()

    def f(x, logits):
        return qmoe.fused_moe(x, gu, dn, router_logits=logits, top_k=2)

    cf = torch.compile(f, fullgraph=True, backend=counter, dynamic=True)
    for T in (3, 7, 16):
        assert bits_equal(cf(x[:T], kw["router_logits"][:T]), f(x[:T], kw["router_logits"][:T]))
    assert counter.frame_count == 1


def test_compile_with_topk_and_workspace(gen):
    x, gu, dn, kw = layer_inputs(gen, shared=False)
    n = qmoe.fused_moe_workspace_size(x.shape[0], x.shape[1], dn.k, gu.num_experts, 2)
    ws = torch.empty(n, dtype=torch.uint8)

    def f(x, logits, ws):
        ids, w = qmoe.moe_route(logits, top_k=2, scoring="sigmoid", renormalize=True)
        return qmoe.fused_moe(x, gu, dn, topk_ids=ids, topk_weights=w, workspace=ws)

    assert bits_equal(compiled(f)(x, kw["router_logits"], ws), f(x, kw["router_logits"], ws))


# ---------------------------------------------------------------------------
# CUDA graphs
# ---------------------------------------------------------------------------


def cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: CUDA graph capture of the qmoe ops runs on the GPU machine")
    if not qmoe.built_with_cuda():
        pytest.skip("qmoe was built without CUDA")


def test_cuda_graph_capture_every_op(gen):
    cuda_or_skip()
    (x, q, c), kw = gemm_inputs(gen, device="cuda")
    xl, gu, dn, lkw = layer_inputs(gen, device="cuda")
    w16 = torch.randn(4, 64, 48, device="cuda").bfloat16()

    def step():
        return (torch.ops.qmoe.moe_gemm_decode(x, q, c, kw["scales"], None, 4, 32, False),
                torch.ops.qmoe.moe_gemm_prefill(x, q, c, kw["scales"], None, 4, 32, False),
                qmoe.ops.moe(x, q, c, **kw),
                qmoe.ops.moe_gemm(x, w16, c),
                qmoe.ops.fused_moe(xl, gu, dn, **lkw),
                *qmoe.ops.moe_route(lkw["router_logits"], top_k=2))

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = step()
    x.copy_(torch.randn_like(x))
    xl.copy_(torch.randn_like(xl))
    lkw["router_logits"].copy_(torch.randn_like(lkw["router_logits"]))
    g.replay()
    torch.cuda.synchronize()
    assert bits_equal(outs, step())


def test_cuda_compile_reduce_overhead(gen):
    """torch.compile's CUDA graphs (mode="reduce-overhead") around fused_moe."""
    cuda_or_skip()
    xl, gu, dn, lkw = layer_inputs(gen, device="cuda")

    def f(x, logits):
        return qmoe.fused_moe(x, gu, dn, router_logits=logits, top_k=2, renormalize=True) * 1

    cf = compiled(f, backend="inductor", mode="reduce-overhead")
    for _ in range(3):
        got = cf(xl, lkw["router_logits"]).clone()
    assert bits_equal(got, f(xl, lkw["router_logits"]))


def test_numpy_untouched_by_ops():
    """The package functions still take NumPy arrays with the ops registered."""
    pytest.importorskip("ml_dtypes")
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float16)
    w = np.random.default_rng(1).standard_normal((2, 16, 64)).astype(np.float16)
    out = qmoe.moe(x, w, np.array([1, 3], np.int32), weight_bits=16)
    assert isinstance(out, np.ndarray) and out.shape == (4, 16)
