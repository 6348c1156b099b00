"""Every argument rule: one test each, checking the exception type and that the
message names the argument. Rules are ARK's (_validate_moe_quant_args) less
N % 16 == 0, plus qmoe's (DESIGN.md §2, §3)."""

import numpy as np
import pytest

import qmoe
import reference as ref
from helpers import FRAMEWORKS, from_bits, from_f64, make_case, require_framework, torch

E, N, K, GS = 2, 16, 64, 32
COUNTS = [3, 2]
ENTRIES = {
    "decode": qmoe.moe_gemm_decode,
    "prefill": qmoe.moe_gemm_prefill,
    "moe": qmoe.moe,
}


def valid(rng, fw, enc_name="int4", act="bfloat16", counts=COUNTS):
    """Valid arguments (activations, weights, counts, kwargs) to be broken one at a time."""
    require_framework(fw)
    case = make_case(rng, ref.ENCODINGS[enc_name], act, E, N, K, GS, counts)
    return case.args(fw)


def raises(exc, name, fn, *args, **kwargs):
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert name in msg, f"message {msg!r} does not name {name!r}"
    return msg


def like(x, values, dtype_name):
    """A new object of x's framework from float64 values."""
    return from_f64(values, dtype_name, "numpy" if isinstance(x, np.ndarray) else "torch")


def act_tensor(values, act, fw):
    """A float16 / bfloat16 object of framework fw holding `values`."""
    return from_bits(ref.f32_to_act_bits(np.asarray(values, np.float32), act), act, fw)


def retype(x, dtype_name):
    if isinstance(x, np.ndarray):
        return x.astype(dtype_name)
    return x.to(getattr(torch, dtype_name))


@pytest.fixture(params=FRAMEWORKS)
def fw(request):
    return request.param


@pytest.fixture(params=list(ENTRIES))
def entry(request):
    return ENTRIES[request.param]


# ------------------------------------------------------------------ object types


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], None, 3.0, "x"])
def test_activations_wrong_type(fw, entry, rng, bad):
    a, w, c, kw = valid(rng, fw)
    raises(TypeError, "activations", entry, bad, w, c, **kw)


def test_weights_wrong_type(fw, entry, rng):
    a, w, c, kw = valid(rng, fw)
    raises(TypeError, "weights", entry, a, w.tolist(), c, **kw)


def test_counts_wrong_type(fw, entry, rng):
    a, w, c, kw = valid(rng, fw)
    raises(TypeError, "num_tokens_per_expert", entry, a, w, list(COUNTS), **kw)


def test_scales_wrong_type(fw, entry, rng):
    a, w, c, kw = valid(rng, fw)
    kw["scales"] = kw["scales"].tolist()
    raises(TypeError, "scales", entry, a, w, c, **kw)


def test_zeros_wrong_type(fw, entry, rng):
    a, w, c, kw = valid(rng, fw, "int4_asym")
    kw["zeros"] = kw["zeros"].tolist()
    raises(TypeError, "zeros", entry, a, w, c, **kw)


def test_mixed_frameworks(entry, rng):
    require_framework("torch")
    a, w, c, kw = valid(rng, "torch")
    raises(TypeError, "weights", entry, a, w.numpy(), c, **kw)
    raises(TypeError, "num_tokens_per_expert", entry, a, w, c.numpy(), **kw)
    raises(TypeError, "activations", entry, a.view(torch.int16).numpy(), w, c, **kw)


# ------------------------------------------------------------------ activations


def test_activations_not_2d(fw, entry, rng):
    a, w, c, kw = valid(rng, fw)
    raises(ValueError, "activations", entry, a.reshape(1, 5, K), w, c, **kw)
    raises(ValueError, "activations", entry, a.reshape(-1), w, c, **kw)


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "uint8"])
def test_activations_dtype(fw, entry, rng, dtype):
    a, w, c, kw = valid(rng, fw)
    raises(ValueError, "activations", entry, like(a, np.ones((5, K)), dtype), w, c, **kw)


