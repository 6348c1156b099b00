"""Grouped products against the float64 reference: every encoding x activation
dtype x entry point x framework, odd shapes, and ARK's 16-bit moe_gemm."""

import threading

import numpy as np
import pytest

import qmoe
import reference as ref
from helpers import (
    FRAMEWORKS,
    check_output,
    from_bits,
    from_f64,
    make_case,
    output_f64,
    random_act_bits,
    random_counts,
    require_framework,
    torch,
)

ENC_NAMES = list(ref.ENCODINGS)


def run(entry: str, case, fw: str, **extra):
    a, w, c, kw = case.args(fw)
    kw.update(extra)
    if entry == "decode":
        return qmoe.moe_gemm_decode(a, w, c, **kw)
    if entry == "prefill":
        return qmoe.moe_gemm_prefill(a, w, c, **kw)
    if entry == "auto":
        return qmoe.moe(a, w, c, **kw)
    return qmoe.moe(a, w, c, phase=entry.removeprefix("moe_"), **kw)


def random_group_shape(rng, enc):
    group_size = int(rng.choice([32, 64, 128]))
    K = group_size * int(rng.integers(1, 4))
    N = int(rng.choice([16, 37, 64, 80]))
    return N, K, group_size


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("entry", ["decode", "prefill", "auto"])
@pytest.mark.parametrize("act", ref.ACTS)
@pytest.mark.parametrize("enc_name", ENC_NAMES)
def test_every_encoding(enc_name, act, entry, fw, rng):
    require_framework(fw)
    enc = ref.ENCODINGS[enc_name]
    N, K, gs = random_group_shape(rng, enc)
    E = int(rng.integers(2, 7))
    max_tokens = 3 if entry == "decode" else 24
    counts = random_counts(rng, E, max_tokens)
    case = make_case(rng, enc, act, E, N, K, gs, counts)
    out = run(entry, case, fw)
    check_output(out, case, act, case.T, N, fw)


# (E, N, K, group_size, counts): None counts are drawn at random.
ODD_SHAPES = {
    "zero_token_experts": (4, 32, 128, 64, [5, 0, 3, 0]),
    "T0": (3, 16, 128, 128, [0, 0, 0]),
    "T1": (3, 24, 128, 64, [0, 1, 0]),
    "N37": (2, 37, 256, 128, [4, 9]),
    "N1": (2, 1, 64, 32, [3, 2]),
    "K_eq_group": (3, 48, 128, 128, [2, 7, 1]),
    "E1": (1, 40, 256, 64, [11]),
    "E256": (256, 8, 32, 32, None),
    "small_group": (2, 20, 64, 4, [6, 2]),
}


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("act", ref.ACTS)
@pytest.mark.parametrize("enc_name", ENC_NAMES)
@pytest.mark.parametrize("shape", list(ODD_SHAPES))
def test_odd_shapes(shape, enc_name, act, fw, rng):
    require_framework(fw)
    enc = ref.ENCODINGS[enc_name]
    E, N, K, gs, counts = ODD_SHAPES[shape]
    if counts is None:
        counts = random_counts(rng, E, 2)
    case = make_case(rng, enc, act, E, N, K, gs, counts)
    for entry in ("decode", "prefill", "moe_decode", "moe_prefill", "auto"):
        out = run(entry, case, fw)
        check_output(out, case, act, case.T, N, fw)


