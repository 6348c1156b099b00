"""qmoe.integrations.transformers on tiny random-weight models built from configs.

For Qwen2-MoE, Qwen3-MoE, Mixtral, DeepSeek-V2 and DeepSeek-V3 (a few layers,
hidden 64, 8 experts): qmoe's routing equals the model router's, a converted
block equals the model's block, and the logits of the converted model are
compared with the bf16 model's on the same input per encoding (relative error,
top-1 agreement), printed (run with -s to see them) and bounded.

Models whose router logits are bf16 (Qwen, Mixtral) can have two experts tie for
a token; qmoe then takes the lower expert index, torch.topk either one, and
that token's output differs as much as a different expert makes it. Even the
16-bit conversion therefore differs from the model by a few 1e-2 in a 128-token
logits comparison; the bounds allow it.

The weights are redrawn with a fan-in scale (N(0, 1/fan_in); embeddings N(0, 1))
so that the MoE blocks carry the residual stream, as in a trained model, rather
than the 0.02-std init under which they are negligible.
"""

from __future__ import annotations

import copy
import math
import zlib

import pytest

torch = pytest.importorskip("torch", reason="the transformers integration needs PyTorch")
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'transformers>=5')")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip(f"transformers {transformers.__version__}: the integration targets 5.x (fused "
                "3-D expert parameters)", allow_module_level=True)

import qmoe  # noqa: E402
import qmoe.integrations.transformers as qt  # noqa: E402

VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=2, max_position_embeddings=128, tie_word_embeddings=False)
MLA = dict(num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
           v_head_dim=16)


def config(name):
    T = transformers
    if name == "qwen2_moe":
        return T.Qwen2MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=32,
                                shared_expert_intermediate_size=64, num_experts=8,
                                num_experts_per_tok=2, norm_topk_prob=False)
    if name == "qwen3_moe":
        return T.Qwen3MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=32,
                                num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                head_dim=16)
    if name == "mixtral":
        return T.MixtralConfig(**COMMON, intermediate_size=64, num_local_experts=8,
                               num_experts_per_tok=2)
    if name == "deepseek_v2":  # group-limited greedy routing, scaled weights, 2 shared experts
        return T.DeepseekV2Config(**dict(COMMON, **MLA), intermediate_size=128,
                                  moe_intermediate_size=32, n_routed_experts=8,
                                  n_shared_experts=2, num_experts_per_tok=3,
                                  first_k_dense_replace=0, q_lora_rank=None,
                                  topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                  routed_scaling_factor=1.5)
    if name == "deepseek_v2_greedy":
        return T.DeepseekV2Config(**dict(COMMON, **MLA, num_hidden_layers=3),
                                  intermediate_size=128,
                                  moe_intermediate_size=32, n_routed_experts=8,
                                  n_shared_experts=2, num_experts_per_tok=4,
                                  first_k_dense_replace=1, q_lora_rank=None,
                                  topk_method="greedy")
    if name == "deepseek_v3":  # sigmoid + correction bias, top2-sum groups, dense first layer
        return T.DeepseekV3Config(**dict(COMMON, **MLA, num_hidden_layers=3), intermediate_size=128,
                                  moe_intermediate_size=32, n_routed_experts=8,
                                  n_shared_experts=1, num_experts_per_tok=2,
                                  first_k_dense_replace=1, q_lora_rank=48,
                                  n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                  norm_topk_prob=True)
    raise KeyError(name)


MODELS = ("qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v2_greedy", "deepseek_v3")

_CACHE = {}


def tiny_model(name):
    """The bf16 model (cached per module run; callers deep-copy before converting)."""
    if name not in _CACHE:
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config(name)).eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if p.dim() >= 2:
                    fan = p.shape[-1]
                    std = 1.0 if "embed" in pname else 1.0 / math.sqrt(fan)
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
            for bname, b in model.named_buffers():
                if bname.endswith("e_score_correction_bias"):
                    b.copy_(torch.rand(b.shape, generator=gen) * 0.2)
        _CACHE[name] = model.to(torch.bfloat16)
    return _CACHE[name]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def ids_for(gen, batch=4, seq=32):
    return torch.randint(0, VOCAB, (batch, seq), generator=gen)


