"""The reference itself, checked against other implementations (ml_dtypes, torch)
and against hand-computed layout examples, so that the oracle is trusted."""

import numpy as np
import pytest

import reference as ref
from helpers import ml_dtypes, torch


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_decode_matches_ml_dtypes_and_torch(fmt):
    codes = np.arange(256, dtype=np.uint8)
    mine = ref.fp8_to_f64(codes, fmt)
    name = {"e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2"}[fmt]
    others = []
    if ml_dtypes is not None:
        others.append(codes.view(getattr(ml_dtypes, name)).astype(np.float64))
    if torch is not None:
        others.append(torch.from_numpy(codes).view(getattr(torch, name)).double().numpy())
    if not others:
        pytest.skip("neither ml_dtypes nor torch is installed")
    for other in others:
        np.testing.assert_array_equal(np.isnan(mine), np.isnan(other))
        ok = ~np.isnan(mine)
        np.testing.assert_array_equal(mine[ok], other[ok])
        np.testing.assert_array_equal(np.signbit(mine[ok]), np.signbit(other[ok]))
    assert np.nanmax(np.where(np.isinf(mine), np.nan, mine)) == ref.FP8_MAX[fmt]


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_encode_round_trip_and_rne(fmt, rng):
    finite = ref.fp8_finite_codes(fmt)
    # Every finite value encodes to its own code (0x80, -0, included).
    np.testing.assert_array_equal(ref.f64_to_fp8(ref.fp8_to_f64(finite, fmt), fmt), finite)
    # Random in-range values agree with an RNE cast from another implementation.
    x = (rng.standard_normal(20000) * rng.choice([1e-3, 1.0, 30.0, ref.FP8_MAX[fmt] / 4], 20000))
    x = np.clip(x, -ref.FP8_MAX[fmt], ref.FP8_MAX[fmt]).astype(np.float32)
    mine = ref.f64_to_fp8(x.astype(np.float64), fmt)
    name = {"e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2"}[fmt]
    if torch is not None:
        other = torch.from_numpy(x).to(getattr(torch, name)).view(torch.uint8).numpy()
    elif ml_dtypes is not None:
        other = x.astype(getattr(ml_dtypes, name)).view(np.uint8)
    else:
        pytest.skip("neither ml_dtypes nor torch is installed")
    # -0 vs +0 may differ between implementations; compare values, then signs of nonzeros.
    np.testing.assert_array_equal(ref.fp8_to_f64(mine, fmt), ref.fp8_to_f64(other, fmt))
    # Saturation: far beyond the range gives +-max, not inf or NaN.
    big = ref.f64_to_fp8(np.array([1e9, -1e9, ref.FP8_MAX[fmt] * 1.2]), fmt)
    np.testing.assert_array_equal(ref.fp8_to_f64(big, fmt),
                                  [ref.FP8_MAX[fmt], -ref.FP8_MAX[fmt], ref.FP8_MAX[fmt]])


def test_fp8_ties_go_to_even_code():
    # e4m3: 1.0 = 0x38, 1.125 = 0x39; halfway 1.0625 -> 0x38 (even). 1.1875 is halfway
    # between 0x39 and 0x3a = 1.25 -> 0x3a.
    got = ref.f64_to_fp8(np.array([1.0625, 1.1875, -1.0625]), "e4m3")
    np.testing.assert_array_equal(got, [0x38, 0x3A, 0xB8])


def test_bf16_rounding_matches_torch_and_ml_dtypes(rng):
    x = (rng.standard_normal(50000) * np.exp(rng.uniform(-30, 30, 50000))).astype(np.float32)
    # Exact ties: low 16 bits 0x8000.
    ties = ((rng.integers(0x3F800000, 0x40800000, 1000, dtype=np.uint32) & 0xFFFF0000) | 0x8000)
    x = np.concatenate([x, ties.view(np.float32), [0.0, -0.0]]).astype(np.float32)
    mine = ref.f32_to_bf16_bits(x)
    if torch is not None:
        other = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    elif ml_dtypes is not None:
        other = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    else:
        pytest.skip("neither ml_dtypes nor torch is installed")
    np.testing.assert_array_equal(mine, other)


def test_int_unpacking_follows_the_layout_table():
    # int4: byte 0x2F -> k=0 low nibble 0xF (-1 sym, 15 asym), k=1 high nibble 2.
    f4 = ref.unpack_fields(np.array([[0x2F, 0x80]], dtype=np.uint8), 4)
    np.testing.assert_array_equal(f4, [[15, 2, 0, 8]])
    np.testing.assert_array_equal(ref.int_values(f4, 4, asym=False), [[-1, 2, 0, -8]])
    np.testing.assert_array_equal(ref.int_values(f4, 4, asym=True), [[15, 2, 0, 8]])
    # int2: byte 0b11_10_01_00 -> k = 0..3 hold 0, 1, 2, 3 -> sym 0, 1, -2, -1.
    f2 = ref.unpack_fields(np.array([0b11100100], dtype=np.uint8), 2)
    np.testing.assert_array_equal(f2, [0, 1, 2, 3])
    np.testing.assert_array_equal(ref.int_values(f2, 2, asym=False), [0, 1, -2, -1])
    # int8: byte reinterpreted as int8.
    np.testing.assert_array_equal(
        ref.int_values(ref.unpack_fields(np.array([0, 127, 128, 255], np.uint8), 8), 8, False),
        [0, 127, -128, -1])
    # pack is the inverse of unpack.
    for bits in (8, 4, 2):
        b = np.arange(256, dtype=np.uint8).reshape(4, 64)
        np.testing.assert_array_equal(ref.pack_fields(ref.unpack_fields(b, bits), bits), b)


def test_dequantize_ref_groups():
    enc = ref.ENCODINGS["int4_asym"]
    # One row, K = 4, group_size 2: codes 1,2 | 3,4, zeros 1 | 2, scales 0.5 | 2.
    w = ref.pack_fields(np.array([[[1, 2, 3, 4]]]), 4)
    s = ref.f32_to_bf16_bits(np.array([[[0.5, 2.0]]], np.float32))
    z = ref.f32_to_bf16_bits(np.array([[[1.0, 2.0]]], np.float32))
    got = ref.dequantize_ref(enc, "bfloat16", w, s, z, group_size=2)
    np.testing.assert_array_equal(got, [[[0.0, 0.5, 2.0, 4.0]]])
