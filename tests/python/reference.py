"""An independent NumPy model of the qmoe / ARK tensor layouts (DESIGN.md §2).

Written from the layout tables and the OCP FP8 definitions, not from the qmoe
sources, so that the tests compare two implementations. It works on raw bits
(uint16 for 16-bit floats, uint8 for packed codes and fp8) so that it needs
neither torch nor ml_dtypes; tests/python/helpers.py turns bits into framework
objects and back.

- decoding of every weight encoding, and a float64 reference of the grouped
  product (``moe_ref``, ``moe_gemm_ref``);
- the round-to-nearest quantizer of include/qmoe/quantize.h (``quantize_ref``),
  in float32 arithmetic, for bit-exact comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# --------------------------------------------------------------------------
# Encodings
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoding:
    name: str
    bits: int            # 16, 8, 4, 2 (8 for fp8)
    asym: bool = False
    fp8: str | None = None  # "e4m3" or "e5m2"

    @property
    def is_int(self) -> bool:
        return self.fp8 is None and self.bits in (8, 4, 2)

    @property
    def scaled(self) -> bool:
        return self.bits != 16

    @property
    def per_byte(self) -> int:
        return 8 // self.bits if self.is_int else 1

    @property
    def levels(self) -> int:
        """Largest unsigned code (2^bits - 1) of an integer encoding."""
        return (1 << self.bits) - 1

    def kwargs(self) -> dict:
        """The keyword arguments of qmoe.moe_gemm_* that describe this encoding."""
        if self.fp8:
            return {"asym": False}  # weight_bits is ignored for fp8 (kept at its default)
        return {"weight_bits": self.bits, "asym": self.asym}

    def quantize_kwargs(self) -> dict:
        if self.fp8:
            return {"fp8": self.fp8}
        return {"weight_bits": self.bits, "asym": self.asym}


ENCODINGS = {
    e.name: e
    for e in (
        Encoding("w16", 16),
        Encoding("int8", 8),
        Encoding("int8_asym", 8, asym=True),
        Encoding("int4", 4),
        Encoding("int4_asym", 4, asym=True),
        Encoding("int2", 2),
        Encoding("int2_asym", 2, asym=True),
        Encoding("fp8_e4m3", 8, fp8="e4m3"),
        Encoding("fp8_e5m2", 8, fp8="e5m2"),
    )
}

ACTS = ("float16", "bfloat16")

# --------------------------------------------------------------------------
# 16-bit floats
# --------------------------------------------------------------------------


def f16_bits_to_f64(bits) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(np.float64)


def bf16_bits_to_f64(bits) -> np.ndarray:
    # bfloat16 is the top half of an IEEE float32.
    u32 = np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)
    return u32.view(np.float32).astype(np.float64)


def act_bits_to_f64(bits, act: str) -> np.ndarray:
    return f16_bits_to_f64(bits) if act == "float16" else bf16_bits_to_f64(bits)


def f32_to_f16_bits(x) -> np.ndarray:
    """IEEE binary16, round to nearest even (NumPy's own conversion)."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).view(np.uint16)


def f32_to_bf16_bits(x) -> np.ndarray:
    """bfloat16, round to nearest even, for zero and normal finite values.

    Rounds the 24-bit significand of the float32 to 8 bits with frexp / rint
    (ties to even) in float64, which is exact here.
    """
    x = np.asarray(x, dtype=np.float32).astype(np.float64)
    if np.any((x != 0) & (np.abs(x) < 2.0**-126)) or not np.all(np.isfinite(x)):
        raise ValueError("f32_to_bf16_bits handles zero and normal finite values only")
    m, e = np.frexp(x)  # x = m * 2^e, 0.5 <= |m| < 1
    r = np.ldexp(np.rint(np.ldexp(m, 8)), e - 8)
    return (r.astype(np.float32).view(np.uint32) >> np.uint32(16)).astype(np.uint16)


def f32_to_act_bits(x, act: str) -> np.ndarray:
    return f32_to_f16_bits(x) if act == "float16" else f32_to_bf16_bits(x)


def round_to_act(x, act: str) -> np.ndarray:
    """float32 values rounded to what the activation dtype stores (as float32)."""
    return act_bits_to_f64(f32_to_act_bits(x, act), act).astype(np.float32)


# --------------------------------------------------------------------------
# OCP FP8 (OFP8 spec): E4M3FN bias 7, no infinities, S.1111.111 is NaN, max 448;
# E5M2 bias 15, IEEE-like: exponent 31 is inf (mantissa 0) or NaN, max 57344.
# --------------------------------------------------------------------------

_FP8_FORMAT = {"e4m3": (4, 3, 7), "e5m2": (5, 2, 15)}
FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}