# ---------------------------------------------------------------------------
# Routing and blocks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_finds_every_moe_block(name):
    model = tiny_model(name)
    blocks = qt.find_moe_blocks(model)
    cfg = model.config
    dense = getattr(cfg, "first_k_dense_replace", 0)
    assert len(blocks) == cfg.num_hidden_layers - dense
    for _, block, spec in blocks:
        assert spec.experts.gate_up_proj.dim() == 3 and spec.top_k == cfg.num_experts_per_tok


@pytest.mark.parametrize("name", MODELS)
def test_routing_equals_model_router(name):
    """qmoe.moe_route with the block's rule picks the model router's experts and weights."""
    model = tiny_model(name)
    gen = torch.Generator().manual_seed(1)
    for _, block, spec in qt.find_moe_blocks(model):
        x = torch.randn(64, model.config.hidden_size, generator=gen).to(torch.bfloat16)
        _, want_w, want_ids = spec.router(x)
        w = spec.router.weight
        logits = torch.nn.functional.linear(x.float(), w.float()) if spec.logits_fp32 else \
            torch.nn.functional.linear(x, w)
        bias = getattr(spec.router, spec.correction_bias) if spec.correction_bias else None
        ids, got_w = qmoe.moe_route(logits, top_k=spec.top_k, scoring=spec.scoring,
                                    renormalize=spec.renormalize, correction_bias=bias,
                                    num_groups=spec.num_groups, topk_groups=spec.topk_groups,
                                    group_score=spec.group_score,
                                    scaling_factor=spec.scaling_factor)
        # Same experts, except where two of them tie (bf16 logits can be equal: qmoe
        # takes the lower index, torch.topk either); tied experts weigh the same.
        same = (ids.long().sort(dim=1).values == want_ids.sort(dim=1).values).all(dim=1)
        assert same.float().mean() >= 0.9, f"{(~same).sum()} of {len(same)} tokens differ"
        # Qwen rounds the router weights to the model dtype; qmoe keeps float32.
        got_sorted = got_w.sort(dim=1, descending=True).values
        want_sorted = want_w.float().sort(dim=1, descending=True).values
        assert torch.allclose(got_sorted, want_sorted, rtol=1e-2, atol=1e-6)
        if spec.logits_fp32:  # float32 logits: no ties, the very same experts
            assert same.all()


@pytest.mark.parametrize("name", MODELS)
def test_block_equals_model_block(name):
    """A converted block (16-bit experts: the same weights) against the model's block."""
    model = copy.deepcopy(tiny_model(name))
    originals = {n: b for n, b, _ in qt.find_moe_blocks(model)}
    qt.quantize_moe(model, weight_bits=16, keep_original=True)
    gen = torch.Generator().manual_seed(2)
    for n, block in originals.items():
        new = model.get_submodule(n)
        assert isinstance(new, qt.QMoeSparseMoeBlock)
        x = torch.randn(4, 16, model.config.hidden_size, generator=gen).to(torch.bfloat16)
        with torch.no_grad():
            want = block(x)
            got = new(x)
        assert got.shape == want.shape and got.dtype == torch.bfloat16
        # Per token: bf16 rounding only, except a token whose bf16 router logits tie
        # (qmoe takes the lower expert index, torch.topk either one).
        g, w = got.float().reshape(-1, got.shape[-1]), want.float().reshape(-1, got.shape[-1])
        per_token = (g - w).norm(dim=1) / w.norm(dim=1)
        assert (per_token > 2e-2).float().mean() <= 0.05, (n, per_token.sort().values[-5:])
        assert per_token.median() < 1e-2, (n, per_token.median())
    qt.restore_moe(model)
    assert not any(isinstance(m, qt.QMoeSparseMoeBlock) for m in model.modules())