def test_activations_no_columns(fw, entry, rng):
    a, w, c, kw = valid(rng, fw, "w16")
    raises(ValueError, "activations", entry, a[:, :0], w[:, :, :0], c, **kw)


# ------------------------------------------------------------------ weights


def test_weights_not_3d(fw, entry, rng):
    a, w, c, kw = valid(rng, fw)
    raises(ValueError, "weights", entry, a, w.reshape(E * N, K // 2), c, **kw)


def test_weights_no_experts_or_rows(fw, entry, rng):
    a, w, c, kw = valid(rng, fw, "w16", counts=[5, 0])
    raises(ValueError, "weights", entry, a, w[:0], c[:0], weight_bits=16)
    raises(ValueError, "weights", entry, a, w[:, :0], c, weight_bits=16)


@pytest.mark.parametrize("bits", [3, 1, 32, 0, -4, "4", 4.0, None])
def test_unsupported_weight_bits(fw, entry, rng, bits):
    a, w, c, kw = valid(rng, fw)
    kw["weight_bits"] = bits
    raises(ValueError, "weight_bits", entry, a, w, c, **kw)


def test_n_not_multiple_of_16_is_accepted(fw, entry, rng):
    require_framework(fw)
    case = make_case(rng, ref.ENCODINGS["int4"], "float16", 2, 21, 64, 32, [2, 1])
    a, w, c, kw = case.args(fw)
    assert tuple(entry(a, w, c, **kw).shape) == (3, 21)


# ------------------------------------------------------------------ num_tokens_per_expert


def test_counts_wrong_length(fw, entry, rng):
    a, w, c, kw = valid(rng, fw)
    raises(ValueError, "num_tokens_per_expert", entry, a, w, like(c, [3, 2, 0], "int32"), **kw)


def test_counts_not_1d(fw, entry, rng):
    a, w, c, kw = valid(rng, fw)
    raises(ValueError, "num_tokens_per_expert", entry, a, w, c.reshape(1, E), **kw)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bool"])
def test_counts_float_dtype(fw, entry, rng, dtype):
    a, w, c, kw = valid(rng, fw)
    raises(ValueError, "num_tokens_per_expert", entry, a, w, retype(c, dtype), **kw)


@pytest.mark.parametrize("counts", [[3, 3], [1, 1], [0, 0], [6, -1]])
def test_counts_sum_must_match_on_cpu(fw, entry, rng, counts):
    a, w, c, kw = valid(rng, fw)
    raises(ValueError, "num_tokens_per_expert", entry, a, w, like(c, counts, "int64"), **kw)


# ------------------------------------------------------------------ 16-bit weights


def test_w16_dtype_must_match_activations(fw, entry, rng):
    a, w, c, kw = valid(rng, fw, "w16", act="bfloat16")
    raises(ValueError, "weights", entry, a, retype(w, "float16"), c, **kw)


def test_w16_k_packed_must_equal_k(fw, entry, rng):
    a, w, c, kw = valid(rng, fw, "w16")
    raises(ValueError, "weights", entry, a, w[:, :, : K // 2], c, **kw)


def test_w16_no_scales(fw, entry, rng):
    a, w, c, kw = valid(rng, fw, "w16")
    kw["scales"] = like(a, np.ones((E, N, K // GS)), "float32")
    raises(ValueError, "scales", entry, a, w, c, **kw)


def test_w16_no_zeros(fw, entry, rng):
    a, w, c, kw = valid(rng, fw, "w16")
    kw["zeros"] = like(a, np.ones((E, N, K // GS)), "float32")
    raises(ValueError, "zeros", entry, a, w, c, **kw)


def test_w16_no_asym(fw, entry, rng):
    a, w, c, kw = valid(rng, fw, "w16")
    kw["asym"] = True
    raises(ValueError, "asym", entry, a, w, c, **kw)


# ------------------------------------------------------------------ int8 / int4 / int2


@pytest.mark.parametrize("enc_name", ["int8", "int4", "int2"])
def test_int_weights_must_be_uint8(fw, entry, rng, enc_name):
    a, w, c, kw = valid(rng, fw, enc_name)
    raises(ValueError, "weights", entry, a, retype(w, "int8"), c, **kw)
    raises(ValueError, "weights", entry, a, retype(w, "float16"), c, **kw)


@pytest.mark.parametrize("enc_name,k", [("int4", 63), ("int2", 66), ("int2", 65)])
def test_k_divisible_by_codes_per_byte(fw, entry, rng, enc_name, k):
    a, w, c, kw = valid(rng, fw, enc_name)
    raises(ValueError, "K", entry, act_tensor(np.ones((5, k)), "bfloat16", fw), w, c, **kw)


@pytest.mark.parametrize("enc_name", ["int8", "int4", "int2"])
def test_k_packed(fw, entry, rng, enc_name):
    a, w, c, kw = valid(rng, fw, enc_name)
    raises(ValueError, "weights", entry, a, w[:, :, :-1], c, **kw)


@pytest.mark.parametrize("enc_name", ["int8", "int4_asym", "int2", "fp8_e4m3", "fp8_e5m2"])
def test_scales_required(fw, entry, rng, enc_name):
    a, w, c, kw = valid(rng, fw, enc_name)
    del kw["scales"]
    raises(ValueError, "scales", entry, a, w, c, **kw)


@pytest.mark.parametrize("enc_name", ["int4", "fp8_e4m3"])
def test_scales_dtype_must_match_activations(fw, entry, rng, enc_name):
    a, w, c, kw = valid(rng, fw, enc_name, act="bfloat16")
    for dtype in ("float16", "float32"):
        kw["scales"] = retype(kw["scales"], dtype)
        raises(ValueError, "scales", entry, a, w, c, **kw)


@pytest.mark.parametrize("enc_name", ["int4", "int8_asym", "fp8_e5m2"])
def test_scales_shape(fw, entry, rng, enc_name):
    a, w, c, kw = valid(rng, fw, enc_name)
    s = kw["scales"]
    for bad in (s[:, :, :1], s[:1], s[:, :-1], s.reshape(E, -1)):
        kw["scales"] = bad
        raises(ValueError, "scales", entry, a, w, c, **kw)


@pytest.mark.parametrize("enc_name", ["int8", "int4", "int2", "fp8_e4m3"])
def test_group_size_must_divide_k(fw, entry, rng, enc_name):
    a, w, c, kw = valid(rng, fw, enc_name)
    kw["group_size"] = 24
    raises(ValueError, "group_size", entry, a, w, c, **kw)


def test_group_size_even_for_int4(fw, entry, rng):
    a, w, c, kw = valid(rng, fw, "int4")
    kw["group_size"] = 1
    kw["scales"] = act_tensor(np.ones((E, N, K)), "bfloat16", fw)
    raises(ValueError, "group_size", entry, a, w, c, **kw)


@pytest.mark.parametrize("gs", [2, 6])
def test_group_size_multiple_of_4_for_int2(fw, entry, rng, gs):
    a, w, c, kw = valid(rng, fw, "int2")
    a2 = act_tensor(np.ones((5, 96)), "bfloat16", fw)
    w2 = from_bits(np.zeros((E, N, 96 // 4), np.uint8), "uint8", fw)
    kw["group_size"] = gs
    kw["scales"] = act_tensor(np.ones((E, N, 96 // gs)), "bfloat16", fw)
    raises(ValueError, "group_size", entry, a2, w2, c, **kw)


@pytest.mark.parametrize("gs", [0, -1, -32, 2.5, 32.0, "32", None, True])
def test_group_size_positive_int(fw, entry, rng, gs):
    a, w, c, kw = valid(rng, fw, "int8")
    kw["group_size"] = gs
    raises(ValueError, "group_size", entry, a, w, c, **kw)


def test_group_size_numpy_integer_accepted(fw, entry, rng):
    a, w, c, kw = valid(rng, fw, "int8")
    kw["group_size"] = np.int64(GS)
    assert tuple(entry(a, w, c, **kw).shape) == (sum(COUNTS), N)


@pytest.mark.parametrize("enc_name", ["int8_asym", "int4_asym", "int2_asym"])
def test_zeros_required_when_asym(fw, entry, rng, enc_name):
    a, w, c, kw = valid(rng, fw, enc_name)
    del kw["zeros"]
    raises(ValueError, "zeros", entry, a, w, c, **kw)


@pytest.mark.parametrize("enc_name", ["int8", "int4", "int2"])
def test_zeros_forbidden_when_sym(fw, entry, rng, enc_name):
    a, w, c, kw = valid(rng, fw, enc_name)
    kw["zeros"] = kw["scales"]
    raises(ValueError, "zeros", entry, a, w, c, **kw)


def test_zeros_dtype_and_shape(fw, entry, rng):
    a, w, c, kw = valid(rng, fw, "int4_asym", act="float16")
    z = kw["zeros"]
    for bad in (retype(z, "bfloat16"), retype(z, "float32"), z[:, :, :1], z[:1]):
        kw["zeros"] = bad
        raises(ValueError, "zeros", entry, a, w, c, **kw)


@pytest.mark.parametrize("asym", [2, "yes", None, 0.5])
def test_asym_must_be_bool(fw, entry, rng, asym):
    a, w, c, kw = valid(rng, fw, "int4")
    kw["asym"] = asym
    raises(ValueError, "asym", entry, a, w, c, **kw)


# ------------------------------------------------------------------ fp8


@pytest.mark.parametrize("enc_name", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_no_asym(fw, entry, rng, enc_name):
    a, w, c, kw = valid(rng, fw, enc_name)
    kw["asym"] = True
    raises(ValueError, "asym", entry, a, w, c, **kw)


@pytest.mark.parametrize("enc_name", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_k_packed_equals_k(fw, entry, rng, enc_name):
    a, w, c, kw = valid(rng, fw, enc_name)
    raises(ValueError, "weights", entry, a, w[:, :, : K // 2], c, **kw)


@pytest.mark.parametrize("enc_name", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_no_zeros(fw, entry, rng, enc_name):
    a, w, c, kw = valid(rng, fw, enc_name)
    kw["zeros"] = kw["scales"]
    raises(ValueError, "zeros", entry, a, w, c, **kw)


@pytest.mark.parametrize("bits", [16, 8, 4, 2, 3])
def test_fp8_dtype_overrides_weight_bits(fw, entry, rng, bits):
    a, w, c, kw = valid(rng, fw, "fp8_e4m3")
    kw["weight_bits"] = bits
    assert tuple(entry(a, w, c, **kw).shape) == (sum(COUNTS), N)


# ------------------------------------------------------------------ devices (torch)


def test_tensors_on_different_devices(entry, rng):
    require_framework("torch")
    a, w, c, kw = valid(rng, "torch")
    meta = torch.device("meta")
    raises(ValueError, "weights", entry, a, w.to(meta), c, **kw)
    raises(ValueError, "num_tokens_per_expert", entry, a, w, c.to(meta), **kw)
    raises(ValueError, "scales", entry, a, w, c, **{**kw, "scales": kw["scales"].to(meta)})
    # Activations on a device qmoe does not run on.
    raises(ValueError, "activations", entry, a.to(meta), w.to(meta), c.to(meta),
           **{**kw, "scales": kw["scales"].to(meta)})


def test_zeros_on_other_device(entry, rng):
    require_framework("torch")
    a, w, c, kw = valid(rng, "torch", "int4_asym")
    kw["zeros"] = kw["zeros"].to("meta")
    raises(ValueError, "zeros", entry, a, w, c, **kw)


# ------------------------------------------------------------------ moe's own arguments


@pytest.mark.parametrize("phase", ["Auto", "", "gemv", None, 1])
def test_phase(fw, rng, phase):
    a, w, c, kw = valid(rng, fw)
    raises(ValueError, "phase", qmoe.moe, a, w, c, phase=phase, **kw)


@pytest.mark.parametrize("threshold", [-1, 1.5, "4", None])
def test_decode_threshold(fw, rng, threshold):
    a, w, c, kw = valid(rng, fw)
    raises(ValueError, "decode_threshold", qmoe.moe, a, w, c, decode_threshold=threshold, **kw)


def test_keyword_only_arguments(fw, rng):
    a, w, c, kw = valid(rng, fw)
    with pytest.raises(TypeError):
        qmoe.moe_gemm_decode(a, w, c, kw["scales"])


# ------------------------------------------------------------------ moe_gemm [E, K, N]


def gemm_args(rng, fw, act="float16"):
    require_framework(fw)
    a = from_bits(ref.f32_to_act_bits(rng.standard_normal((5, K)).astype(np.float32), act), act, fw)
    w = from_bits(ref.f32_to_act_bits(rng.standard_normal((E, K, N)).astype(np.float32), act),
                  act, fw)
    s = from_bits(ref.f32_to_act_bits(np.ones((E, N), np.float32), act), act, fw)
    return a, w, from_f64(COUNTS, "int32", fw), s


def test_moe_gemm_types(fw, rng):
    a, w, c, s = gemm_args(rng, fw)
    raises(TypeError, "activations", qmoe.moe_gemm, a.tolist(), w, c)
    raises(TypeError, "weights", qmoe.moe_gemm, a, w.tolist(), c)
    raises(TypeError, "num_tokens_per_expert", qmoe.moe_gemm, a, w, [3, 2])
    raises(TypeError, "scales", qmoe.moe_gemm, a, w, c, scales=s.tolist())


def test_moe_gemm_weights_dtype(fw, rng):
    a, w, c, s = gemm_args(rng, fw)
    raises(ValueError, "weights", qmoe.moe_gemm, a, retype(w, "float32"), c)
    raises(ValueError, "weights", qmoe.moe_gemm, a, retype(w, "uint8"), c)


def test_moe_gemm_weights_shape(fw, rng):
    a, w, c, s = gemm_args(rng, fw)
    raises(ValueError, "weights", qmoe.moe_gemm, a, w[:, : K // 2], c)
    raises(ValueError, "weights", qmoe.moe_gemm, a, w[0], c)


def test_moe_gemm_scales(fw, rng):
    a, w, c, s = gemm_args(rng, fw)
    raises(ValueError, "scales", qmoe.moe_gemm, a, w, c, scales=s[:, :-1])
    raises(ValueError, "scales", qmoe.moe_gemm, a, w, c, scales=s.reshape(E, N, 1))
    raises(ValueError, "scales", qmoe.moe_gemm, a, w, c, scales=retype(s, "float32"))


def test_moe_gemm_counts(fw, rng):
    a, w, c, s = gemm_args(rng, fw)
    raises(ValueError, "num_tokens_per_expert", qmoe.moe_gemm, a, w, like(c, [5, 1], "int32"))
    raises(ValueError, "num_tokens_per_expert", qmoe.moe_gemm, a, w, like(c, [5], "int32"))
    raises(ValueError, "num_tokens_per_expert", qmoe.moe_gemm, a, w, retype(c, "float32"))


def test_moe_gemm_activations(fw, rng):
    a, w, c, s = gemm_args(rng, fw)
    raises(ValueError, "activations", qmoe.moe_gemm, retype(a, "float32"), w, c)
    raises(ValueError, "activations", qmoe.moe_gemm, a.reshape(-1), w, c)


# ------------------------------------------------------------------ quantize / dequantize


def test_quantize_arguments(fw, rng):
    require_framework(fw)
    w = from_f64(rng.standard_normal((2, 4, 64)), "float32", fw)
    raises(TypeError, "weights", qmoe.quantize, w.tolist())
    raises(ValueError, "weights", qmoe.quantize, w[0])
    raises(ValueError, "weights", qmoe.quantize, retype(w, "int32"))
    raises(ValueError, "weights", qmoe.quantize, w[:, :0])
    for bits in (3, 1, "4", None):
        raises(ValueError, "weight_bits", qmoe.quantize, w, weight_bits=bits)
    for gs in (0, -1, 2.5, None, 24):
        raises(ValueError, "group_size", qmoe.quantize, w, group_size=gs)
    raises(ValueError, "group_size", qmoe.quantize, w, group_size=1)  # int4: even
    raises(ValueError, "group_size", qmoe.quantize, w, weight_bits=2, group_size=2)
    for d in ("float32", "int8", 3, None):
        raises(ValueError, "dtype", qmoe.quantize, w, dtype=d)
    for f in ("e4m3fnuz", "E4M3", 8, ""):
        raises(ValueError, "fp8", qmoe.quantize, w, fp8=f)
    raises(ValueError, "asym", qmoe.quantize, w, fp8="e4m3", asym=True)
    raises(ValueError, "asym", qmoe.quantize, w, weight_bits=16, asym=True)
    raises(ValueError, "asym", qmoe.quantize, w, asym="no")


def test_dequantize_arguments(fw, rng):
    require_framework(fw)
    w = from_f64(rng.standard_normal((2, 4, 64)), "float32", fw)
    q, s, _ = qmoe.quantize(w, weight_bits=4, group_size=32)
    qa, sa, za = qmoe.quantize(w, weight_bits=4, group_size=32, asym=True)
    raises(TypeError, "qweights", qmoe.dequantize, q.tolist(), s)
    raises(TypeError, "scales", qmoe.dequantize, q, s.tolist(), group_size=32)
    raises(ValueError, "scales", qmoe.dequantize, q, None, group_size=32)
    raises(ValueError, "scales", qmoe.dequantize, q, s, group_size=16)
    raises(ValueError, "group_size", qmoe.dequantize, q, s, group_size=0)
    raises(ValueError, "group_size", qmoe.dequantize, q, s, group_size=24)
    raises(ValueError, "qweights", qmoe.dequantize, retype(q, "int8"), s, group_size=32)
    raises(ValueError, "qweights", qmoe.dequantize, q[0], s, group_size=32)
    raises(ValueError, "zeros", qmoe.dequantize, qa, sa, None, asym=True, group_size=32)
    raises(ValueError, "zeros", qmoe.dequantize, q, s, s, group_size=32)
    raises(ValueError, "zeros", qmoe.dequantize, qa, sa, za[:, :, :1], asym=True, group_size=32)
    raises(ValueError, "weight_bits", qmoe.dequantize, q, s, weight_bits=5)
    raises(ValueError, "scales", qmoe.dequantize, q, retype(s, "float32"), group_size=32)


# ------------------------------------------------------------------ exceptions from C++


def test_status_mapping_of_the_binding():
    from qmoe import _ext

    p = _ext.MoeGemmParams()  # E = 0
    with pytest.raises(ValueError, match="num_experts"):
        _ext.validate(p, _ext.Device(_ext.DeviceType.cpu))
    assert issubclass(qmoe.UnsupportedError, NotImplementedError)
    if not qmoe.built_with_cuda():
        p.num_experts, p.n, p.k, p.group_size = 1, 1, 128, 128
        p.weight_type = _ext.WeightType.native16
        p.weights = p.tokens_per_expert = 8  # never read: the call is refused first
        with pytest.raises(NotImplementedError, match="CUDA"):
            _ext.moe_gemm_decode(p, _ext.Device(_ext.DeviceType.cuda, 0, 0))
