"""qmoe's ops registered with torch.library (namespace ``qmoe``), for torch.compile
and CUDA graphs.

Importing this module (it needs torch) registers::

    torch.ops.qmoe.moe_gemm_decode(activations, weights, num_tokens_per_expert,
                                   scales=None, zeros=None, weight_bits=4,
                                   group_size=128, asym=False) -> Tensor
    torch.ops.qmoe.moe_gemm_prefill(...same...) -> Tensor
    torch.ops.qmoe.moe(..., phase="auto", decode_threshold=4) -> Tensor
    torch.ops.qmoe.moe_gemm(activations, weights, num_tokens_per_expert, scales=None) -> Tensor
    torch.ops.qmoe.fused_moe(hidden_states, <gate_up weights>, <down weights>, <routing>,
                             <shared experts>) -> Tensor
    torch.ops.qmoe.fused_moe_ws(...the same..., Tensor(a!) workspace) -> Tensor
    torch.ops.qmoe.moe_route(router_logits, top_k, <routing>) -> (Tensor, Tensor)

each with a fake (meta) implementation, so that ``torch.compile(fullgraph=True)``
traces them and CUDA graphs capture them. The functions of this module take the
arguments of the package's functions (``qmoe.ops.fused_moe(x, gate_up, down,
router_logits=..., top_k=...)`` with QuantizedExperts) and call the ops.

The package functions (``qmoe.fused_moe``, ``qmoe.moe``, ...) call these ops
themselves when torch.compile traces them, and run directly (no dispatcher
overhead) otherwise; ``import qmoe`` imports this module when torch is already
imported, and the first call with a torch tensor does in any case.

The ops compute nothing under a fake tensor mode; their real implementations
are the package functions, with every argument check. On CUDA, a fused_moe
captured in a CUDA graph takes its workspace from the graph's memory pool.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _fused, _gemm

_NS = "qmoe"


# ---------------------------------------------------------------------------
# The ARK grouped products
# ---------------------------------------------------------------------------


def _fake_enk(activations, weights):
    torch._check(activations.dim() == 2, lambda: "activations must be 2-D [T, K]")
    torch._check(weights.dim() == 3, lambda: "weights must be 3-D [E, N, K_packed]")
    return activations.new_empty((activations.shape[0], weights.shape[1]))


@torch.library.custom_op(f"{_NS}::moe_gemm_decode", mutates_args=())
def _moe_gemm_decode(activations: Tensor, weights: Tensor, num_tokens_per_expert: Tensor,
                     scales: Optional[Tensor] = None, zeros: Optional[Tensor] = None,
                     weight_bits: int = 4, group_size: int = 128, asym: bool = False) -> Tensor:
    return _gemm.moe_gemm_decode(activations, weights, num_tokens_per_expert, scales=scales,
                                 zeros=zeros, weight_bits=weight_bits, group_size=group_size,
                                 asym=asym)


@torch.library.custom_op(f"{_NS}::moe_gemm_prefill", mutates_args=())
def _moe_gemm_prefill(activations: Tensor, weights: Tensor, num_tokens_per_expert: Tensor,
                      scales: Optional[Tensor] = None, zeros: Optional[Tensor] = None,
                      weight_bits: int = 4, group_size: int = 128, asym: bool = False) -> Tensor:
    return _gemm.moe_gemm_prefill(activations, weights, num_tokens_per_expert, scales=scales,
                                  zeros=zeros, weight_bits=weight_bits, group_size=group_size,
                                  asym=asym)


@torch.library.custom_op(f"{_NS}::moe", mutates_args=())
def _moe(activations: Tensor, weights: Tensor, num_tokens_per_expert: Tensor,
         scales: Optional[Tensor] = None, zeros: Optional[Tensor] = None, weight_bits: int = 4,
         group_size: int = 128, asym: bool = False, phase: str = "auto",
         decode_threshold: int = 4) -> Tensor:
    return _gemm.moe(activations, weights, num_tokens_per_expert, scales=scales, zeros=zeros,
                     weight_bits=weight_bits, group_size=group_size, asym=asym, phase=phase,
                     decode_threshold=decode_threshold)


@torch.library.custom_op(f"{_NS}::moe_gemm", mutates_args=())
def _moe_gemm(activations: Tensor, weights: Tensor, num_tokens_per_expert: Tensor,
              scales: Optional[Tensor] = None) -> Tensor:
    return _gemm.moe_gemm(activations, weights, num_tokens_per_expert, scales=scales)


@_moe_gemm_decode.register_fake
def _(activations, weights, num_tokens_per_expert, scales=None, zeros=None, weight_bits=4,
      group_size=128, asym=False):
    return _fake_enk(activations, weights)


@_moe_gemm_prefill.register_fake
def _(activations, weights, num_tokens_per_expert, scales=None, zeros=None, weight_bits=4,
      group_size=128, asym=False):
    return _fake_enk(activations, weights)


@_moe.register_fake
def _(activations, weights, num_tokens_per_expert, scales=None, zeros=None, weight_bits=4,
      group_size=128, asym=False, phase="auto", decode_threshold=4):
    return _fake_enk(activations, weights)


@_moe_gemm.register_fake
def _(activations, weights, num_tokens_per_expert, scales=None):
    torch._check(activations.dim() == 2, lambda: "activations must be 2-D [T, K]")
    torch._check(weights.dim() == 3, lambda: "weights must be 3-D [E, K, N]")
    return activations.new_empty((activations.shape[0], weights.shape[2]))


def moe_gemm_decode(activations, weights, num_tokens_per_expert, *, scales=None, zeros=None,
                    weight_bits=4, group_size=128, asym=False):
    """torch.ops.qmoe.moe_gemm_decode with qmoe.moe_gemm_decode's arguments."""
    return torch.ops.qmoe.moe_gemm_decode(activations, weights, num_tokens_per_expert, scales,
                                          zeros, weight_bits, group_size, asym)


