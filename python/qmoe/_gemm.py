"""The grouped MoE products: ARK's moe_gemm_decode, moe_gemm_prefill, moe, moe_gemm.

Each call checks its arguments (the rules of DESIGN.md §2 and ARK's, less
ARK's N % 16 == 0), makes its inputs contiguous, allocates the output
with the caller's framework on the caller's device and runs the C++ kernel
(asynchronously on the current CUDA stream for CUDA tensors).
"""

from __future__ import annotations

from typing import Any

from . import _ext
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
)
from ._frameworks import U8, compiling, expect_same_framework, framework_of, torch_ops

_PHASES = {
    "auto": _ext.Phase.automatic,
    "decode": _ext.Phase.decode,
    "prefill": _ext.Phase.prefill,
}


def _new_output(fw, shape, dtype_name: str, like):
    """Allocates the [T, N] output (uninitialised: the kernel writes every element).

    Kept as a module-level function so the tests can poison outputs.
    """
    return fw.empty(shape, dtype_name, like)


class _Call:
    """Checked arguments of one grouped product, ready for the C++ entry point."""

    __slots__ = ("params", "device", "out", "keep")


def _shape(x) -> tuple:
    return tuple(int(s) for s in x.shape)


def _check_devices(fw, activations, named):
    dev_type, dev_index = fw.device(activations)
    if dev_type not in ("cpu", "cuda"):
        raise ValueError(
            f"activations is on device '{fw.device_str(activations)}'; qmoe runs on cpu and cuda"
        )
    for name, x in named:
        if x is not None and not fw.same_device(x, activations):
            raise ValueError(
                f"{name} is on device '{fw.device_str(x)}' but activations is on "
                f"'{fw.device_str(activations)}'; all tensors must be on the same device"
            )
    return dev_type, dev_index


def _check_activations(fw, activations):
    if activations.ndim != 2:
        raise ValueError(f"activations must be 2-D [T, K], got shape {_shape(activations)}")
    act_name = fw.dtype_name(activations)
    if act_name not in ACT_TYPES:
        raise ValueError(f"activations must be float16 or bfloat16, got {act_name}")
    T, K = _shape(activations)
    if K < 1:
        raise ValueError(f"activations must have K >= 1 columns, got shape {(T, K)}")
    return act_name, T, K


def _check_counts(fw, counts, E: int, T: int, on_cpu: bool):
    """num_tokens_per_expert -> contiguous int32 [E] (checked against T on CPU only)."""
    if counts.ndim != 1 or int(counts.shape[0]) != E:
        raise ValueError(
            f"num_tokens_per_expert must be 1-D of length E = {E} (weights.shape[0]), "
            f"got shape {_shape(counts)}"
        )
    if not fw.is_integer(counts):
        raise ValueError(
            f"num_tokens_per_expert must have an integer dtype (int32 preferred), "
            f"got {fw.dtype_name(counts)}"
        )
    if on_cpu:
        # On CUDA this would synchronise with the host; the kernels clamp instead.
        low = fw.min(counts)
        if low < 0:
            raise ValueError(f"num_tokens_per_expert must be >= 0, got a count of {low}")
        total = fw.total(counts)
        if total != T:
            raise ValueError(
                f"sum of num_tokens_per_expert ({total}) must equal the number of "
                f"activation rows T = {T}"
            )
    return fw.to_int32(counts)


def _check_group_tensor(fw, x, name: str, act_name: str, shape: tuple, why: str):
    if x is None:
        raise ValueError(f"{name} is required {why}")
    if fw.dtype_name(x) != act_name:
        raise ValueError(
            f"{name} must have the activations dtype ({act_name}), got {fw.dtype_name(x)}"
        )
    if _shape(x) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(_shape(x))}")