# ---------------------------------------------------------------------------
# Logits of the converted model vs the bf16 model, per encoding
# ---------------------------------------------------------------------------

# encoding -> (quantize_moe kwargs, bound on the relative logits error, least top-1 agreement)
ENCODINGS = {
    "bf16 (16-bit)": (dict(weight_bits=16), 0.06, 0.90),
    "int8": (dict(weight_bits=8), 0.08, 0.90),
    "fp8_e4m3": (dict(fp8="e4m3"), 0.15, 0.85),
    "int4": (dict(weight_bits=4), 0.30, 0.65),
    "int4_asym": (dict(weight_bits=4, asym=True), 0.30, 0.65),
    "int2": (dict(weight_bits=2), 1.0, 0.0),  # reported; no quality claim
}


@pytest.mark.parametrize("name", MODELS)
def test_logits_vs_bf16_model(name):
    model = tiny_model(name)
    gen = torch.Generator().manual_seed(3)
    ids = ids_for(gen)
    with torch.no_grad():
        ref = model(ids).logits.float()
    rows = []
    for enc, (kw, max_rel, min_top1) in ENCODINGS.items():
        m = qt.quantize_moe(copy.deepcopy(model), group_size=16, **kw)
        with torch.no_grad():
            out = m(ids).logits.float()
        assert torch.isfinite(out).all()
        err = rel(out, ref)
        top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
        rows.append((enc, err, top1, max_rel, min_top1))
    print(f"\n{name}: logits of the converted model vs the bf16 model "
          f"({ids.numel()} positions, group_size 16)")
    print(f"  {'encoding':16s} {'rel. error':>10s} {'top-1':>7s}")
    for enc, err, top1, _, _ in rows:
        print(f"  {enc:16s} {err:10.4f} {top1:7.3f}")
    for enc, err, top1, max_rel, min_top1 in rows:
        assert err < max_rel, f"{name} {enc}: relative logits error {err:.4f} >= {max_rel}"
        assert top1 >= min_top1, f"{name} {enc}: top-1 agreement {top1:.3f} < {min_top1}"


def test_error_grows_as_bits_shrink():
    model = tiny_model("qwen3_moe")
    ids = ids_for(torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).logits
    errs = []
    for bits in (8, 4, 2):
        m = qt.quantize_moe(copy.deepcopy(model), weight_bits=bits, group_size=16)
        with torch.no_grad():
            errs.append(rel(m(ids).logits, ref))
    assert errs[0] < errs[1] < errs[2], errs


# ---------------------------------------------------------------------------
# Options, generate, compile, errors
# ---------------------------------------------------------------------------


