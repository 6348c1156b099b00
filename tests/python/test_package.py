"""The package as installed: exports, version, and that torch and ml_dtypes are optional."""

import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

import qmoe

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_exports():
    for name in ("moe_gemm_decode", "moe_gemm_prefill", "moe", "moe_gemm", "quantize",
                 "dequantize", "set_num_threads", "num_threads", "built_with_cuda",
                 "UnsupportedError"):
        assert name in qmoe.__all__ and callable(getattr(qmoe, name)), name
    assert isinstance(qmoe.built_with_cuda(), bool)
    assert isinstance(qmoe.num_threads(), int) and qmoe.num_threads() >= 1


def test_version_is_the_cmake_project_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+", qmoe.__version__)
    cmake = REPO / "CMakeLists.txt"
    if not cmake.exists():
        pytest.skip("not run from the source tree")
    m = re.search(r"project\(qmoe\s+VERSION\s+([0-9.]+)", cmake.read_text())
    assert m and m.group(1) == qmoe.__version__


def test_ark_signatures():
    import inspect

    common = ["activations", "weights", "num_tokens_per_expert", "scales", "zeros",
              "weight_bits", "group_size", "asym"]
    defaults = {"scales": None, "zeros": None, "weight_bits": 4, "group_size": 128,
                "asym": False, "phase": "auto", "decode_threshold": 4}
    for f, extra in ((qmoe.moe_gemm_decode, []), (qmoe.moe_gemm_prefill, []),
                     (qmoe.moe, ["phase", "decode_threshold"])):
        params = inspect.signature(f).parameters
        assert list(params) == common + extra, f.__name__
        for name in common[3:] + extra:
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
            assert params[name].default == defaults[name], (f.__name__, name)
    params = inspect.signature(qmoe.moe_gemm).parameters
    assert list(params) == ["activations", "weights", "num_tokens_per_expert", "scales"]
    assert params["scales"].kind is inspect.Parameter.KEYWORD_ONLY


def run_python(code: str):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_works_with_numpy_only():
    """torch and ml_dtypes blocked (import raises ImportError): float16 NumPy works,
    and importing qmoe imports neither."""
    out = run_python("""
        import sys
        sys.modules["torch"] = None
        sys.modules["ml_dtypes"] = None
        import numpy as np
        import qmoe
        rng = np.random.default_rng()
        w = rng.standard_normal((2, 8, 64)).astype(np.float32)
        q, s, z = qmoe.quantize(w, weight_bits=8, group_size=32, dtype="float16")
        a = rng.standard_normal((3, 64)).astype(np.float16)
        out = qmoe.moe(a, q, np.array([1, 2]), scales=s, weight_bits=8, group_size=32)
        deq = qmoe.dequantize(q, s, weight_bits=8, group_size=32)
        ref = np.concatenate([a[:1].astype(np.float64) @ deq[0].T,
                              a[1:].astype(np.float64) @ deq[1].T])
        err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        assert out.dtype == np.float16 and err < 2e-3, err
        try:
            qmoe.quantize(w, group_size=32)  # bfloat16 scales need ml_dtypes
        except ModuleNotFoundError as e:
            assert "ml_dtypes" in str(e)
        else:
            raise AssertionError("expected ModuleNotFoundError")
        print("ok")
    """)
    assert out.strip() == "ok"


def test_import_does_not_import_torch():
    out = run_python("""
        import sys
        import qmoe
        print("torch" in sys.modules)
    """)
    assert out.strip() == "False"
