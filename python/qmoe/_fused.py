"""The whole MoE layer in one call: qmoe.fused_moe, qmoe.moe_route and their weights.

    hidden_states [T, H] -> routing (top-k of router logits, or given top-k)
      -> token copies grouped by expert -> gate/up product [E, 2I, H]
      -> SiLU(gate) * up -> down product [E, H, I]
      -> sum over the k experts of each token, weighted (+ shared experts)
      -> [T, H]

The arithmetic is the C++ layer of include/qmoe/fused_moe.h; this module
checks the arguments (ValueError / TypeError naming the argument), converts
what it may (integer ids to int32, routing weights and biases to float32),
and provides the CUDA workspace from a per-(device, stream) cache, so a call
allocates nothing but its output and never synchronises with the host.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any

from . import _ext, _gemm
from ._checks import (
    ACT_TYPES,
    ENCODING_NAME,
    FP8_TYPES,
    INT_TYPES,
    PER_BYTE,
    WT,
    as_bool,
    as_int,
    check_group_layout,
    positive_group_size,
    weight_bits_value,
    weight_encoding,
)
from ._frameworks import F32, U8, compiling, expect_same_framework, framework_of, torch_ops, type_name

_SCORING = {"softmax": _ext.Scoring.softmax, "sigmoid": _ext.Scoring.sigmoid}
_GROUP_SCORE = {"max": _ext.GroupScore.max, "top2_sum": _ext.GroupScore.top2_sum}
_FLOATS = ("float16", "bfloat16", "float32", "float64")
MAX_EXPERTS = 512  # src/core/routing.h
MAX_TOP_K = 32
MAX_GROUPS = 64
WORKSPACE_ALIGN = 256  # CUDA (any torch CUDA allocation is)
CPU_WORKSPACE_ALIGN = 16  # the CPU layer reads its buffers unaligned; NumPy gives 16


def _shape(x) -> tuple:
    return tuple(int(s) for s in x.shape)


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class QuantizedExperts:
    """Weights of one grouped product of the fused layer, in the ARK layout.

    qweight: [E, N, K_packed]: uint8 codes for weight_bits 8/4/2 (K_packed = K,
        K/2, K/4), float8_e4m3fn / float8_e5m2 for fp8 (their dtype overrides
        weight_bits), or the activation dtype for weight_bits=16.
    scales: [E, N, K // group_size] in the activation dtype (None for 16-bit).
    zeros: like scales, asym integer encodings only.

    For the fused layer, gate_up is [E, 2I, H] (the I gate rows first, then the
    I up rows) and down is [E, H, I]; shared experts are one expert (E = 1) of
    their summed width. ``qmoe.quantize_experts`` makes one from float weights.
    """

    qweight: Any
    scales: Any = None
    zeros: Any = None
    weight_bits: int = 4
    group_size: int = 128
    asym: bool = False

    @property
    def weight_type(self):
        fw = framework_of(self.qweight, "qweight")
        name = fw.dtype_name(self.qweight)
        if name in FP8_TYPES:
            return FP8_TYPES[name]
        bits = weight_bits_value(self.weight_bits)
        return WT.native16 if bits == 16 else INT_TYPES[bits]

    @property
    def encoding(self) -> str:
        """'bf16'/'fp16' (16-bit), 'int8', 'int4', 'int2', 'fp8_e4m3' or 'fp8_e5m2', with
        '_asym' for zero-point integer codes."""
        wt = self.weight_type
        if wt == WT.native16:
            name = framework_of(self.qweight, "qweight").dtype_name(self.qweight)
            return {"bfloat16": "bf16", "float16": "fp16"}.get(name, name)
        base = {WT.int8: "int8", WT.int4: "int4", WT.int2: "int2",
                WT.fp8_e4m3: "fp8_e4m3", WT.fp8_e5m2: "fp8_e5m2"}[wt]
        return base + ("_asym" if self.asym else "")

    @property
    def num_experts(self) -> int:
        return int(self.qweight.shape[0])

    @property
    def n(self) -> int:
        """Output features (rows of each expert's [N, K] matrix)."""
        return int(self.qweight.shape[1])

    @property
    def k(self) -> int:
        """Input features (unpacked)."""
        return int(self.qweight.shape[2]) * PER_BYTE.get(self.weight_type, 1)

    @property
    def nbytes_per_expert(self) -> int:
        """Bytes one expert reads: its weights, scales and zeros."""
        total = 0
        for x in (self.qweight, self.scales, self.zeros):
            if x is not None:
                total += _nbytes(x)
        return total // max(self.num_experts, 1)

    def to(self, *args, **kwargs) -> "QuantizedExperts":
        """torch only: the same weights moved with Tensor.to(device) (dtypes kept)."""
        return QuantizedExperts(*(x.to(*args, **kwargs) if x is not None else None
                                  for x in (self.qweight, self.scales, self.zeros)),
                                self.weight_bits, self.group_size, self.asym)


def _nbytes(x) -> int:
    n = getattr(x, "nbytes", None)
    if isinstance(n, int):
        return n
    return int(x.numel()) * int(x.element_size())


def quantize_experts(weights: Any, *, weight_bits: int = 4, group_size: int = 128,
                     asym: bool = False, dtype: Any = "bfloat16",
                     fp8: str | None = None) -> QuantizedExperts:
    """Float weights [E, N, K] -> QuantizedExperts (round to nearest; see qmoe.quantize).

    weight_bits=16 keeps the weights in ``dtype`` (no scales). For the fused
    layer, quantize gate_up as [E, 2I, H] (gate rows first) and down as [E, H, I].
    """
    q, s, z = _quantize_any(weights, weight_bits=weight_bits, group_size=group_size, asym=asym,
                            dtype=dtype, fp8=fp8)
    bits = 8 if fp8 is not None else weight_bits_value(weight_bits)
    gs = int(weights.shape[2]) if bits == 16 else positive_group_size(group_size)
    return QuantizedExperts(q, s, z, bits, gs, bool(asym))


def _quantize_any(weights, **kw):
    from ._quant import quantize

    return quantize(weights, **kw)


class _Weights:
    """A checked QuantizedExperts (or bare 16-bit tensor) as an ExpertWeights struct."""

    __slots__ = ("struct", "E", "N", "K", "keep")


def _check_weights(fw, w, name: str, act_name: str, dev_ok) -> _Weights:
    if isinstance(w, QuantizedExperts):
        qweight, scales, zeros = w.qweight, w.scales, w.zeros
        weight_bits, group_size, asym = w.weight_bits, w.group_size, w.asym
        qname = f"{name}.qweight"
    elif fw.owns(w):
        qweight, scales, zeros, weight_bits, group_size, asym = w, None, None, 16, None, False
        qname = name
    else:
        raise TypeError(
            f"{name} must be a qmoe.QuantizedExperts or a {fw.name} of 16-bit weights, "
            f"got {type_name(w)}"
        )
    expect_same_framework(fw, qweight, qname, "hidden_states")
    for sub, x in (("scales", scales), ("zeros", zeros)):
        if x is not None:
            expect_same_framework(fw, x, f"{name}.{sub}", "hidden_states")
    for sub, x in ((qname, qweight), (f"{name}.scales", scales), (f"{name}.zeros", zeros)):
        if x is not None:
            dev_ok(sub, x)
    if qweight.ndim != 3:
        raise ValueError(f"{qname} must be 3-D [E, N, K_packed], got shape {_shape(qweight)}")
    E, N, Kp = _shape(qweight)
    if min(E, N, Kp) < 1:
        raise ValueError(f"{qname} must have E, N, K_packed >= 1, got shape {(E, N, Kp)}")
    asym = as_bool(asym, f"{name}.asym")
    q_dtype = fw.dtype_name(qweight)
    wt, K = weight_encoding(q_dtype, weight_bits, Kp, asym, scales is not None, zeros is not None,
                            q_name=qname, arg=lambda sub: f"{name}.{sub}", act_name=act_name,
                            act_arg="hidden_states")
    if wt == WT.native16:
        gs = K
    else:
        if scales is None:
            raise ValueError(f"{name}.scales is required for {ENCODING_NAME[wt]} weights")
        gs = positive_group_size(group_size)
        try:
            check_group_layout(wt, K, gs, K_name=f"K of {name} ({qname}.shape[2] unpacked)")
        except ValueError as e:
            raise ValueError(f"{name}.{e}") from None
        groups = (E, N, K // gs)
        for sub, x in (("scales", scales), ("zeros", zeros)):
            if x is None:
                continue
            if fw.dtype_name(x) != act_name:
                raise ValueError(
                    f"{name}.{sub} must have the hidden_states dtype ({act_name}), "
                    f"got {fw.dtype_name(x)}"
                )
            if _shape(x) != groups:
                raise ValueError(f"{name}.{sub} must have shape {list(groups)}, got {list(_shape(x))}")

    qweight = fw.contiguous(qweight)
    scales = fw.contiguous(scales) if scales is not None else None
    zeros = fw.contiguous(zeros) if zeros is not None else None
    s = _ext.ExpertWeights()
    s.weight_type = wt
    s.asym = asym
    s.group_size = gs
    s.weights = fw.ptr(qweight)
    s.scales = fw.ptr(scales) if scales is not None else 0
    s.zeros = fw.ptr(zeros) if zeros is not None else 0
    out = _Weights()
    out.struct, out.E, out.N, out.K = s, E, N, K
    out.keep = (qweight, scales, zeros)
    return out


# ---------------------------------------------------------------------------
# Routing options
# ---------------------------------------------------------------------------


def _routing_params(fw, E: int, top_k: int, scoring, renormalize, correction_bias, num_groups,
                    topk_groups, group_score, scaling_factor, dev_ok):
    """RoutingParams from the Python options; returns (params, kept tensors)."""
    if not isinstance(scoring, str) or scoring not in _SCORING:
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    if not isinstance(group_score, str) or group_score not in _GROUP_SCORE:
        raise ValueError(f"group_score must be 'max' or 'top2_sum', got {group_score!r}")
    renormalize = as_bool(renormalize, "renormalize")
    groups = as_int(num_groups, "num_groups")
    if groups < 1 or groups > MAX_GROUPS or E % groups != 0:
        raise ValueError(
            f"num_groups must be in [1, {MAX_GROUPS}] and divide the number of experts "
            f"({E}), got {groups}"
        )
    kept = as_int(topk_groups, "topk_groups")
    if kept < 1 or kept > groups:
        raise ValueError(f"topk_groups must be in [1, num_groups = {groups}], got {kept}")
    if top_k > kept * (E // groups):
        raise ValueError(
            f"top_k ({top_k}) exceeds the {kept * (E // groups)} experts of the topk_groups = "
            f"{kept} groups kept (num_groups = {groups}, {E // groups} experts each)"
        )
    if isinstance(scaling_factor, bool) or not isinstance(scaling_factor, numbers.Real):
        raise ValueError(f"scaling_factor must be a finite float, got {scaling_factor!r}")
    scale = float(scaling_factor)
    if not math.isfinite(scale):
        raise ValueError(f"scaling_factor must be a finite float, got {scaling_factor!r}")

    r = _ext.RoutingParams()
    r.scoring = _SCORING[scoring]
    r.renormalize = renormalize
    r.num_groups = groups
    r.topk_groups = kept
    r.group_score = _GROUP_SCORE[group_score]
    r.scaling_factor = scale
    bias = None
    if correction_bias is not None:
        expect_same_framework(fw, correction_bias, "correction_bias", "hidden_states")
        dev_ok("correction_bias", correction_bias)
        if correction_bias.ndim != 1 or int(correction_bias.shape[0]) != E:
            raise ValueError(
                f"correction_bias must be 1-D of length E = {E}, got shape {_shape(correction_bias)}"
            )
        if fw.dtype_name(correction_bias) not in _FLOATS:
            raise ValueError(
                f"correction_bias must be floating point (float32 preferred), got "
                f"{fw.dtype_name(correction_bias)}"
            )
        bias = fw.to_float32(correction_bias)
        r.correction_bias = fw.ptr(bias)
    return r, bias


_ROUTING_DEFAULTS = dict(scoring="softmax", renormalize=False, correction_bias=None, num_groups=1,
                         topk_groups=1, group_score="max", scaling_factor=1.0)


def _is_default(v, d) -> bool:
    if d is None:
        return v is None
    if isinstance(v, bool) != isinstance(d, bool):
        return False
    try:
        return bool(v == d)
    except Exception:  # e.g. a tensor given for a scalar option
        return False


def _check_top_k(top_k, E: int, name: str = "top_k") -> int:
    k = as_int(top_k, name)
    if k < 1 or k > E or k > MAX_TOP_K:
        raise ValueError(f"{name} must be in [1, min(E = {E}, {MAX_TOP_K})], got {k}")
    return k


def _check_logits(fw, logits, T: int, E: int, act_name: str | None, dev_ok):
    """router_logits -> (contiguous logits, logits_f32, act name of 16-bit logits)."""
    expect_same_framework(fw, logits, "router_logits", "hidden_states")
    dev_ok("router_logits", logits)
    if logits.ndim != 2 or _shape(logits) != (T, E):
        raise ValueError(
            f"router_logits must have shape [T, E] = [{T}, {E}], got {list(_shape(logits))}"
        )
    name = fw.dtype_name(logits)
    if name not in _FLOATS:
        raise ValueError(f"router_logits must be floating point, got {name}")
    if name == "float32":
        return fw.contiguous(logits), True, act_name
    if act_name is None and name in ACT_TYPES:  # moe_route: 16-bit logits as they are
        return fw.contiguous(logits), False, name
    if name == act_name:
        return fw.contiguous(logits), False, act_name
    return fw.to_float32(logits), True, act_name


# ---------------------------------------------------------------------------
# Devices and the CUDA workspace cache
# ---------------------------------------------------------------------------


def _device_checker(fw, ref, ref_name: str):
    dev_type, dev_index = fw.device(ref)
    if dev_type not in ("cpu", "cuda"):
        raise ValueError(f"{ref_name} is on device '{fw.device_str(ref)}'; qmoe runs on cpu and cuda")

    def ok(name, x):
        if not fw.same_device(x, ref):
            raise ValueError(
                f"{name} is on device '{fw.device_str(x)}' but {ref_name} is on "
                f"'{fw.device_str(ref)}'; all tensors must be on the same device"
            )

    return dev_type, dev_index, ok


_WORKSPACES: dict = {}


def _cached_workspace(fw, like, dev_index: int, stream: int, nbytes: int):
    """A uint8 CUDA buffer of >= nbytes for (device, stream), kept between calls.

    One buffer a (device, stream): calls on one stream are ordered, so they may
    share it; another stream gets its own. It grows (never shrinks) to the
    largest size asked; clear it with qmoe.clear_workspace_cache().
    """
    key = (dev_index, stream)
    buf = _WORKSPACES.get(key)
    if buf is None or _nbytes(buf) < nbytes:
        size = max(nbytes, 1 << 20)
        size = (size + (1 << 20) - 1) >> 20 << 20  # whole MiB: fewer regrowths
        buf = fw.empty((size,), U8, like)
        _WORKSPACES[key] = buf
    return buf


def clear_workspace_cache() -> None:
    """Drops the cached CUDA workspaces of qmoe.fused_moe (they are reallocated on demand)."""
    _WORKSPACES.clear()


def _check_workspace(fw, workspace, nbytes: int, dev_ok):
    expect_same_framework(fw, workspace, "workspace", "hidden_states")
    dev_ok("workspace", workspace)
    if fw.dtype_name(workspace) != U8 or workspace.ndim != 1:
        raise ValueError(
            f"workspace must be a 1-D uint8 buffer, got {fw.dtype_name(workspace)} of shape "
            f"{list(_shape(workspace))}"
        )
    if _nbytes(workspace) < nbytes:
        raise ValueError(
            f"workspace has {_nbytes(workspace)} bytes; this call needs "
            f"qmoe.fused_moe_workspace_size(...) = {nbytes}"
        )
    if not _is_contiguous(workspace):
        raise ValueError("workspace must be contiguous")
    align = WORKSPACE_ALIGN if fw.device(workspace)[0] == "cuda" else CPU_WORKSPACE_ALIGN
    if fw.ptr(workspace) % align != 0:
        raise ValueError(f"workspace must be {align}-byte aligned on {fw.device(workspace)[0]}")


def _is_contiguous(x) -> bool:
    f = getattr(x, "is_contiguous", None)
    if callable(f):
        return bool(f())
    return bool(x.flags["C_CONTIGUOUS"])


# ---------------------------------------------------------------------------
# fused_moe
# ---------------------------------------------------------------------------


def workspace_upper_bound(num_tokens, hidden: int, intermediate: int, num_experts: int, top_k: int,
                          shared_intermediate: int = 0):
    """An affine upper bound of fused_moe_workspace_size() that also takes a symbolic
    num_tokens (torch.compile), plus 256 bytes of room to align the start. It
    mirrors the buffers of FusedWorkspace::carve (src/core/fused_moe_workspace.h):
    15 buffers, each rounded up to 256 bytes; test_fused_moe checks the bound. The
    block counts, at most max(ceil(T k / 512), ceil(T / 8)) * E * 4 bytes, are at
    most T k ceil(E / 128) + T ceil(E / 2) + 4 E."""
    k, H, I, E, Is = top_k, hidden, intermediate, num_experts, shared_intermediate
    per_token = (k * (4 + 4 + 4 + 4 + 2 * H + 4 * I + 2 * I + 2 * H + (E + 127) // 128)
                 + (E + 1) // 2 + 4 * Is + 2 * Is + 2 * H + 4)
    return num_tokens * per_token + 4 * E + 4 + 4 * E + 16 * 256


def fused_moe_workspace_size(num_tokens: int, hidden: int, intermediate: int, num_experts: int,
                             top_k: int, shared_intermediate: int = 0) -> int:
    """Bytes of workspace one qmoe.fused_moe call of these sizes needs (CUDA; the CPU
    layer allocates its own when none is given)."""
    p = _ext.FusedMoeParams()
    vals = {}
    for name, v, low in (("num_tokens", num_tokens, 0), ("hidden", hidden, 1),
                         ("intermediate", intermediate, 1), ("num_experts", num_experts, 1),
                         ("top_k", top_k, 1), ("shared_intermediate", shared_intermediate, 0)):
        vals[name] = as_int(v, name)
        if vals[name] < low:
            raise ValueError(f"{name} must be >= {low}, got {vals[name]}")
        setattr(p, name, vals[name])
    return int(_ext.fused_moe_workspace_size(p))


def fused_moe(hidden_states: Any, gate_up_weights: Any, down_weights: Any, *,
              router_logits: Any = None, topk_ids: Any = None, topk_weights: Any = None,
              top_k: int | None = None, scoring: str = "softmax", renormalize: bool = False,
              correction_bias: Any = None, num_groups: int = 1, topk_groups: int = 1,
              group_score: str = "max", scaling_factor: float = 1.0,
              shared_gate_up_weights: Any = None, shared_down_weights: Any = None,
              shared_gate: Any = None, workspace: Any = None):
    """A whole MoE layer (routing, both expert products, SiLU·mul, weighted sum,
    optional shared experts) in one call.

    Args:
        hidden_states: [T, H] (or [..., H]) float16 or bfloat16 torch.Tensor (CPU or
            CUDA) or numpy.ndarray.
        gate_up_weights: qmoe.QuantizedExperts of shape [E, 2I, H]: per expert the I
            gate rows, then the I up rows; or a bare [E, 2I, H] tensor in the
            hidden_states dtype (16-bit weights).
        down_weights: the same for the down projection, [E, H, I]. Its encoding may
            differ from gate_up's.
        router_logits: [T, E] float32 or hidden_states dtype (other float dtypes are
            converted to float32). Routing picks top_k experts per token from them.
        topk_ids, topk_weights: instead of router_logits, the routing itself:
            [T, k] integer expert ids (converted to int32) and [T, k] float weights
            (converted to float32). The routing options below must keep their defaults.
        top_k: experts per token; required with router_logits, taken from topk_ids
            when not given.
        scoring: "softmax" (of the E logits) or "sigmoid" (of each logit).
        renormalize: divide the k weights of a token by their sum.
        correction_bias: optional [E] float bias added to the scores for the choice
            of experts only (DeepSeek-V3's e_score_correction_bias).
        num_groups, topk_groups: group-limited routing: the E experts form num_groups
            equal groups, of which the topk_groups best are kept.
        group_score: a group's score: "max" (its best expert, DeepSeek-V2) or
            "top2_sum" (sum of its two best, DeepSeek-V3).
        scaling_factor: multiplies the final weights (routed_scaling_factor).
        shared_gate_up_weights, shared_down_weights: optional shared expert(s), applied
            to every token: one expert (E = 1) of shape [1, 2Is, H] and [1, H, Is]
            (several shared experts are one of their summed width); QuantizedExperts
            or 16-bit tensors.
        shared_gate: optional [H] (or [1, H]) vector in the hidden_states dtype; the
            shared output of token t is scaled by sigmoid(x_t · shared_gate) (Qwen2-MoE).
        workspace: optional 1-D uint8 buffer of >= qmoe.fused_moe_workspace_size(...)
            bytes on the hidden_states' device, 256-byte aligned on CUDA (16 on the
            CPU). Without it, CUDA calls use a buffer cached per (device, stream)
            (while a CUDA graph is captured: one from the graph's pool), and CPU
            calls let the library allocate.

    Returns:
        The layer output, same shape, dtype, framework and device as hidden_states.
        CUDA work is queued on the current stream; nothing synchronises with the host.
    """
    if compiling():
        return torch_ops().fused_moe(
            hidden_states, gate_up_weights, down_weights, router_logits=router_logits,
            topk_ids=topk_ids, topk_weights=topk_weights, top_k=top_k, scoring=scoring,
            renormalize=renormalize, correction_bias=correction_bias, num_groups=num_groups,
            topk_groups=topk_groups, group_score=group_score, scaling_factor=scaling_factor,
            shared_gate_up_weights=shared_gate_up_weights, shared_down_weights=shared_down_weights,
            shared_gate=shared_gate, workspace=workspace)
    c = _prepare_fused(hidden_states, gate_up_weights, down_weights, router_logits, topk_ids,
                       topk_weights, top_k, scoring, renormalize, correction_bias, num_groups,
                       topk_groups, group_score, scaling_factor, shared_gate_up_weights,
                       shared_down_weights, shared_gate, workspace)
    _ext.fused_moe(c.params, c.device)
    return c.result


_WARNED_GRAD = False


def _warn_no_grad():
    global _WARNED_GRAD
    if not _WARNED_GRAD:
        _WARNED_GRAD = True
        warnings.warn("qmoe.fused_moe is inference only: its output does not carry gradients "
                      "(hidden_states requires grad; run under torch.no_grad())", stacklevel=4)


class _FusedCall:
    __slots__ = ("params", "device", "result", "keep")


def _prepare_fused(hidden_states, gate_up_weights, down_weights, router_logits, topk_ids,
                   topk_weights, top_k, scoring, renormalize, correction_bias, num_groups,
                   topk_groups, group_score, scaling_factor, shared_gate_up_weights,
                   shared_down_weights, shared_gate, workspace, out=None) -> _FusedCall:
    fw = framework_of(hidden_states, "hidden_states")
    dev_type, dev_index, dev_ok = _device_checker(fw, hidden_states, "hidden_states")
    if hidden_states.ndim < 2:
        raise ValueError(f"hidden_states must be [T, H] (or [..., H]), got shape {_shape(hidden_states)}")
    act_name = fw.dtype_name(hidden_states)
    if act_name not in ACT_TYPES:
        raise ValueError(f"hidden_states must be float16 or bfloat16, got {act_name}")
    if getattr(hidden_states, "requires_grad", False):
        _warn_no_grad()
    out_shape = _shape(hidden_states)
    H = out_shape[-1]
    T = math.prod(out_shape[:-1])
    if H < 1:
        raise ValueError(f"hidden_states must have H >= 1 columns, got shape {out_shape}")
    x = fw.contiguous(hidden_states).reshape(T, H)

    gu = _check_weights(fw, gate_up_weights, "gate_up_weights", act_name, dev_ok)
    dn = _check_weights(fw, down_weights, "down_weights", act_name, dev_ok)
    E = gu.E
    if E > MAX_EXPERTS:
        raise ValueError(f"gate_up_weights has {E} experts; qmoe routes at most {MAX_EXPERTS}")
    if gu.K != H:
        raise ValueError(
            f"gate_up_weights must be [E, 2I, H] with H = {H} (hidden_states.shape[-1]), "
            f"got K = {gu.K}"
        )
    if gu.N % 2 != 0:
        raise ValueError(f"gate_up_weights must have an even number of rows 2I, got {gu.N}")
    I = gu.N // 2
    if (dn.E, dn.N, dn.K) != (E, H, I):
        raise ValueError(
            f"down_weights must be [E, H, I] = [{E}, {H}, {I}] to match gate_up_weights "
            f"[{E}, {2 * I}, {H}], got [{dn.E}, {dn.N}, {dn.K}] (unpacked)"
        )

    # Routing: router logits, or the caller's top-k.
    p = _ext.FusedMoeParams()
    keep = [x, gu.keep, dn.keep]
    if router_logits is not None:
        if topk_ids is not None or topk_weights is not None:
            raise ValueError("give router_logits or topk_ids/topk_weights, not both")
        if top_k is None:
            raise ValueError("top_k is required with router_logits")
        k = _check_top_k(top_k, E)
        logits, f32, _ = _check_logits(fw, router_logits, T, E, act_name, dev_ok)
        r, bias = _routing_params(fw, E, k, scoring, renormalize, correction_bias, num_groups,
                                  topk_groups, group_score, scaling_factor, dev_ok)
        p.router_logits = fw.ptr(logits)
        p.logits_f32 = f32
        p.routing = r
        keep += [logits, bias]
    elif topk_ids is not None or topk_weights is not None:
        if topk_ids is None or topk_weights is None:
            raise ValueError("topk_ids and topk_weights must be given together")
        given = dict(scoring=scoring, renormalize=renormalize, correction_bias=correction_bias,
                     num_groups=num_groups, topk_groups=topk_groups, group_score=group_score,
                     scaling_factor=scaling_factor)
        for name, v in given.items():
            d = _ROUTING_DEFAULTS[name]
            if not _is_default(v, d):
                raise ValueError(
                    f"{name} applies to routing from router_logits; with topk_ids/topk_weights "
                    f"it must keep its default ({d!r})"
                )
        expect_same_framework(fw, topk_ids, "topk_ids", "hidden_states")
        expect_same_framework(fw, topk_weights, "topk_weights", "hidden_states")
        dev_ok("topk_ids", topk_ids)
        dev_ok("topk_weights", topk_weights)
        if topk_ids.ndim != 2 or int(topk_ids.shape[0]) != T:
            raise ValueError(f"topk_ids must have shape [T, k] with T = {T}, got {list(_shape(topk_ids))}")
        k = int(topk_ids.shape[1])
        if top_k is not None and as_int(top_k, "top_k") != k:
            raise ValueError(f"top_k ({top_k}) must equal topk_ids.shape[1] ({k})")
        k = _check_top_k(k, E, "topk_ids.shape[1]")
        if _shape(topk_weights) != (T, k):
            raise ValueError(
                f"topk_weights must have the shape of topk_ids [{T}, {k}], got {list(_shape(topk_weights))}"
            )
        if not fw.is_integer(topk_ids):
            raise ValueError(f"topk_ids must have an integer dtype (int32 preferred), got {fw.dtype_name(topk_ids)}")
        if fw.dtype_name(topk_weights) not in _FLOATS:
            raise ValueError(
                f"topk_weights must be floating point (float32 preferred), got {fw.dtype_name(topk_weights)}"
            )
        ids = fw.to_int32(topk_ids)
        wts = fw.to_float32(topk_weights)
        p.topk_ids = fw.ptr(ids)
        p.topk_weights = fw.ptr(wts)
        keep += [ids, wts]
    else:
        raise ValueError("router_logits (with top_k) or topk_ids and topk_weights are required")

    # Shared experts.
    Is = 0
    if shared_gate_up_weights is not None or shared_down_weights is not None:
        if shared_gate_up_weights is None or shared_down_weights is None:
            raise ValueError("shared_gate_up_weights and shared_down_weights must be given together")
        sgu = _check_weights(fw, shared_gate_up_weights, "shared_gate_up_weights", act_name, dev_ok)
        sdn = _check_weights(fw, shared_down_weights, "shared_down_weights", act_name, dev_ok)
        if sgu.E != 1 or sgu.K != H or sgu.N % 2 != 0:
            raise ValueError(
                f"shared_gate_up_weights must be [1, 2Is, H] with H = {H}, got "
                f"[{sgu.E}, {sgu.N}, {sgu.K}] (unpacked)"
            )
        Is = sgu.N // 2
        if (sdn.E, sdn.N, sdn.K) != (1, H, Is):
            raise ValueError(
                f"shared_down_weights must be [1, H, Is] = [1, {H}, {Is}], got "
                f"[{sdn.E}, {sdn.N}, {sdn.K}] (unpacked)"
            )
        p.shared_gate_up = sgu.struct
        p.shared_down = sdn.struct
        keep += [sgu.keep, sdn.keep]
        if shared_gate is not None:
            expect_same_framework(fw, shared_gate, "shared_gate", "hidden_states")
            dev_ok("shared_gate", shared_gate)
            if _shape(shared_gate) not in ((H,), (1, H)):
                raise ValueError(f"shared_gate must have shape [H] = [{H}] (or [1, H]), got {list(_shape(shared_gate))}")
            if fw.dtype_name(shared_gate) != act_name:
                raise ValueError(
                    f"shared_gate must have the hidden_states dtype ({act_name}), got {fw.dtype_name(shared_gate)}"
                )
            g = fw.contiguous(shared_gate)
            p.shared_gate = fw.ptr(g)
            keep.append(g)
    elif shared_gate is not None:
        raise ValueError("shared_gate needs shared experts (shared_gate_up_weights, shared_down_weights)")

    p.act_type = ACT_TYPES[act_name]
    p.num_tokens = T
    p.hidden = H
    p.intermediate = I
    p.num_experts = E
    p.top_k = k
    p.shared_intermediate = Is
    p.gate_up = gu.struct
    p.down = dn.struct
    p.hidden_states = fw.ptr(x)

    if out is None:
        out = _gemm._new_output(fw, out_shape, act_name, hidden_states)
    p.out = fw.ptr(out)

    stream = fw.stream(hidden_states)
    nbytes = int(_ext.fused_moe_workspace_size(p))
    if workspace is not None:
        _check_workspace(fw, workspace, nbytes, dev_ok)
        ws = workspace
    elif dev_type == "cuda" and T > 0:
        if fw.capturing(hidden_states):
            # A CUDA graph owns its workspace: allocated from the graph's pool now,
            # at a fixed address for every replay (nothing is allocated then).
            ws = fw.empty((max(nbytes, 1),), U8, hidden_states)
        else:
            ws = _cached_workspace(fw, hidden_states, dev_index, stream, nbytes)
    else:
        ws = None
    if ws is not None:
        p.workspace = fw.ptr(ws)
        p.workspace_bytes = _nbytes(ws)
        keep.append(ws)

    c = _FusedCall()
    c.params = p
    c.device = _ext.Device(
        _ext.DeviceType.cuda if dev_type == "cuda" else _ext.DeviceType.cpu, dev_index, stream)
    c.result = out
    c.keep = keep
    return c


# ---------------------------------------------------------------------------
# moe_route
# ---------------------------------------------------------------------------


def moe_route(router_logits: Any, *, top_k: int, scoring: str = "softmax",
              renormalize: bool = False, correction_bias: Any = None, num_groups: int = 1,
              topk_groups: int = 1, group_score: str = "max", scaling_factor: float = 1.0):
    """The routing of qmoe.fused_moe alone.

    Args:
        router_logits: [T, E] float32, float16 or bfloat16 (other float dtypes are
            converted to float32); torch.Tensor (CPU or CUDA) or numpy.ndarray.
        top_k and the routing options: as for qmoe.fused_moe.

    Returns:
        (topk_ids, topk_weights): int32 [T, top_k] expert ids, best first (ties go to
        the lower expert index), and their float32 weights [T, top_k].
    """
    if compiling():
        return torch_ops().moe_route(
            router_logits, top_k=top_k, scoring=scoring, renormalize=renormalize,
            correction_bias=correction_bias, num_groups=num_groups, topk_groups=topk_groups,
            group_score=group_score, scaling_factor=scaling_factor)
    fw = framework_of(router_logits, "router_logits")
    dev_type, dev_index, dev_ok = _device_checker(fw, router_logits, "router_logits")
    if router_logits.ndim != 2:
        raise ValueError(f"router_logits must be 2-D [T, E], got shape {_shape(router_logits)}")
    T, E = _shape(router_logits)
    if E < 1 or E > MAX_EXPERTS:
        raise ValueError(f"router_logits must have E in [1, {MAX_EXPERTS}] columns, got {E}")
    k = _check_top_k(top_k, E)
    logits, f32, act_name = _check_logits(fw, router_logits, T, E, None, dev_ok)
    r, bias = _routing_params(fw, E, k, scoring, renormalize, correction_bias, num_groups,
                              topk_groups, group_score, scaling_factor, dev_ok)
    p = _ext.FusedMoeParams()
    p.act_type = ACT_TYPES[act_name] if act_name else _ext.ActType.bf16
    p.num_tokens = T
    p.hidden = 1
    p.num_experts = E
    p.top_k = k
    p.router_logits = fw.ptr(logits)
    p.logits_f32 = f32
    p.routing = r
    ids = fw.empty((T, k), "int32", router_logits)
    weights = fw.empty((T, k), F32, router_logits)
    device = _ext.Device(_ext.DeviceType.cuda if dev_type == "cuda" else _ext.DeviceType.cpu,
                         dev_index, fw.stream(router_logits))
    if T > 0:
        _ext.moe_route(p, fw.ptr(ids), fw.ptr(weights), device)
    del logits, bias  # kept alive until here
    return ids, weights