def fp8_to_f64(codes, fmt: str) -> np.ndarray:
    ebits, mbits, bias = _FP8_FORMAT[fmt]
    c = np.asarray(codes, dtype=np.uint8).astype(np.int64)
    sign = np.where(c & 0x80, -1.0, 1.0)
    exp = (c >> mbits) & ((1 << ebits) - 1)
    man = c & ((1 << mbits) - 1)
    subnormal = np.ldexp(man.astype(np.float64), 1 - bias - mbits)
    normal = np.ldexp(1.0 + man / float(1 << mbits), exp - bias)
    v = np.where(exp == 0, subnormal, normal)
    if fmt == "e4m3":
        v = np.where((c & 0x7F) == 0x7F, np.nan, v)
    else:
        top = exp == (1 << ebits) - 1
        v = np.where(top & (man == 0), np.inf, v)
        v = np.where(top & (man != 0), np.nan, v)
    return sign * v


def fp8_finite_codes(fmt: str) -> np.ndarray:
    """All codes whose value is finite."""
    codes = np.arange(256, dtype=np.uint8)
    return codes[np.isfinite(fp8_to_f64(codes, fmt))]


def f64_to_fp8(x, fmt: str) -> np.ndarray:
    """Saturating cast, round to nearest, ties to the even code; sign kept (-0 -> 0x80).

    Looks the magnitude up in the sorted table of non-negative finite values
    (codes 0x00 upward, increasing with the code) and picks the nearer
    neighbour, or on a tie the one with an even code (mantissa LSB 0).
    """
    x = np.asarray(x, dtype=np.float64)
    if np.any(np.isnan(x)):
        raise ValueError("f64_to_fp8: NaN input")
    codes = np.arange(0x80, dtype=np.int64)
    vals = fp8_to_f64(codes, fmt)
    keep = np.isfinite(vals)
    codes, vals = codes[keep], vals[keep]
    assert np.all(np.diff(vals) > 0)
    a = np.minimum(np.abs(x), vals[-1])
    i = np.searchsorted(vals, a, side="left")
    hi = np.clip(i, 0, len(vals) - 1)
    lo = np.clip(i - 1, 0, len(vals) - 1)
    d_lo = a - vals[lo]
    d_hi = vals[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (codes[hi] % 2 == 0))
    mag = np.where(pick_hi, codes[hi], codes[lo])
    return (mag | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


# --------------------------------------------------------------------------
# Integer codes: packing and values
# --------------------------------------------------------------------------


def unpack_fields(packed, bits: int) -> np.ndarray:
    """uint8 [..., K_packed] -> unsigned fields [..., K]; element k = per*i + j sits in
    bits j*bits .. j*bits+bits-1 of byte i (low nibble first for int4)."""
    packed = np.asarray(packed, dtype=np.uint8).astype(np.int64)
    per = 8 // bits
    shifts = np.arange(per, dtype=np.int64) * bits
    fields = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return fields.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def pack_fields(fields, bits: int) -> np.ndarray:
    fields = np.asarray(fields, dtype=np.int64) & ((1 << bits) - 1)
    per = 8 // bits
    K = fields.shape[-1]
    assert K % per == 0
    f = fields.reshape(*fields.shape[:-1], K // per, per)
    shifts = np.arange(per, dtype=np.int64) * bits
    return (f << shifts).sum(axis=-1).astype(np.uint8)


def int_values(fields, bits: int, asym: bool) -> np.ndarray:
    """Unsigned fields -> code values: 0..2^bits-1 (asym) or two's complement (sym)."""
    fields = np.asarray(fields, dtype=np.int64)
    if asym:
        return fields
    return np.where(fields >= (1 << (bits - 1)), fields - (1 << bits), fields)


# --------------------------------------------------------------------------
# Dequantization and the float64 reference products
# --------------------------------------------------------------------------


def expand_groups(g, group_size: int) -> np.ndarray:
    """[E, N, G] -> [E, N, G * group_size]: the group of element k is k // group_size."""
    return np.repeat(np.asarray(g, dtype=np.float64), group_size, axis=-1)


def dequantize_ref(enc: Encoding, act: str, weights_raw, scale_bits=None, zero_bits=None,
                   group_size: int = 128) -> np.ndarray:
    """float64 [E, N, K] from raw weights (uint16 bits for 16-bit, else uint8)."""
    if enc.bits == 16:
        return act_bits_to_f64(weights_raw, act)
    if enc.fp8:
        v = fp8_to_f64(weights_raw, enc.fp8)
    else:
        v = int_values(unpack_fields(weights_raw, enc.bits), enc.bits, enc.asym).astype(np.float64)
    s = expand_groups(act_bits_to_f64(scale_bits, act), group_size)
    if enc.asym:
        v = v - expand_groups(act_bits_to_f64(zero_bits, act), group_size)
    return v * s


def expert_of_rows(counts) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.int64)
    return np.repeat(np.arange(len(counts)), counts)


def moe_ref(act_f64, w_enk_f64, counts) -> np.ndarray:
    """out[t] = act[t] @ W_e^T for the expert e of row t; float64."""
    act = np.asarray(act_f64, dtype=np.float64)
    w = np.asarray(w_enk_f64, dtype=np.float64)
    out = np.zeros((act.shape[0], w.shape[1]), dtype=np.float64)
    start = 0
    for e, c in enumerate(np.asarray(counts, dtype=np.int64)):
        out[start:start + c] = act[start:start + c] @ w[e].T
        start += c
    return out


def moe_gemm_ref(act_f64, w_ekn_f64, counts, scales_f64=None) -> np.ndarray:
    """ARK's moe_gemm: weights [E, K, N], optional per-column scales [E, N]."""
    act = np.asarray(act_f64, dtype=np.float64)
    w = np.asarray(w_ekn_f64, dtype=np.float64)
    out = np.zeros((act.shape[0], w.shape[2]), dtype=np.float64)
    start = 0
    for e, c in enumerate(np.asarray(counts, dtype=np.int64)):
        y = act[start:start + c] @ w[e]
        if scales_f64 is not None:
            y = y * np.asarray(scales_f64, dtype=np.float64)[e][None, :]
        out[start:start + c] = y
        start += c
    return out


def rel_error(out, ref) -> float:
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    denom = np.linalg.norm(ref)
    if denom == 0:
        raise AssertionError("reference is all zeros: the test data is degenerate")
    return float(np.linalg.norm(out - ref) / denom)


TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2}

