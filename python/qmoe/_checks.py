"""Argument checks shared by the grouped products and the quantizers.

Scalar arguments that are out of range, or of a type that cannot be read as
the value wanted, raise ValueError; tensor arguments of a wrong object type
raise TypeError. Every message names the argument.
"""

from __future__ import annotations

import operator
from typing import Any

from . import _ext
from ._frameworks import BF16, E4M3, E5M2, F16, U8, type_name

WT = _ext.WeightType
AT = _ext.ActType

ACT_TYPES = {F16: AT.f16, BF16: AT.bf16}
FP8_TYPES = {E4M3: WT.fp8_e4m3, E5M2: WT.fp8_e5m2}
INT_TYPES = {8: WT.int8, 4: WT.int4, 2: WT.int2}
# Codes packed in one byte, per integer encoding.
PER_BYTE = {WT.int8: 1, WT.int4: 2, WT.int2: 4}
ENCODING_NAME = {
    WT.native16: "16-bit",
    WT.int8: "int8",
    WT.int4: "int4",
    WT.int2: "int2",
    WT.fp8_e4m3: "fp8 e4m3",
    WT.fp8_e5m2: "fp8 e5m2",
}


def as_int(value: Any, name: str) -> int:
    """An integer argument (Python int, NumPy integer, ...); bools are refused."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r} ({type_name(value)})") from None


def as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    try:
        import numpy as np

        if isinstance(value, np.bool_):
            return bool(value)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be a bool, got {value!r}")


def positive_group_size(group_size: Any) -> int:
    gs = as_int(group_size, "group_size")
    if gs <= 0:
        raise ValueError(f"group_size must be a positive int, got {gs}")
    return gs


def weight_bits_value(weight_bits: Any) -> int:
    try:
        bits = as_int(weight_bits, "weight_bits")
    except ValueError:
        bits = None
    if bits not in (16, 8, 4, 2):
        raise ValueError(f"weight_bits must be one of 16, 8, 4, 2, got {weight_bits!r}")
    return bits


def check_group_layout(weight_type, K: int, group_size: int, K_name: str = "K"):
    """The group rules of DESIGN.md §2 (group_size already known positive)."""
    if K % group_size != 0:
        raise ValueError(
            f"group_size ({group_size}) must divide {K_name} ({K}) for "
            f"{ENCODING_NAME[weight_type]} weights"
        )
    if weight_type == WT.int4 and group_size % 2 != 0:
        raise ValueError(f"group_size must be even for int4 weights, got {group_size}")
    if weight_type == WT.int2 and group_size % 4 != 0:
        raise ValueError(f"group_size must be a multiple of 4 for int2 weights, got {group_size}")


def weight_encoding(q_dtype: str, weight_bits: Any, Kp: int, asym: bool, has_scales: bool,
                    has_zeros: bool, *, q_name: str, arg=lambda sub: sub, act_name=None,
                    act_arg: str = "activations"):
    """(weight type, unpacked K) of packed weights [E, N, Kp] of dtype q_dtype, with the
    zero-point rules of DESIGN.md §2: an fp8 dtype overrides weight_bits and has no
    zeros; 16-bit weights are in the activation dtype (act_name, or either 16-bit
    float when None) and have no scales or zeros; int8/4/2 are uint8 codes with
    zeros exactly when asym. q_name names the weights, arg(sub) names "asym",
    "scales" and "zeros", and act_arg the argument act_name is the dtype of."""
    if q_dtype in FP8_TYPES:
        wt = FP8_TYPES[q_dtype]
        if asym:
            raise ValueError(f"{arg('asym')} must be False for {ENCODING_NAME[wt]} weights "
                             "(fp8 has no zero points)")
        if has_zeros:
            raise ValueError(f"{arg('zeros')} must be None for {ENCODING_NAME[wt]} weights")
        return wt, Kp
    bits = weight_bits_value(weight_bits)
    if bits == 16:
        if act_name is not None and q_dtype != act_name:
            raise ValueError(f"{q_name} must have the {act_arg} dtype ({act_name}) for 16-bit "
                             f"weights, got {q_dtype}")
        if act_name is None and q_dtype not in ACT_TYPES:
            raise ValueError(f"{q_name} must be float16 or bfloat16 when weight_bits=16, "
                             f"got {q_dtype}")
        if has_scales or has_zeros:
            raise ValueError(f"{arg('scales')} and {arg('zeros')} must be None for 16-bit "
                             "weights (weight_bits=16)")
        if asym:
            raise ValueError(f"{arg('asym')} must be False for 16-bit weights (weight_bits=16)")
        return WT.native16, Kp
    wt = INT_TYPES[bits]
    if q_dtype != U8:
        raise ValueError(f"{q_name} must be uint8 (packed {ENCODING_NAME[wt]} codes) when "
                         f"weight_bits={bits}, got {q_dtype}")
    if asym and not has_zeros:
        raise ValueError(f"{arg('zeros')} is required when asym=True")
    if not asym and has_zeros:
        raise ValueError(f"{arg('zeros')} must be None when asym=False")
    return wt, Kp * PER_BYTE[wt]