def moe_gemm_prefill(activations, weights, num_tokens_per_expert, *, scales=None, zeros=None,
                     weight_bits=4, group_size=128, asym=False):
    """torch.ops.qmoe.moe_gemm_prefill with qmoe.moe_gemm_prefill's arguments."""
    return torch.ops.qmoe.moe_gemm_prefill(activations, weights, num_tokens_per_expert, scales,
                                           zeros, weight_bits, group_size, asym)


def moe(activations, weights, num_tokens_per_expert, *, scales=None, zeros=None, weight_bits=4,
        group_size=128, asym=False, phase="auto", decode_threshold=4):
    """torch.ops.qmoe.moe with qmoe.moe's arguments."""
    return torch.ops.qmoe.moe(activations, weights, num_tokens_per_expert, scales, zeros,
                              weight_bits, group_size, asym, phase, decode_threshold)


def moe_gemm(activations, weights, num_tokens_per_expert, *, scales=None):
    """torch.ops.qmoe.moe_gemm with qmoe.moe_gemm's arguments."""
    return torch.ops.qmoe.moe_gemm(activations, weights, num_tokens_per_expert, scales)


# ---------------------------------------------------------------------------
# The fused layer and its routing
# ---------------------------------------------------------------------------


def _weights_schema(prefix: str, optional: bool) -> str:
    q = "Tensor?" if optional else "Tensor"
    return (f"{q} {prefix}_qweight, Tensor? {prefix}_scales, Tensor? {prefix}_zeros, "
            f"int {prefix}_bits, int {prefix}_group_size, bool {prefix}_asym")


# One weight set is (qweight, scales, zeros, bits, group_size, asym): a
# QuantizedExperts flattened (16-bit weights: no scales, bits 16).
_FUSED_ARGS = ", ".join([
    "Tensor hidden_states",
    _weights_schema("gate_up", False),
    _weights_schema("down", False),
    "Tensor? router_logits, Tensor? topk_ids, Tensor? topk_weights, int top_k",
    "str scoring, bool renormalize, Tensor? correction_bias, int num_groups, int topk_groups",
    "str group_score, float scaling_factor",
    _weights_schema("shared_gate_up", True),
    _weights_schema("shared_down", True),
    "Tensor? shared_gate",
])
# Two ops: without a workspace (the cached one, or the CUDA graph's), and with
# the caller's (mutated). An optional mutable argument would do for both, but
# inductor (torch 2.15) fails to lower one that is None.
torch.library.define(f"{_NS}::fused_moe", f"({_FUSED_ARGS}) -> Tensor")
torch.library.define(f"{_NS}::fused_moe_ws", f"({_FUSED_ARGS}, Tensor(a!) workspace) -> Tensor")


def _fused_impl(hidden_states, *args, workspace=None):
    def experts(q, s, z, bits, gs, asym):
        return None if q is None else _fused.QuantizedExperts(q, s, z, bits, gs, asym)

    gu, dn = experts(*args[0:6]), experts(*args[6:12])
    (router_logits, topk_ids, topk_weights, top_k, scoring, renormalize, correction_bias,
     num_groups, topk_groups, group_score, scaling_factor) = args[12:23]
    sgu, sdn = experts(*args[23:29]), experts(*args[29:35])
    shared_gate = args[35]
    return _fused.fused_moe(
        hidden_states, gu, dn, router_logits=router_logits, topk_ids=topk_ids,
        topk_weights=topk_weights, top_k=top_k if top_k > 0 else None, scoring=scoring,
        renormalize=renormalize, correction_bias=correction_bias, num_groups=num_groups,
        topk_groups=topk_groups, group_score=group_score, scaling_factor=scaling_factor,
        shared_gate_up_weights=sgu, shared_down_weights=sdn, shared_gate=shared_gate,
        workspace=workspace)


@torch.library.impl(f"{_NS}::fused_moe", "default")
def _fused_moe_op(hidden_states, *args):
    return _fused_impl(hidden_states, *args)


@torch.library.impl(f"{_NS}::fused_moe_ws", "default")
def _fused_moe_ws_op(hidden_states, *args):
    ws = args[-1]
    if ws.is_cuda and ws.data_ptr() % _fused.WORKSPACE_ALIGN:  # e.g. a buffer inductor planned
        ws = ws[(-ws.data_ptr()) % _fused.WORKSPACE_ALIGN:]
    return _fused_impl(hidden_states, *args[:-1], workspace=ws)


