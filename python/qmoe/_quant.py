"""Round-to-nearest quantizers producing the ARK layouts, and their exact dequantizers.

The arithmetic is the C++ implementation of include/qmoe/quantize.h (run on the
CPU); this module only checks arguments and moves data. Rules, per group of
``group_size`` consecutive elements along K of one row n of one expert e:

- int sym (bits 8/4/2, qmax 127/7/1): scale = absmax / qmax;
  q = clamp(round(w / scale), -qmax-1, qmax), stored in two's complement.
- int asym: min/max of the group widened to hold 0; scale = (max - min) / (2^bits - 1);
  zero = clamp(round(-min / scale), 0, 2^bits - 1);
  q = clamp(round(w / scale) + zero, 0, 2^bits - 1).
- fp8: scale = absmax / fp8_max (448 e4m3, 57344 e5m2); f = saturating
  round-to-nearest-even cast of w / scale.
- 16-bit (weight_bits=16): the weights cast to ``dtype`` (round to nearest even).

Scales and zeros are stored in ``dtype``, and the division uses the stored
(rounded) scale, so ``dequantize(*quantize(w))`` gives exactly the weights the
kernels multiply by. Rounding is to nearest, ties to even.
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
    check_group_layout,
    positive_group_size,
    weight_bits_value,
    weight_encoding,
)
from ._frameworks import BF16, E4M3, E5M2, F16, F32, U8, expect_same_framework, framework_of

_FP8_ARG = {"e4m3": E4M3, "e5m2": E5M2, E4M3: E4M3, E5M2: E5M2}
_FLOAT_NAMES = {"float16", "bfloat16", "float32", "float64"}


def _act_name(dtype: Any) -> str:
    """'float16' or 'bfloat16' from a string, a torch dtype or a NumPy dtype."""
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
    else:
        name = str(dtype).removeprefix("torch.")
        if type(dtype).__module__ != "torch":
            try:
                import numpy as np

                name = np.dtype(dtype).name
            except TypeError:
                pass
    aliases = {"half": F16, "fp16": F16, "bf16": BF16}
    name = aliases.get(name, name)
    if name not in ACT_TYPES:
        raise ValueError(f"dtype must be float16 or bfloat16, got {dtype!r}")
    return name


def _spec(weight_type, asym: bool, act_name: str, group_size: int):
    s = _ext.QuantSpec()
    s.weight_type = weight_type
    s.asym = asym
    s.act_type = ACT_TYPES[act_name]
    s.group_size = group_size
    return s


def quantize(weights: Any, *, weight_bits: int = 4, group_size: int = 128, asym: bool = False,
             dtype: Any = "bfloat16", fp8: str | None = None):
    """Quantizes float weights [E, N, K] to the ARK layout (round to nearest).

    Args:
        weights: [E, N, K] floating-point torch.Tensor or numpy.ndarray (converted
            to float32). CUDA tensors are quantized on their device by PyTorch
            operations that give the C++ quantizer's results bit for bit.
        weight_bits: 16, 8, 4 or 2 (ignored when fp8 is given).
        group_size: positive int dividing K (even for int4, a multiple of 4 for
            int2); one scale (and zero) per group along K. Unused for 16-bit.
        asym: zero-point (unsigned) integer codes; not for fp8 or 16-bit.
        dtype: the activation dtype, in which scales, zeros and 16-bit weights are
            stored: "bfloat16" / "float16", or the torch / NumPy dtype.
        fp8: None, "e4m3" (float8_e4m3fn) or "e5m2" (float8_e5m2); overrides
            weight_bits.

    Returns:
        (qweights, scales, zeros), the arguments of qmoe.moe_gemm_decode & co:
        qweights [E, N, K_packed] (uint8 codes with K_packed = K, K/2, K/4 for
        8/4/2 bits; float8 for fp8; ``dtype`` for 16-bit); scales
        [E, N, K // group_size] in ``dtype`` (None for 16-bit); zeros like scales
        when asym, else None. Same framework and device as ``weights``.
    """
    fw = framework_of(weights, "weights")
    if weights.ndim != 3:
        raise ValueError(f"weights must be 3-D [E, N, K], got shape {tuple(weights.shape)}")
    E, N, K = (int(s) for s in weights.shape)
    if min(E, N, K) < 1:
        raise ValueError(f"weights must have E, N, K >= 1, got shape {(E, N, K)}")
    if fw.dtype_name(weights) not in _FLOAT_NAMES:
        raise ValueError(
            f"weights must be floating point (float32 preferred), got {fw.dtype_name(weights)}"
        )
    act = _act_name(dtype)
    asym = as_bool(asym, "asym")
    if fp8 is not None:
        if not isinstance(fp8, str) or fp8 not in _FP8_ARG:
            raise ValueError(f"fp8 must be None, 'e4m3' or 'e5m2', got {fp8!r}")
        wt = FP8_TYPES[_FP8_ARG[fp8]]
        q_dtype = _FP8_ARG[fp8]
        if asym:
            raise ValueError("asym must be False for fp8 weights (fp8 has no zero points)")
    else:
        bits = weight_bits_value(weight_bits)
        if bits == 16:
            wt, q_dtype = WT.native16, act
            if asym:
                raise ValueError("asym must be False when weight_bits=16")
        else:
            wt, q_dtype = INT_TYPES[bits], U8
    if wt == WT.native16:
        gs, kp = K, K
    else:
        gs = positive_group_size(group_size)
        check_group_layout(wt, K, gs, K_name="K (weights.shape[2])")
        kp = K // PER_BYTE.get(wt, 1)

    if fw.device(weights)[0] == "cuda":
        # Same codes on the tensor's device (see _quant_torch): no host round trip.
        from . import _quant_torch

        return _quant_torch.quantize(fw.contiguous(weights), wt, asym, act, gs)

    w32 = fw.to_float32(fw.to_cpu(weights))
    q = fw.empty((E, N, kp), q_dtype, w32)
    scales = fw.empty((E, N, K // gs), act, w32) if wt != WT.native16 else None
    zeros = fw.empty((E, N, K // gs), act, w32) if asym else None
    _ext.quantize(_spec(wt, asym, act, gs), E, N, K, fw.ptr(w32), fw.ptr(q),
                  fw.ptr(scales) if scales is not None else 0,
                  fw.ptr(zeros) if zeros is not None else 0)
    back = [fw.to_device_of(x, weights) if x is not None else None for x in (q, scales, zeros)]
    return tuple(back)


def dequantize(qweights: Any, scales: Any = None, zeros: Any = None, *, weight_bits: int = 4,
               group_size: int = 128, asym: bool = False):
    """The exact float32 weights [E, N, K] that the kernels multiply by.

    Args:
        qweights, scales, zeros, weight_bits, group_size, asym: as for
            qmoe.moe_gemm_decode (and as returned by qmoe.quantize): qweights
            [E, N, K_packed]; the encoding is weight_bits, or fp8 when qweights
            has a float8 dtype. The activation dtype is that of scales (or of
            qweights for weight_bits=16).

    Returns:
        float32 [E, N, K] of the framework and device of qweights
        (computed on the CPU).
    """
    fw = framework_of(qweights, "qweights")
    if scales is not None:
        expect_same_framework(fw, scales, "scales", "qweights")
    if zeros is not None:
        expect_same_framework(fw, zeros, "zeros", "qweights")
    for name, x in (("scales", scales), ("zeros", zeros)):
        if x is not None and not fw.same_device(x, qweights):
            raise ValueError(
                f"{name} is on device '{fw.device_str(x)}' but qweights is on "
                f"'{fw.device_str(qweights)}'; all tensors must be on the same device"
            )
    if qweights.ndim != 3:
        raise ValueError(f"qweights must be 3-D [E, N, K_packed], got shape {tuple(qweights.shape)}")
    E, N, Kp = (int(s) for s in qweights.shape)
    if min(E, N, Kp) < 1:
        raise ValueError(f"qweights must have E, N, K_packed >= 1, got shape {(E, N, Kp)}")
    asym = as_bool(asym, "asym")
    q_name = fw.dtype_name(qweights)

    wt, K = weight_encoding(q_name, weight_bits, Kp, asym, scales is not None, zeros is not None,
                            q_name="qweights")

    if wt == WT.native16:
        act, gs = q_name, K
    else:
        if scales is None:
            raise ValueError(f"scales is required for {ENCODING_NAME[wt]} weights")
        act = fw.dtype_name(scales)
        if act not in ACT_TYPES:
            raise ValueError(f"scales must be float16 or bfloat16, got {act}")
        gs = positive_group_size(group_size)
        check_group_layout(wt, K, gs)
        groups = (E, N, K // gs)
        for name, x in (("scales", scales), ("zeros", zeros)):
            if x is None:
                continue
            if fw.dtype_name(x) != act:
                raise ValueError(f"{name} must have the scales dtype ({act}), got {fw.dtype_name(x)}")
            if tuple(int(s) for s in x.shape) != groups:
                raise ValueError(f"{name} must have shape {list(groups)}, got {list(x.shape)}")

    cpu = [fw.contiguous(fw.to_cpu(x)) if x is not None else None for x in (qweights, scales, zeros)]
    out = fw.empty((E, N, K), F32, cpu[0])
    _ext.dequantize(_spec(wt, asym, act, gs), E, N, K, fw.ptr(cpu[0]),
                    fw.ptr(cpu[1]) if cpu[1] is not None else 0,
                    fw.ptr(cpu[2]) if cpu[2] is not None else 0, fw.ptr(out))
    return fw.to_device_of(out, qweights)
