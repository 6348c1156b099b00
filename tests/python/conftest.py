"""Shared fixtures of the qmoe Python tests.

- ``rng``: a fresh np.random.Generator per test; its seed is printed (pytest shows
  it for failing tests). Set QMOE_TEST_SEED=<int> to replay one.
- every output qmoe allocates is filled with NaN before the kernel runs
  (``poison_outputs``, autouse), so an element the kernel did not write fails
  the finiteness check.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import qmoe
import qmoe._gemm


@pytest.fixture
def rng(request):
    env = os.environ.get("QMOE_TEST_SEED")
    seed = int(env) if env else int(np.random.SeedSequence().entropy % (1 << 63))
    print(f"\n[{request.node.nodeid}] QMOE_TEST_SEED={seed}")
    return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    original = qmoe._gemm._new_output

    def poisoned(fw, shape, dtype_name, like):
        out = original(fw, shape, dtype_name, like)
        if isinstance(out, np.ndarray):
            out[...] = np.nan
        else:
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(qmoe._gemm, "_new_output", poisoned)