def _finish(fw, activations, weights, counts, scales, zeros, *, act_name, weight_type, asym,
            layout, E, N, K, T, group_size, dev_type, dev_index) -> _Call:
    activations = fw.contiguous(activations)
    weights = fw.contiguous(weights)
    scales = fw.contiguous(scales) if scales is not None else None
    zeros = fw.contiguous(zeros) if zeros is not None else None
    out = _new_output(fw, (T, N), act_name, activations)

    p = _ext.MoeGemmParams()
    p.act_type = ACT_TYPES[act_name]
    p.weight_type = weight_type
    p.asym = asym
    p.layout = layout
    p.num_experts = E
    p.n = N
    p.k = K
    p.total_tokens = T
    p.group_size = group_size
    p.activations = fw.ptr(activations)
    p.weights = fw.ptr(weights)
    p.scales = fw.ptr(scales) if scales is not None else 0
    p.zeros = fw.ptr(zeros) if zeros is not None else 0
    p.tokens_per_expert = fw.ptr(counts)
    p.out = fw.ptr(out)

    call = _Call()
    call.params = p
    call.device = _ext.Device(
        _ext.DeviceType.cuda if dev_type == "cuda" else _ext.DeviceType.cpu,
        dev_index,
        fw.stream(activations),
    )
    call.out = out
    # The pointers above are only valid while these objects live.
    call.keep = (activations, weights, counts, scales, zeros)
    return call