@pytest.mark.parametrize("act", ref.ACTS)
@pytest.mark.parametrize("enc_name", ENC_NAMES)
def test_larger_shapes(enc_name, act, rng):
    """Shapes past the CPU kernels' blocking (several tiles of N, K and tokens)."""
    require_framework("torch")
    E, N, K, gs = 5, 257, 768, 128
    case = make_case(rng, ref.ENCODINGS[enc_name], act, E, N, K, gs, random_counts(rng, E, 96))
    for entry in ("decode", "prefill"):
        check_output(run(entry, case, "torch"), case, act, case.T, N, "torch")


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("threshold", [0, 1, 4, 1000])
def test_moe_phase_choice_gives_the_same_result(fw, threshold, rng):
    require_framework(fw)
    case = make_case(rng, ref.ENCODINGS["int4"], "bfloat16", 4, 32, 128, 64,
                     random_counts(rng, 4, 12))
    out = run("auto", case, fw, decode_threshold=threshold)
    check_output(out, case, "bfloat16", case.T, 32, fw)


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("counts_dtype", ["int64", "int16", "uint8", "int32"])
def test_counts_other_integer_dtypes(fw, counts_dtype, rng):
    require_framework(fw)
    case = make_case(rng, ref.ENCODINGS["int8"], "float16", 3, 16, 64, 32, [2, 0, 5])
    a, w, c, kw = case.args(fw, counts_dtype=counts_dtype)
    check_output(qmoe.moe(a, w, c, **kw), case, "float16", case.T, 16, fw)


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_non_contiguous_inputs(fw, rng):
    require_framework(fw)
    enc = ref.ENCODINGS["int4_asym"]
    case = make_case(rng, enc, "bfloat16", 3, 24, 128, 32, [3, 4, 0])
    a, w, c, kw = case.args(fw)

    def strided(x):
        # The same values in a non-contiguous view (a transposed copy transposed back).
        if isinstance(x, np.ndarray):
            y = np.ascontiguousarray(np.swapaxes(x, 0, -1))
            return np.swapaxes(y, 0, -1)
        return x.transpose(0, -1).contiguous().transpose(0, -1)

    a2, w2, c2 = strided(a), strided(w), c[::1]
    kw2 = {k: strided(v) if k in ("scales", "zeros") else v for k, v in kw.items()}
    if fw == "torch":
        assert not a2.is_contiguous() and not w2.is_contiguous()
        c2 = torch.stack([c, c], 1)[:, 0]  # strided counts
        assert not c2.is_contiguous()
    else:
        assert not a2.flags.c_contiguous and not w2.flags.c_contiguous
        c2 = np.stack([c, c], 1)[:, 0]
        assert not c2.flags.c_contiguous
    out = qmoe.moe_gemm_prefill(a2, w2, c2, **kw2)
    check_output(out, case, "bfloat16", case.T, 24, fw)


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_quantized_weights_from_qmoe_quantize(fw, rng):
    """The realistic path: float weights -> qmoe.quantize -> kernels."""
    require_framework(fw)
    E, N, K, gs, act = 4, 48, 256, 64, "bfloat16"
    w32 = rng.standard_normal((E, N, K)).astype(np.float32)
    counts = random_counts(rng, E, 6)
    act_bits = random_act_bits(rng, (int(counts.sum()), K), act)
    a = from_bits(act_bits, act, fw)
    c = from_f64(counts, "int32", fw)
    w_in = from_f64(w32, "float32", fw)
    for enc in ref.ENCODINGS.values():
        q, s, z = qmoe.quantize(w_in, group_size=gs, dtype=act, **enc.quantize_kwargs())
        deq = qmoe.dequantize(q, s, z, group_size=gs, **enc.kwargs())
        deq = np.asarray(deq, dtype=np.float64) if fw == "numpy" else deq.double().numpy()
        expect = ref.moe_ref(ref.act_bits_to_f64(act_bits, act), deq, counts)
        for entry in (qmoe.moe_gemm_decode, qmoe.moe_gemm_prefill, qmoe.moe):
            out = entry(a, q, c, scales=s, zeros=z, group_size=gs, **enc.kwargs())
            check_output(out, expect, act, int(counts.sum()), N, fw)


# ---------------------------------------------------------------- moe_gemm [E, K, N]


def moe_gemm_case(rng, act, E, K, N, counts, with_scales, fw):
    counts = np.asarray(counts, dtype=np.int64)
    T = int(counts.sum())
    a_bits = random_act_bits(rng, (T, K), act)
    w_bits = ref.f32_to_act_bits(rng.standard_normal((E, K, N)).astype(np.float32) * 0.1, act)
    s_bits = (ref.f32_to_act_bits(rng.uniform(0.5, 2.0, (E, N)).astype(np.float32), act)
              if with_scales else None)
    expect = ref.moe_gemm_ref(ref.act_bits_to_f64(a_bits, act), ref.act_bits_to_f64(w_bits, act),
                              counts, None if s_bits is None else ref.act_bits_to_f64(s_bits, act))
    args = (from_bits(a_bits, act, fw), from_bits(w_bits, act, fw), from_f64(counts, "int32", fw))
    kw = {"scales": from_bits(s_bits, act, fw)} if with_scales else {}
    return args, kw, expect, T


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("with_scales", [False, True])
@pytest.mark.parametrize("act", ref.ACTS)
@pytest.mark.parametrize("shape", [(3, 64, 37, None), (1, 128, 16, [9]), (4, 32, 8, [0, 0, 0, 0]),
                                   (2, 48, 24, [0, 1]), (256, 16, 8, "random"),
                                   # CUDA sm_90: the wgmma kernel's [E, K, N] variant (N % 8 == 0,
                                   # K % 32 == 0): k tail of a 64-wide tile, two n tiles, >128 tokens
                                   (3, 288, 264, [70, 0, 200])])
