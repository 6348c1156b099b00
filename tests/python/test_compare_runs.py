"""bench/compare_runs.py on prefill_bench.py JSON files: the side-by-side table
and each variant's geometric-mean time against the first (the A/B summary of
scripts/gpu-check.sh ab-prefill)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def prefill_json(path, times):
    rows = [dict(shape=shape, enc=enc, path="auto", us=us, pct_floor=50.0 * 100.0 / us)
            for (shape, enc), us in times.items()]
    with open(path, "w") as f:
        json.dump(dict(card="Test GPU", copy_bw=4.0e12, dense_rate=8.0e14, switches={}, rows=rows), f)


def test_prefill_variants_against_the_first(tmp_path):
    base = {("ark 8x4096x4096 t252", "int8"): 100.0, ("mixtral w13 t4096x2", "int8"): 2000.0}
    runs = []
    for name, scale in (("a", 1.0), ("sw", 0.9)):
        for r in (1, 2):
            p = tmp_path / f"{name}_r{r}.json"
            prefill_json(p, {k: v * scale * (1.0 + 0.01 * r) for k, v in base.items()})
            runs.append(f"{name}_r{r}={p}")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compare_runs.py"), *runs],
                         check=True, capture_output=True, text=True).stdout
    assert "Test GPU" in out and "dense bf16 800 TFLOP/s" in out
    assert "| ark 8x4096x4096 t252 (auto) | int8 | 101.0 | 49.5 | 102.0 | 49.0 | 90.9 | 55.0 | 91.8 | 54.5 |" in out
    assert "| sw | 2 | 0.900 | 2 | 0 |" in out
    assert "Default path" not in out  # issue 3's decode summary is for decode runs only
