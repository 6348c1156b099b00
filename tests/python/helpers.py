"""Test helpers: raw bits <-> torch / NumPy objects, random test cases.

Test data are made as raw bits (reference.py works on bits), then viewed as the
framework's dtype, so no framework conversion sits between the data and the
reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

import reference as ref

try:
    import torch
except ImportError:  # pragma: no cover - torch is optional
    torch = None

try:
    import ml_dtypes
except ImportError:  # pragma: no cover
    ml_dtypes = None

import pytest

FRAMEWORKS = ("torch", "numpy")


def require_framework(fw: str, needs_ml_dtypes: bool = True):
    """Skips a test whose framework is not installed."""
    if fw == "torch" and torch is None:
        pytest.skip("torch is not installed")
    if fw == "numpy" and needs_ml_dtypes and ml_dtypes is None:
        pytest.skip("ml_dtypes is not installed (NumPy bfloat16/float8 dtypes)")

_BYTES = {"float16": 2, "bfloat16": 2, "uint8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}


def fp8_dtype_name(fmt: str) -> str:
    return {"e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2"}[fmt]


def np_dtype(name: str):
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def from_bits(bits, dtype_name: str, fw: str):
    """A torch tensor / NumPy array of dtype_name whose bytes are `bits`."""
    bits = np.ascontiguousarray(bits)
    if fw == "numpy":
        return bits.view(np_dtype(dtype_name))
    if _BYTES[dtype_name] == 2:
        t = torch.from_numpy(bits.astype(np.uint16).view(np.int16).copy())
    else:
        t = torch.from_numpy(bits.astype(np.uint8).copy())
    return t.view(getattr(torch, dtype_name))


def to_bits(x) -> np.ndarray:
    """Raw bits (uint16 for 2-byte dtypes, uint8 for 1-byte) of a tensor / array."""
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x)
        return x.view(np.uint16) if x.dtype.itemsize == 2 else x.view(np.uint8)
    x = x.detach().cpu().contiguous()
    if x.element_size() == 2:
        return x.view(torch.int16).numpy().view(np.uint16)
    return x.view(torch.uint8).numpy()


def dtype_name(x) -> str:
    return x.dtype.name if isinstance(x, np.ndarray) else str(x.dtype).removeprefix("torch.")


def from_f64(x, dtype_name: str, fw: str):
    """float64 -> framework object (float32, int32, ...) of the given plain dtype."""
    a = np.ascontiguousarray(np.asarray(x).astype(dtype_name))
    return a if fw == "numpy" else torch.from_numpy(a)


def output_f64(out, act: str) -> np.ndarray:
    assert dtype_name(out) == act, f"output dtype {dtype_name(out)} != activations dtype {act}"
    return ref.act_bits_to_f64(to_bits(out), act)


def random_act_bits(rng, shape, act: str) -> np.ndarray:
    """Activations ~ N(0, 1) as bits; never all zero."""
    x = rng.standard_normal(shape).astype(np.float32)
    return ref.f32_to_act_bits(x, act)


def random_counts(rng, E: int, max_per_expert: int, force_zero: bool = True) -> np.ndarray:
    counts = rng.integers(0, max_per_expert + 1, size=E)
    if force_zero and E >= 2:  # an expert with no tokens, and one with some
        idx = rng.permutation(E)
        counts[idx[0]] = 0
        counts[idx[1]] = max(counts[idx[1]], 1)
    return counts.astype(np.int64)


@dataclass
class Case:
    """Raw data of one grouped product and its float64 reference."""

    enc: ref.Encoding
    act: str
    E: int
    N: int
    K: int
    group_size: int
    counts: np.ndarray
    act_bits: np.ndarray
    w_raw: np.ndarray
    scale_bits: np.ndarray | None
    zero_bits: np.ndarray | None
    w_f64: np.ndarray = field(repr=False)

    @property
    def T(self) -> int:
        return int(self.counts.sum())

    def weights_dtype(self) -> str:
        if self.enc.bits == 16:
            return self.act
        if self.enc.fp8:
            return fp8_dtype_name(self.enc.fp8)
        return "uint8"

    def args(self, fw: str, counts_dtype: str = "int32"):
        """(activations, weights, num_tokens_per_expert, kwargs) for qmoe.moe_gemm_*."""
        a = from_bits(self.act_bits, self.act, fw)
        w = from_bits(self.w_raw, self.weights_dtype(), fw)
        c = from_f64(self.counts, counts_dtype, fw)
        kw = dict(self.enc.kwargs())
        kw["group_size"] = self.group_size
        if self.scale_bits is not None:
            kw["scales"] = from_bits(self.scale_bits, self.act, fw)
        if self.zero_bits is not None:
            kw["zeros"] = from_bits(self.zero_bits, self.act, fw)
        return a, w, c, kw

    def reference(self) -> np.ndarray:
        return ref.moe_ref(ref.act_bits_to_f64(self.act_bits, self.act), self.w_f64, self.counts)


def random_weights(rng, enc: ref.Encoding, act: str, E: int, N: int, K: int, group_size: int):
    """Random raw weights covering every code, scales and zeros; never all zero."""
    G = K // group_size
    scale_bits = zero_bits = None
    if enc.bits == 16:
        w_raw = ref.f32_to_act_bits(rng.standard_normal((E, N, K)).astype(np.float32) * 0.1, act)
    else:
        if enc.fp8:
            finite = ref.fp8_finite_codes(enc.fp8)
            w_raw = rng.choice(finite, size=(E, N, K)).astype(np.uint8)
            base = 1.0 / 448 if enc.fp8 == "e4m3" else 1e-4
        else:
            w_raw = rng.integers(0, 256, size=(E, N, K // enc.per_byte), dtype=np.uint8)
            base = 2.0 / enc.levels
        s = (base * rng.uniform(0.5, 1.5, size=(E, N, G))).astype(np.float32)
        scale_bits = ref.f32_to_act_bits(s, act)
        if enc.asym:
            z = rng.integers(0, enc.levels + 1, size=(E, N, G)).astype(np.float32)
            zero_bits = ref.f32_to_act_bits(z, act)
    w_f64 = ref.dequantize_ref(enc, act, w_raw, scale_bits, zero_bits, group_size)
    return w_raw, scale_bits, zero_bits, w_f64


def make_case(rng, enc: ref.Encoding, act: str, E: int, N: int, K: int, group_size: int,
              counts) -> Case:
    counts = np.asarray(counts, dtype=np.int64)
    w_raw, scale_bits, zero_bits, w_f64 = random_weights(rng, enc, act, E, N, K, group_size)
    act_bits = random_act_bits(rng, (int(counts.sum()), K), act)
    return Case(enc, act, E, N, K, group_size, counts, act_bits, w_raw, scale_bits, zero_bits,
                w_f64)


def check_output(out, case_or_ref, act: str, T: int, N: int, fw: str):
    """Type, shape, dtype, every element finite (outputs are poisoned with NaN),
    relative error within the DESIGN.md §5 bound."""
    expected_type = np.ndarray if fw == "numpy" else torch.Tensor
    assert isinstance(out, expected_type), f"got {type(out)}, want {expected_type}"
    assert tuple(out.shape) == (T, N), f"output shape {tuple(out.shape)} != {(T, N)}"
    got = output_f64(out, act)
    assert np.all(np.isfinite(got)), (
        f"{np.count_nonzero(~np.isfinite(got))} output elements not written or not finite"
    )
    expect = case_or_ref.reference() if isinstance(case_or_ref, Case) else case_or_ref
    if T == 0:
        return 0.0
    err = ref.rel_error(got, expect)
    assert err < ref.TOLERANCE[act], f"relative error {err:.3g} >= {ref.TOLERANCE[act]} ({act})"
    return err