def _prepare_enk(activations, weights, num_tokens_per_expert, scales, zeros, weight_bits,
                 group_size, asym) -> _Call:
    """Checks the arguments of the [E, N, K_packed] products (ARK's rules)."""
    fw = framework_of(activations, "activations")
    expect_same_framework(fw, weights, "weights")
    expect_same_framework(fw, num_tokens_per_expert, "num_tokens_per_expert")
    if scales is not None:
        expect_same_framework(fw, scales, "scales")
    if zeros is not None:
        expect_same_framework(fw, zeros, "zeros")
    dev_type, dev_index = _check_devices(
        fw, activations,
        (("weights", weights), ("num_tokens_per_expert", num_tokens_per_expert),
         ("scales", scales), ("zeros", zeros)))

    act_name, T, K = _check_activations(fw, activations)
    if weights.ndim != 3:
        raise ValueError(f"weights must be 3-D [E, N, K_packed], got shape {_shape(weights)}")
    E, N, Kp = _shape(weights)
    if E < 1:
        raise ValueError(f"weights must hold at least one expert (E >= 1), got shape {(E, N, Kp)}")
    if N < 1:
        raise ValueError(f"weights must have N >= 1 output rows, got shape {(E, N, Kp)}")
    asym = as_bool(asym, "asym")
    counts = _check_counts(fw, num_tokens_per_expert, E, T, dev_type == "cpu")

    w_name = fw.dtype_name(weights)
    if w_name in FP8_TYPES:  # the weights' dtype overrides weight_bits, as in ARK
        wt = FP8_TYPES[w_name]
        enc = ENCODING_NAME[wt]
        if asym:
            raise ValueError(f"asym must be False for {enc} weights (fp8 has no zero points)")
        if Kp != K:
            raise ValueError(
                f"weights.shape[2] must equal K = {K} (activations.shape[1]) for {enc} "
                f"weights, got {Kp}"
            )
        if scales is None:
            raise ValueError(f"scales is required for {enc} weights")
        if zeros is not None:
            raise ValueError(f"zeros must be None for {enc} weights")
        gs = positive_group_size(group_size)
        check_group_layout(wt, K, gs)
        _check_group_tensor(fw, scales, "scales", act_name, (E, N, K // gs), f"for {enc} weights")
    else:
        bits = weight_bits_value(weight_bits)
        if bits == 16:
            wt = WT.native16
            if w_name != act_name:
                raise ValueError(
                    f"weights must have the activations dtype ({act_name}) when "
                    f"weight_bits=16, got {w_name}"
                )
            if Kp != K:
                raise ValueError(
                    f"weights.shape[2] must equal K = {K} (activations.shape[1]) when "
                    f"weight_bits=16, got {Kp}"
                )
            if scales is not None:
                raise ValueError("scales must be None when weight_bits=16")
            if zeros is not None:
                raise ValueError("zeros must be None when weight_bits=16")
            if asym:
                raise ValueError("asym must be False when weight_bits=16")
            gs = K  # unused by 16-bit weights
        else:
            wt = INT_TYPES[bits]
            enc = ENCODING_NAME[wt]
            if w_name != U8:
                raise ValueError(
                    f"weights must be uint8 (packed {enc} codes) when weight_bits={bits}, "
                    f"got {w_name}"
                )
            per = PER_BYTE[wt]
            if K % per != 0:
                raise ValueError(
                    f"K = {K} (activations.shape[1]) must be divisible by {per} for "
                    f"{enc} weights"
                )
            if Kp != K // per:
                raise ValueError(
                    f"weights.shape[2] must be K/{per} = {K // per} for {enc} weights "
                    f"(K = {K}), got {Kp}"
                )
            if scales is None:
                raise ValueError(f"scales is required for {enc} weights")
            gs = positive_group_size(group_size)
            check_group_layout(wt, K, gs)
            groups = (E, N, K // gs)
            _check_group_tensor(fw, scales, "scales", act_name, groups, f"for {enc} weights")
            if asym:
                _check_group_tensor(fw, zeros, "zeros", act_name, groups, "when asym=True")
            elif zeros is not None:
                raise ValueError("zeros must be None when asym=False")

    return _finish(fw, activations, weights, counts, scales, zeros, act_name=act_name,
                   weight_type=wt, asym=asym, layout=_ext.WeightLayout.ENK, E=E, N=N, K=K,
                   T=T, group_size=gs, dev_type=dev_type, dev_index=dev_index)


_ARGS_DOC = """
    Args:
        activations: [T, K] float16 or bfloat16, rows sorted by expert (the first
            num_tokens_per_expert[0] rows belong to expert 0, and so on).
        weights: [E, N, K_packed] in the layout of DESIGN.md §2: the activations
            dtype for weight_bits=16; uint8 packed codes for weight_bits 8/4/2
            (K_packed = K, K/2, K/4); float8_e4m3fn or float8_e5m2 for fp8, whose
            dtype overrides weight_bits.
        num_tokens_per_expert: [E] integer counts (converted to int32), same device.
            On CPU their sum must be T; on CUDA it is not checked (no host sync).
        scales: [E, N, K // group_size] in the activations dtype; required for
            int8/int4/int2/fp8 weights, None for 16-bit weights.
        zeros: [E, N, K // group_size] in the activations dtype (integer values);
            required iff asym=True (int8/int4/int2 only).
        weight_bits: 16, 8, 4 or 2 (ignored for fp8 weights).
        group_size: positive int dividing K; even for int4, a multiple of 4 for int2.
        asym: True for zero-point (unsigned) integer codes.

    Returns:
        [T, N] output in the activations dtype, of the caller's framework
        (torch.Tensor or numpy.ndarray) on the activations' device.

    Raises:
        TypeError: an argument is not a tensor of the activations' framework.
        ValueError: bad shape, dtype, group size, device, or (CPU) token counts.
        qmoe.UnsupportedError (a NotImplementedError): e.g. CUDA tensors with a
            build without CUDA.
"""


def moe_gemm_decode(activations: Any, weights: Any, num_tokens_per_expert: Any, *,
                    scales: Any = None, zeros: Any = None, weight_bits: int = 4,
                    group_size: int = 128, asym: bool = False):
    """Grouped MoE product tuned for few tokens per expert (a GEMV per expert).

    out[t, :] = activations[t, :] @ W_e^T for every row t of expert e, where W_e
    is expert e's dequantized [N, K] weight; float32 accumulation.
    """
    if compiling():
        return torch_ops().moe_gemm_decode(activations, weights, num_tokens_per_expert, scales=scales,
                                           zeros=zeros, weight_bits=weight_bits,
                                           group_size=group_size, asym=asym)
    c = _prepare_enk(activations, weights, num_tokens_per_expert, scales, zeros, weight_bits,
                     group_size, asym)
    _ext.moe_gemm_decode(c.params, c.device)
    return c.out


def moe_gemm_prefill(activations: Any, weights: Any, num_tokens_per_expert: Any, *,
                     scales: Any = None, zeros: Any = None, weight_bits: int = 4,
                     group_size: int = 128, asym: bool = False):
    """Grouped MoE product tuned for many tokens per expert (a grouped GEMM).

    Same arguments and result as moe_gemm_decode.
    """
    if compiling():
        return torch_ops().moe_gemm_prefill(activations, weights, num_tokens_per_expert,
                                            scales=scales, zeros=zeros, weight_bits=weight_bits,
                                            group_size=group_size, asym=asym)
    c = _prepare_enk(activations, weights, num_tokens_per_expert, scales, zeros, weight_bits,
                     group_size, asym)
    _ext.moe_gemm_prefill(c.params, c.device)
    return c.out


def moe(activations: Any, weights: Any, num_tokens_per_expert: Any, *, scales: Any = None,
        zeros: Any = None, weight_bits: int = 4, group_size: int = 128, asym: bool = False,
        phase: str = "auto", decode_threshold: int = 4):
    """Grouped MoE product, decode or prefill kernel.

    phase: "decode", "prefill", or "auto": decode when T <= decode_threshold * E,
    decided from the shapes alone (never a host-device synchronisation).
    decode_threshold: int >= 0 (ARK's default 4). Measured on an H200
    (bench/gpu_bench.py --phase crossover, docs/PERFORMANCE.md): with int4,
    int2 and int8 weights the decode kernel stays faster up to 16 tokens per
    expert, so 16 suits them; with 16-bit weights the prefill kernel was
    faster from 8 tokens per expert. Other arguments as moe_gemm_decode.
    """
    if compiling():
        return torch_ops().moe(activations, weights, num_tokens_per_expert, scales=scales,
                               zeros=zeros, weight_bits=weight_bits, group_size=group_size,
                               asym=asym, phase=phase, decode_threshold=decode_threshold)
    if not isinstance(phase, str) or phase not in _PHASES:
        raise ValueError(f"phase must be 'auto', 'decode' or 'prefill', got {phase!r}")
    threshold = as_int(decode_threshold, "decode_threshold")
    if threshold < 0:
        raise ValueError(f"decode_threshold must be >= 0, got {threshold}")
    c = _prepare_enk(activations, weights, num_tokens_per_expert, scales, zeros, weight_bits,
                     group_size, asym)
    _ext.moe(c.params, c.device, _PHASES[phase], threshold)
    return c.out


def moe_gemm(activations: Any, weights: Any, num_tokens_per_expert: Any, *, scales: Any = None):
    """ARK's 16-bit grouped GEMM with [E, K, N] weights.

    Args:
        activations: [T, K] float16 or bfloat16, rows sorted by expert.
        weights: [E, K, N] in the activations dtype (note: K before N).
        num_tokens_per_expert: [E] integer counts, as for moe_gemm_decode.
        scales: optional [E, N] in the activations dtype; scales[e, n] multiplies
            output column n of the rows of expert e.

    Returns:
        [T, N] output in the activations dtype, of the caller's framework.
    """
    if compiling():
        return torch_ops().moe_gemm(activations, weights, num_tokens_per_expert, scales=scales)
    fw = framework_of(activations, "activations")
    expect_same_framework(fw, weights, "weights")
    expect_same_framework(fw, num_tokens_per_expert, "num_tokens_per_expert")
    if scales is not None:
        expect_same_framework(fw, scales, "scales")
    dev_type, dev_index = _check_devices(
        fw, activations,
        (("weights", weights), ("num_tokens_per_expert", num_tokens_per_expert),
         ("scales", scales)))
    act_name, T, K = _check_activations(fw, activations)
    if weights.ndim != 3:
        raise ValueError(f"weights must be 3-D [E, K, N], got shape {_shape(weights)}")
    E, Kw, N = _shape(weights)
    if E < 1:
        raise ValueError(f"weights must hold at least one expert (E >= 1), got shape {(E, Kw, N)}")
    if N < 1:
        raise ValueError(f"weights must have N >= 1 columns, got shape {(E, Kw, N)}")
    if fw.dtype_name(weights) != act_name:
        raise ValueError(
            f"weights must have the activations dtype ({act_name}), got {fw.dtype_name(weights)}"
        )
    if Kw != K:
        raise ValueError(
            f"weights.shape[1] must equal K = {K} (activations.shape[1]) for [E, K, N] "
            f"weights, got {Kw}"
        )
    counts = _check_counts(fw, num_tokens_per_expert, E, T, dev_type == "cpu")
    if scales is not None:
        if fw.dtype_name(scales) != act_name:
            raise ValueError(
                f"scales must have the activations dtype ({act_name}), got {fw.dtype_name(scales)}"
            )
        if _shape(scales) != (E, N):
            raise ValueError(f"scales must have shape [{E}, {N}], got {list(_shape(scales))}")
    c = _finish(fw, activations, weights, counts, scales, None, act_name=act_name,
                weight_type=WT.native16, asym=False, layout=_ext.WeightLayout.EKN, E=E, N=N,
                K=K, T=T, group_size=K, dev_type=dev_type, dev_index=dev_index)
    _ext.moe_gemm(c.params, c.device)
    return c.out


for _f in (moe_gemm_decode, moe_gemm_prefill, moe):
    _f.__doc__ = (_f.__doc__ or "") + _ARGS_DOC
del _f
