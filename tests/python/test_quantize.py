"""qmoe.quantize / qmoe.dequantize: bit-exact against the independent NumPy
quantizer of reference.py (the rules of include/qmoe/quantize.h), exact
dequantization, error bounds, ties, degenerate groups, frameworks and dtypes."""

import numpy as np
import pytest

import qmoe
import reference as ref
from helpers import (
    FRAMEWORKS,
    dtype_name,
    fp8_dtype_name,
    from_bits,
    from_f64,
    np_dtype,
    require_framework,
    to_bits,
    torch,
)

ENC_NAMES = list(ref.ENCODINGS)


def as_f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64) if isinstance(x, np.ndarray) else x.double().numpy()


def quantize_both(w32, enc, act, gs, fw):
    """(qmoe's bits, reference bits) for weights w32."""
    q, s, z = qmoe.quantize(from_f64(w32, "float32", fw), group_size=gs, dtype=act,
                            **enc.quantize_kwargs())
    want_q, want_s, want_z = ref.quantize_ref(w32, enc, act, gs)
    return (q, s, z), (want_q, want_s, want_z)


def assert_same_bits(got, want, what):
    got = to_bits(got)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    bad = np.flatnonzero(got.ravel() != want.ravel())
    assert bad.size == 0, (
        f"{what}: {bad.size} of {got.size} differ; first at flat index {bad[0]}: "
        f"got {got.ravel()[bad[0]]:#x}, want {want.ravel()[bad[0]]:#x}"
    )


