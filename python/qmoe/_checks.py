"""Argument checks shared by the grouped products and the quantizers.

Scalar arguments that are out of range, or of a type that cannot be read as
the value wanted, raise ValueError; tensor arguments of a wrong object type
raise TypeError. Every message names the argument.
"""

from __future__ import annotations

import operator
from typing import Any

from . import _ext
from ._frameworks import BF16, E4M3, E5M2, F16, type_name

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