# --------------------------------------------------------------------------
# The round-to-nearest quantizer of include/qmoe/quantize.h, in float32
# --------------------------------------------------------------------------


def quantize_ref(w, enc: Encoding, act: str, group_size: int):
    """float32 [E, N, K] -> (weights_raw, scale_bits, zero_bits).

    weights_raw: uint16 bits [E, N, K] for 16-bit, uint8 [E, N, K_packed] otherwise;
    scale_bits / zero_bits: uint16 [E, N, K / group_size] (None where absent).
    Division is by the stored (rounded) scale; rounding is half to even.
    """
    w = np.asarray(w, dtype=np.float32)
    E, N, K = w.shape
    if enc.bits == 16:
        return f32_to_act_bits(w, act), None, None
    G = K // group_size
    g = w.reshape(E, N, G, group_size)
    lo = g.min(axis=-1)
    hi = g.max(axis=-1)
    zero_bits = None
    with np.errstate(divide="ignore", invalid="ignore"):
        if enc.asym:
            levels = np.float32(enc.levels)
            lo = np.minimum(lo, np.float32(0))  # the range holds 0 (quantize.h)
            hi = np.maximum(hi, np.float32(0))
            s = np.where(hi > lo, (hi - lo) / levels,
                         np.where(hi == 0, np.float32(1), np.abs(hi))).astype(np.float32)
            s = round_to_act(s, act)
            s4 = s[..., None]
            z = np.where(s > 0, np.clip(np.rint(-lo / s), 0, levels), np.float32(0))
            z = z.astype(np.float32)
            z4 = z[..., None]
            q = np.where(s4 > 0, np.rint(g / s4) + z4, z4)
            q = np.clip(q, 0, levels)
            zero_bits = f32_to_act_bits(z, act)
        else:
            absmax = np.maximum(np.abs(lo), np.abs(hi))
            qmax = np.float32(FP8_MAX[enc.fp8]) if enc.fp8 else np.float32((1 << (enc.bits - 1)) - 1)
            s = round_to_act((absmax / qmax).astype(np.float32), act)
            s4 = s[..., None]
            x = np.where(s4 > 0, g / s4, np.float32(0)).astype(np.float32)
            if enc.fp8:
                codes = f64_to_fp8(x.astype(np.float64), enc.fp8).reshape(E, N, K)
                return codes, f32_to_act_bits(s, act), None
            q = np.clip(np.rint(x), -qmax - 1, qmax)
    fields = q.reshape(E, N, K).astype(np.int64)
    return pack_fields(fields, enc.bits), f32_to_act_bits(s, act), zero_bits