def _fused_fake(hidden_states, gate_up_qweight, *args):
    torch._check(hidden_states.dim() >= 2, lambda: "hidden_states must be [T, H] (or [..., H])")
    torch._check(gate_up_qweight.dim() == 3, lambda: "gate_up_weights must be 3-D [E, 2I, H_packed]")
    return hidden_states.new_empty(hidden_states.shape)


torch.library.register_fake(f"{_NS}::fused_moe", _fused_fake)
torch.library.register_fake(f"{_NS}::fused_moe_ws", _fused_fake)


def _flat(w, name):
    """QuantizedExperts / 16-bit tensor / None -> (qweight, scales, zeros, bits, group_size, asym)."""
    if w is None:
        return (None, None, None, 16, 1, False)
    if isinstance(w, _fused.QuantizedExperts):
        return (w.qweight, w.scales, w.zeros, int(w.weight_bits), int(w.group_size), bool(w.asym))
    if isinstance(w, Tensor):
        return (w, None, None, 16, int(w.shape[-1]) if w.dim() else 1, False)
    raise TypeError(f"{name} must be a qmoe.QuantizedExperts or a torch.Tensor, got {type(w).__name__}")


def fused_moe(hidden_states, gate_up_weights, down_weights, *, router_logits=None, topk_ids=None,
              topk_weights=None, top_k=None, scoring="softmax", renormalize=False,
              correction_bias=None, num_groups=1, topk_groups=1, group_score="max",
              scaling_factor=1.0, shared_gate_up_weights=None, shared_down_weights=None,
              shared_gate=None, workspace=None):
    """torch.ops.qmoe.fused_moe (torch.ops.qmoe.fused_moe_ws with a workspace) with
    qmoe.fused_moe's arguments (torch tensors only)."""
    args = (hidden_states, *_flat(gate_up_weights, "gate_up_weights"),
            *_flat(down_weights, "down_weights"), router_logits, topk_ids, topk_weights,
            int(top_k) if top_k is not None else 0, scoring, renormalize, correction_bias,
            num_groups, topk_groups, group_score, float(scaling_factor),
            *_flat(shared_gate_up_weights, "shared_gate_up_weights"),
            *_flat(shared_down_weights, "shared_down_weights"), shared_gate)
    if workspace is None and hidden_states.is_cuda and torch.compiler.is_compiling():
        # Under torch.compile the graph owns the workspace, as a temporary: a
        # cached one would outlive a CUDA graph's memory pool (reduce-overhead).
        gu = args[1]
        workspace = torch.empty(
            _fused.workspace_upper_bound(
                hidden_states.numel() // hidden_states.shape[-1], hidden_states.shape[-1],
                gu.shape[1] // 2, gu.shape[0], int(top_k) if top_k is not None else topk_ids.shape[-1],
                0 if shared_gate_up_weights is None else _flat(shared_gate_up_weights, "")[0].shape[1] // 2),
            dtype=torch.uint8, device=hidden_states.device)
    if workspace is None:
        return torch.ops.qmoe.fused_moe(*args)
    return torch.ops.qmoe.fused_moe_ws(*args, workspace)


@torch.library.custom_op(f"{_NS}::moe_route", mutates_args=())
def _moe_route_op(router_logits: Tensor, top_k: int, scoring: str = "softmax",
                  renormalize: bool = False, correction_bias: Optional[Tensor] = None,
                  num_groups: int = 1, topk_groups: int = 1, group_score: str = "max",
                  scaling_factor: float = 1.0) -> tuple[Tensor, Tensor]:
    return _fused.moe_route(router_logits, top_k=top_k, scoring=scoring, renormalize=renormalize,
                            correction_bias=correction_bias, num_groups=num_groups,
                            topk_groups=topk_groups, group_score=group_score,
                            scaling_factor=scaling_factor)


@_moe_route_op.register_fake
def _(router_logits, top_k, scoring="softmax", renormalize=False, correction_bias=None,
      num_groups=1, topk_groups=1, group_score="max", scaling_factor=1.0):
    torch._check(router_logits.dim() == 2, lambda: "router_logits must be 2-D [T, E]")
    T = router_logits.shape[0]
    return (router_logits.new_empty((T, top_k), dtype=torch.int32),
            router_logits.new_empty((T, top_k), dtype=torch.float32))


def moe_route(router_logits, *, top_k, scoring="softmax", renormalize=False, correction_bias=None,
              num_groups=1, topk_groups=1, group_score="max", scaling_factor=1.0):
    """torch.ops.qmoe.moe_route with qmoe.moe_route's arguments."""
    return torch.ops.qmoe.moe_route(router_logits, top_k, scoring, renormalize, correction_bias,
                                    num_groups, topk_groups, group_score, float(scaling_factor))


OPS = ("moe_gemm_decode", "moe_gemm_prefill", "moe", "moe_gemm", "fused_moe", "fused_moe_ws",
       "moe_route")

__all__ = list(OPS)