def test_moe_gemm_ekn(shape, act, with_scales, fw, rng):
    require_framework(fw)
    E, K, N, counts = shape
    if counts is None:
        counts = random_counts(rng, E, 20)
    elif counts == "random":
        counts = random_counts(rng, E, 2)
    args, kw, expect, T = moe_gemm_case(rng, act, E, K, N, counts, with_scales, fw)
    out = qmoe.moe_gemm(*args, **kw)
    check_output(out, expect, act, T, N, fw)


# ---------------------------------------------------------------- package-level behaviour


def test_threads_setting_and_concurrent_calls(rng):
    require_framework("numpy")
    before = qmoe.num_threads()
    assert before >= 1
    try:
        qmoe.set_num_threads(1)
        assert qmoe.num_threads() == 1
        case = make_case(rng, ref.ENCODINGS["int4"], "float16", 4, 64, 256, 128,
                         random_counts(rng, 4, 30))
        check_output(run("prefill", case, "numpy"), case, "float16", case.T, 64, "numpy")
    finally:
        qmoe.set_num_threads(0)  # back to the default
    assert qmoe.num_threads() >= 1

    # Several Python threads at once (the GIL is released during the kernels).
    cases = [make_case(rng, ref.ENCODINGS["int8_asym"], "bfloat16", 3, 32, 128, 64,
                       random_counts(rng, 3, 16)) for _ in range(4)]
    results = [None] * len(cases)

    def work(i):
        results[i] = [run("auto", cases[i], "numpy") for _ in range(3)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for case, outs in zip(cases, results):
        for out in outs:
            check_output(out, case, "bfloat16", case.T, 32, "numpy")
        np.testing.assert_array_equal(output_f64(outs[0], "bfloat16"),
                                      output_f64(outs[1], "bfloat16"))


@pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype")
def test_cuda_tensors(rng):
    """A smoke check of CUDA tensors through the Python layer: the current stream,
    outputs on the device, and no host synchronisation (torch's sync debug mode
    raises on one). The CUDA suite proper lives in tests/python/test_cuda_*.py."""
    if torch is None or not torch.cuda.is_available():
        pytest.skip("needs torch with a CUDA device (torch.cuda.is_available() is False)")
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    case = make_case(rng, ref.ENCODINGS["int4_asym"], "bfloat16", 4, 64, 256, 128,
                     random_counts(rng, 4, 8))
    a, w, c, kw = case.args("torch", counts_dtype="int64")
    a, w, c = a.to(dev), w.to(dev), c.to(dev)
    kw = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    if not qmoe.built_with_cuda():
        with pytest.raises(NotImplementedError, match="CUDA"):
            qmoe.moe(a, w, c, **kw)
        return
    (ga, gw, gc), gkw, gexpect, gT = moe_gemm_case(rng, "float16", 3, 128, 40, [5, 0, 2], True,
                                                   "torch")
    ga, gw, gc, gs = ga.to(dev), gw.to(dev), gc.to(dev), gkw["scales"].to(dev)
    stream = torch.cuda.Stream(dev)
    outs = []
    torch.cuda.synchronize(dev)
    with torch.cuda.device(dev), torch.cuda.stream(stream):
        torch.cuda.set_sync_debug_mode("error")
        try:
            outs.append(qmoe.moe(a, w, c, **kw))
            outs.append(qmoe.moe(a, w, c, phase="decode", **kw))
            outs.append(qmoe.moe_gemm_prefill(a, w, c, **kw))
            gemm_out = qmoe.moe_gemm(ga, gw, gc, scales=gs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    stream.synchronize()
    for out in outs:
        assert out.device == dev
        check_output(out, case, "bfloat16", case.T, 64, "torch")
    assert gemm_out.device == dev
    check_output(gemm_out, gexpect, "float16", gT, 40, "torch")