def test_quantize_shared_experts():
    model = qt.quantize_moe(copy.deepcopy(tiny_model("qwen2_moe")), weight_bits=8, group_size=16,
                            quantize_shared=True)
    block = next(m for m in model.modules() if isinstance(m, qt.QMoeSparseMoeBlock))
    assert block.shared_gate_up_qweight.dtype == torch.uint8
    assert block.shared_gate is not None and block.shared_gate.shape == (64,)
    assert "shared=64 (int8)" in repr(block)
    ids = ids_for(torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert rel(model(ids).logits, tiny_model("qwen2_moe")(ids).logits) < 0.04


def test_shared_expert_with_bias_runs_as_a_module():
    """A shared expert that cannot be fused (biases) stays a module, called beside."""
    model = copy.deepcopy(tiny_model("deepseek_v2"))
    for _, block, spec in qt.find_moe_blocks(model):
        lin = spec.shared.down_proj
        lin.bias = torch.nn.Parameter(torch.randn(lin.out_features).to(torch.bfloat16) * 0.1)
    ids = ids_for(torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(ids).logits
    qt.quantize_moe(model, weight_bits=16)
    block = next(m for m in model.modules() if isinstance(m, qt.QMoeSparseMoeBlock))
    assert block.shared_intermediate == 0 and hasattr(block, "shared_experts")
    with torch.no_grad():
        assert rel(model(ids).logits, ref) < 0.02


def test_generate():
    model = qt.quantize_moe(copy.deepcopy(tiny_model("mixtral")), weight_bits=4, group_size=16)
    ids = ids_for(torch.Generator().manual_seed(7), batch=2, seq=8)
    out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (2, 13) and torch.equal(out[:, :8], ids)


def test_compile_converted_block():
    model = qt.quantize_moe(copy.deepcopy(tiny_model("deepseek_v3")), weight_bits=4, group_size=16)
    block = next(m for m in model.modules() if isinstance(m, qt.QMoeSparseMoeBlock))
    x = torch.randn(2, 5, 64).to(torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got, want = compiled(x), block(x)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("name", MODELS)
def test_converted_model_traces_whole(name):
    """The whole converted model is one graph for torch.compile (no graph
    breaks), so a compiled decode step (transformers' static KV cache,
    model_bench --compiled) captures the MoE layers with the rest."""
    model = qt.quantize_moe(copy.deepcopy(tiny_model(name)), weight_bits=4, group_size=16)
    ids = ids_for(torch.Generator().manual_seed(3), batch=1, seq=6)
    torch._dynamo.reset()
    with torch.no_grad():
        ex = torch._dynamo.explain(model)(ids, use_cache=False)
    assert ex.graph_break_count == 0, [str(b.reason) for b in ex.break_reasons]
    assert ex.graph_count == 1


def test_state_dict_holds_the_quantized_experts():
    model = qt.quantize_moe(copy.deepcopy(tiny_model("qwen3_moe")), weight_bits=4, group_size=32)
    sd = model.state_dict()
    keys = [k for k in sd if k.endswith("mlp.gate_up_qweight")]
    assert len(keys) == 2 and sd[keys[0]].shape == (8, 64, 32)
    assert not any(k.endswith("experts.gate_up_proj") for k in sd)
    assert any(k.endswith("mlp.gate.weight") for k in sd)


def test_errors():
    with pytest.raises(ValueError, match="no supported MoE block"):
        qt.quantize_moe(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="group_size .* must divide"):
        qt.quantize_moe(copy.deepcopy(tiny_model("qwen3_moe")), weight_bits=4, group_size=48)
    with pytest.raises(ValueError, match="weight_bits"):
        qt.quantize_moe(copy.deepcopy(tiny_model("qwen3_moe")), weight_bits=3)
    with pytest.raises(ValueError, match="fp8"):
        qt.quantize_moe(copy.deepcopy(tiny_model("qwen3_moe")), fp8="e3m4")
    with pytest.raises(ValueError, match="asym"):
        qt.quantize_moe(copy.deepcopy(tiny_model("qwen3_moe")), fp8="e4m3", asym=True)
    with pytest.raises(ValueError, match="convert the model first"):
        qt.quantize_moe(copy.deepcopy(tiny_model("qwen3_moe")).float(), weight_bits=8,
                        group_size=16)
    with pytest.raises(ValueError, match="no kept original"):
        qt.restore_moe(copy.deepcopy(tiny_model("qwen3_moe")))
    # Nothing was converted by a failed call.
    m = copy.deepcopy(tiny_model("qwen3_moe"))
    with pytest.raises(ValueError):
        qt.quantize_moe(m, weight_bits=4, group_size=48)
    assert not any(isinstance(b, qt.QMoeSparseMoeBlock) for b in m.modules())


def test_filter_and_repr():
    model = copy.deepcopy(tiny_model("qwen2_moe"))
    qt.quantize_moe(model, weight_bits=8, group_size=16, filter=lambda n, b: n.startswith("model.layers.0."))
    blocks = [n for n, m in model.named_modules() if isinstance(m, qt.QMoeSparseMoeBlock)]
    assert blocks == ["model.layers.0.mlp"]
    r = repr(model.get_submodule(blocks[0]))
    assert "encoding=int8" in r and "top_k=2" in r and "shared=64 (16-bit)" in r