def random_weights(rng, shape, one_sign_rows=True):
    """Normal weights with per-row magnitudes spread over a few decades; with
    one_sign_rows, some rows shifted so that their groups are of one sign."""
    E, N, K = shape
    w = rng.standard_normal(shape) * np.exp(rng.uniform(-3, 2, (E, N, 1)))
    if one_sign_rows:
        shift = rng.choice([0.0, 0.0, 3.0, -3.0], (E, N, 1))
        w += shift * np.abs(w).max(axis=-1, keepdims=True)
    return w.astype(np.float32)


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("act", ref.ACTS)
@pytest.mark.parametrize("enc_name", ENC_NAMES)
def test_bit_exact_against_reference(enc_name, act, fw, rng):
    require_framework(fw)
    enc = ref.ENCODINGS[enc_name]
    gs = int(rng.choice([4, 32, 128]))
    E, N, K = int(rng.integers(1, 4)), int(rng.integers(1, 40)), gs * int(rng.integers(1, 4))
    w32 = random_weights(rng, (E, N, K))
    (q, s, z), (want_q, want_s, want_z) = quantize_both(w32, enc, act, gs, fw)

    # Types, dtypes and shapes of the ARK layout.
    kind = np.ndarray if fw == "numpy" else torch.Tensor
    assert isinstance(q, kind)
    q_dtype = act if enc.bits == 16 else (fp8_dtype_name(enc.fp8) if enc.fp8 else "uint8")
    assert dtype_name(q) == q_dtype
    assert tuple(q.shape) == (E, N, K // enc.per_byte if enc.is_int else K)
    assert_same_bits(q, want_q, "qweights")
    if enc.scaled:
        assert dtype_name(s) == act and tuple(s.shape) == (E, N, K // gs)
        assert_same_bits(s, want_s, "scales")
    else:
        assert s is None
    if enc.asym:
        assert dtype_name(z) == act and tuple(z.shape) == (E, N, K // gs)
        assert_same_bits(z, want_z, "zeros")
    else:
        assert z is None

    # dequantize gives exactly the reference decoding of those bits, as float32.
    deq = qmoe.dequantize(q, s, z, group_size=gs, **enc.kwargs())
    assert isinstance(deq, kind) and dtype_name(deq) == "float32"
    assert tuple(deq.shape) == (E, N, K)
    expect = ref.dequantize_ref(enc, act, want_q, want_s, want_z, gs)
    np.testing.assert_array_equal(as_f64(deq), expect)


@pytest.mark.parametrize("act", ref.ACTS)
@pytest.mark.parametrize("enc_name", ENC_NAMES)
def test_error_bounds(enc_name, act, rng):
    require_framework("numpy")
    enc = ref.ENCODINGS[enc_name]
    gs, E, N, K = 64, 2, 16, 256
    # Groups of mixed sign (see test_asym_one_sign_groups for the others).
    w32 = random_weights(rng, (E, N, K), one_sign_rows=False)
    q, s, z = qmoe.quantize(w32, group_size=gs, dtype=act, **enc.quantize_kwargs())
    deq = qmoe.dequantize(q, s, z, group_size=gs, **enc.kwargs()).astype(np.float64)
    w = w32.astype(np.float64)
    err = np.abs(w - deq)
    if enc.bits == 16:
        # Round to nearest in the activation dtype: half an ulp, relative (float16
        # subnormals: half of 2^-24, absolute).
        rel, tiny = (2.0 ** -11, 2.0 ** -25) if act == "float16" else (2.0 ** -8, 0.0)
        assert np.all(err <= rel * np.abs(w) + tiny), (err - rel * np.abs(w)).max()
        return
    s64 = ref.expand_groups(np.asarray(s, dtype=np.float64), gs)
    if enc.fp8:
        man = 3 if enc.fp8 == "e4m3" else 2
        bias = 7 if enc.fp8 == "e4m3" else 15
        # Half a quantum of w / s, whose quantum is 2^(e - man) for normals and
        # 2^(1 - bias - man) for subnormals; in range (|w| / s <= max).
        x = np.abs(w / s64)
        inside = x <= ref.FP8_MAX[enc.fp8]
        e = np.maximum(np.floor(np.log2(np.maximum(x, 1e-300))), 1 - bias)
        bound = 0.5 * np.exp2(e - man) * s64 * (1 + 1e-6)
        assert np.all(err[inside] <= bound[inside]), (err - bound)[inside].max()
        return
    levels = enc.levels
    if enc.asym:
        zz = ref.expand_groups(np.asarray(z, dtype=np.float64), gs)
        lo, hi = (0 - zz) * s64, (levels - zz) * s64
    else:
        lo, hi = -(levels + 1) / 2 * s64, (levels - 1) / 2 * s64
    inside = (w >= lo) & (w <= hi)
    assert inside.mean() > 0.9  # the bound below covers most elements
    bound = s64 / 2 * (1 + 1e-6) + np.abs(w) * 2.0 ** -23
    assert np.all(err[inside] <= bound[inside]), (err - bound)[inside].max()
    # Outside the range the code is clamped to the nearest end of it.
    assert np.all(np.abs(deq[~inside]) <= np.maximum(np.abs(lo), np.abs(hi))[~inside] + 1e-12)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_asym_one_sign_groups(bits):
    require_framework("numpy")
    w = np.linspace(1.0, 2.0, 16, dtype=np.float32)[None, None]
    q, s, z = qmoe.quantize(w, weight_bits=bits, asym=True, group_size=16, dtype="float16")
    deq = qmoe.dequantize(q, s, z, weight_bits=bits, asym=True, group_size=16)
    err = np.abs(deq - w).max()
    # Any range-covering asym quantizer keeps the error under one step of 2 / levels.
    assert err <= 2.0 / ((1 << bits) - 1), err


@pytest.mark.parametrize("act", ref.ACTS)
def test_ties_round_half_to_even(act):
    require_framework("numpy")
    # int4 sym, one group of 8: absmax 7 -> scale 1 exactly; x.5 ties go to even.
    w = np.array([[[7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5]]], np.float32)
    q, s, _ = qmoe.quantize(w, weight_bits=4, group_size=8, dtype=act)
    got = qmoe.dequantize(q, s, weight_bits=4, group_size=8)
    np.testing.assert_array_equal(got, [[[7, 0, 2, 2, -0, -2, -2, 4]]])
    # fp8 e4m3: absmax 448 -> scale 1; 1.0625 is halfway between 1.0 (0x38) and 1.125.
    w8 = np.array([[[448.0, 1.0625, 1.1875, -1.0625]]], np.float32)
    q8, s8, _ = qmoe.quantize(w8, fp8="e4m3", group_size=4, dtype=act)
    np.testing.assert_array_equal(to_bits(q8), [[[0x7E, 0x38, 0x3A, 0xB8]]])
    for enc_name in ENC_NAMES:
        enc = ref.ENCODINGS[enc_name]
        for x in (w, w8):
            K = x.shape[-1]
            if enc.bits == 2 and K % 4:
                continue
            qq, ss, zz = qmoe.quantize(x, group_size=K, dtype=act, **enc.quantize_kwargs())
            want = ref.quantize_ref(x, enc, act, K)
            assert_same_bits(qq, want[0], f"{enc_name} qweights")


@pytest.mark.parametrize("act", ref.ACTS)
@pytest.mark.parametrize("enc_name", ENC_NAMES)
def test_degenerate_groups(enc_name, act):
    """All-zero groups, constant groups, one-sign groups, group_size 4."""
    require_framework("numpy")
    enc = ref.ENCODINGS[enc_name]
    rows = [np.zeros(8), np.full(8, 0.75), np.full(8, -2.0), np.linspace(1, 2, 8),
            np.linspace(-3, -1, 8), np.array([0, 0, 0, 5, 0, 0, -5, 0.0])]
    w = np.stack(rows)[None].astype(np.float32)  # [1, 6, 8]
    q, s, z = qmoe.quantize(w, group_size=4, dtype=act, **enc.quantize_kwargs())
    want = ref.quantize_ref(w, enc, act, 4)
    assert_same_bits(q, want[0], "qweights")
    if enc.scaled:
        assert_same_bits(s, want[1], "scales")
    if enc.asym:
        assert_same_bits(z, want[2], "zeros")
    deq = qmoe.dequantize(q, s, z, group_size=4, **enc.kwargs())
    assert np.all(np.isfinite(deq))
    np.testing.assert_array_equal(deq[0, 0], 0.0)  # zeros stay zeros
    if enc.bits == 16:
        np.testing.assert_allclose(deq[0, 1], ref.round_to_act(np.full(8, 0.75), act), rtol=0)
    elif enc.asym:
        # The range [0, 0.75] holds the constant: it lands within half a step
        # (plus the scale's 16-bit rounding times the number of levels).
        step = ref.act_bits_to_f64(to_bits(s), act)[0, 1, 0]
        slack = step * (0.5 + enc.levels * (2.0 ** -11 if act == "float16" else 2.0 ** -8))
        assert np.all(np.abs(deq[0, 1] - 0.75) <= slack)


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_dtype_spellings(fw, rng):
    require_framework(fw)
    w32 = rng.standard_normal((2, 8, 64)).astype(np.float32)
    w = from_f64(w32, "float32", fw)
    ref_bits = to_bits(qmoe.quantize(w, group_size=32, dtype="bfloat16")[1])
    spellings = ["bfloat16", "bf16"]
    if torch is not None:
        spellings.append(torch.bfloat16)
    if fw == "numpy":
        spellings.append(np_dtype("bfloat16"))
    for d in spellings:
        s = qmoe.quantize(w, group_size=32, dtype=d)[1]
        assert dtype_name(s) == "bfloat16"
        np.testing.assert_array_equal(to_bits(s), ref_bits)
    for d in ["float16", "half", np.float16] + ([torch.float16] if torch is not None else []):
        assert dtype_name(qmoe.quantize(w, group_size=32, dtype=d)[1]) == "float16"
    # Default dtype is bfloat16 and the default encoding int4 sym, group 128.
    q, s, z = qmoe.quantize(from_f64(rng.standard_normal((1, 4, 256)), "float32", fw))
    assert dtype_name(q) == "uint8" and tuple(q.shape) == (1, 4, 128)
    assert dtype_name(s) == "bfloat16" and tuple(s.shape) == (1, 4, 2) and z is None


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_other_float_inputs_are_converted(fw, rng):
    require_framework(fw)
    w64 = rng.standard_normal((1, 4, 32))
    a = qmoe.quantize(from_f64(w64, "float64", fw), weight_bits=8, group_size=32)
    b = qmoe.quantize(from_f64(w64.astype(np.float32), "float32", fw), weight_bits=8,
                      group_size=32)
    for x, y in zip(a[:2], b[:2]):
        np.testing.assert_array_equal(to_bits(x), to_bits(y))
    # Non-contiguous input.
    wt = from_f64(np.swapaxes(w64, 1, 2).astype(np.float32), "float32", fw)
    wt = wt.transpose(1, 2) if fw == "torch" else np.swapaxes(wt, 1, 2)
    c = qmoe.quantize(wt, weight_bits=8, group_size=32)
    np.testing.assert_array_equal(to_bits(c[0]), to_bits(b[0]))


def test_bf16_input_weights(rng):
    require_framework("numpy")
    bits = ref.f32_to_bf16_bits(rng.standard_normal((2, 4, 32)).astype(np.float32))
    w = from_bits(bits, "bfloat16", "numpy")
    q16, s, z = qmoe.quantize(w, weight_bits=16, dtype="bfloat16")
    # bfloat16 -> float32 -> bfloat16 is exact.
    np.testing.assert_array_equal(to_bits(q16), bits)
    assert s is None and z is None
