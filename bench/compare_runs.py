#!/usr/bin/env python3
"""Side-by-side tables of several benchmark runs of one call.

    python3 bench/compare_runs.py NAME=DIR [NAME=DIR ...] [--default ENC=NAME,...,*=NAME]
    python3 bench/compare_runs.py NAME=FILE.json [NAME=FILE.json ...]

Each DIR holds a decode.json written by `gpu_bench.py --phase decode` (for
example the QMOE_DECODE_PIPE variants of `scripts/gpu-check.sh variants`);
each FILE.json is a `prefill_bench.py --json` file (scripts/gpu-check.sh
ab-prefill). Rows are matched by label and encoding; every run's time and %
of its own floor are printed, then, for runs named VARIANT_rN, each variant's
time against the first, and for decode runs, per encoding, the range of %
floor of the default run (--default: which run is the library's default for
an encoding) over issue 3's row classes (>= 32 MB of active weights, 8-32 MB).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re


def load(path):
    """A run in the decode schema: a gpu_bench.py decode directory, or a
    prefill_bench.py JSON file (rows labelled "shape (path)")."""
    if os.path.isdir(path):
        with open(os.path.join(path, "decode.json")) as f:
            return json.load(f)
    with open(path) as f:
        d = json.load(f)
    return {"meta": {"card": d["card"], "date": "", "copy_bw_GBps": d["copy_bw"] / 1e9, "phase": "prefill",
                     "dense_TFLOPs": d["dense_rate"] / 1e12},
            "rows": [{"label": f"{r['shape']} ({r['path']})", "encoding": r["enc"], "qmoe_ms": r["us"] / 1e3,
                      "pct_floor": r["pct_floor"]} for r in d["rows"]]}


def variant_summary(names, rows):
    """Runs named VARIANT_rN (scripts/gpu-check.sh ab: a_r1, a_r2, k4_r1, ...;
    older calls: VARIANT + round digits): each variant's
    mean time a row against the first variant's, as a geometric mean over the
    rows both have, and the rows more than 1% faster or slower."""
    def variant(n):
        return re.sub(r"_r\d+$", "", n) if re.search(r"_r\d+$", n) else (re.sub(r"\d+$", "", n) or n)

    variants = []
    for n in names:
        if variant(n) not in variants:
            variants.append(variant(n))
    if len(variants) < 2:
        return
    def mean_time(per, v):
        ts = [r["qmoe_ms"] for n, r in per.items() if variant(n) == v and r.get("qmoe_ms")]
        return sum(ts) / len(ts) if ts else None
    base = variants[0]
    print()
    print(f"Variants against {base} (mean of each variant's rounds a row):")
    print()
    print("| variant | rows | time / " + base + " (geometric mean) | rows > 1% faster | rows > 1% slower |")
    print("|---|---:|---:|---:|---:|")
    for v in variants[1:]:
        ratios = []
        for per in rows.values():
            b, t = mean_time(per, base), mean_time(per, v)
            if b and t:
                ratios.append(t / b)
        if not ratios:
            continue
        g = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
        print(f"| {v} | {len(ratios)} | {g:.3f} | {sum(x < 0.99 for x in ratios)} | {sum(x > 1.01 for x in ratios)} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="NAME=DIR")
    ap.add_argument("--default", default="", help="ENC=NAME,...; '*' for the rest (default: the first run)")
    args = ap.parse_args()
    runs = []
    for r in args.runs:
        name, _, path = r.partition("=")
        if not path:
            raise SystemExit(f"expected NAME=DIR, got {r!r}")
        runs.append((name, load(path)))
    default = {"*": runs[0][0]}
    for item in filter(None, args.default.split(",")):
        enc, _, name = item.partition("=")
        if name not in [n for n, _ in runs]:
            raise SystemExit(f"--default names an unknown run {name!r}")
        default[enc] = name

    meta = runs[0][1]["meta"]
    prefill = meta.get("phase") == "prefill"
    rows = {}
    for name, data in runs:
        for r in data["rows"]:
            rows.setdefault((r["label"], r["encoding"]), {})[name] = r
    names = [n for n, _ in runs]
    if prefill:
        print(f"{meta['card']}; prefill_bench.py rows; device copy {meta['copy_bw_GBps']:.0f} GB/s, dense bf16 "
              f"{meta['dense_TFLOPs']:.0f} TFLOP/s (first run; each run measures its own anchors).")
    else:
        print(f"{meta['card']}, {meta['date']}; device copy {meta['copy_bw_GBps']:.0f} GB/s (bytes read + "
              f"written, each run measures its own); activations {meta['act']}, group size {meta['group_size']}.")
    print()
    extra = "" if prefill else " active MB | floor us |"
    print("| row | enc |" + extra + " " + " | ".join(f"{n} us | {n} % floor" for n in names) +
          ("" if prefill else " | default") + " |")
    print("|---|---|" + ("" if prefill else "---:|---:|") + "---:|---:|" * len(names) + ("" if prefill else "---|"))
    summary = {}
    for (label, enc), per in rows.items():
        first = next(iter(per.values()))
        cells = []
        for n in names:
            r = per.get(n)
            t = r and r.get("qmoe_ms")
            cells.append(f"{t * 1e3:.1f} | {r['pct_floor']:.1f}" if t else "- | -")
        if prefill:
            print(f"| {label} | {enc} | " + " | ".join(cells) + " |")
            continue
        dflt = default.get(enc, default["*"])
        print(f"| {label} | {enc} | {first['active_weight_MB']:.1f} | {first['floor_ms'] * 1e3:.1f} | " +
              " | ".join(cells) + f" | {dflt} |")
        d = per.get(dflt)
        if d and d.get("pct_floor"):
            mb = d["active_weight_MB"]
            cls = ">= 32 MB" if mb >= 32 else ("8-32 MB" if mb >= 8 else None)
            if cls:
                summary.setdefault((enc, cls), []).append(d["pct_floor"])
    variant_summary(names, rows)
    if prefill:
        return
    print()
    print("Default path, % of the floor (issue 3 targets: >= 80% on rows >= 32 MB, >= 60% on 8-32 MB):")
    print()
    print("| enc | rows | % floor (min-max) | rows at target |")
    print("|---|---|---|---|")
    for (enc, cls), v in sorted(summary.items()):
        target = 80 if cls == ">= 32 MB" else 60
        print(f"| {enc} | {cls} | {min(v):.0f}-{max(v):.0f} | {sum(x >= target for x in v)} of {len(v)} |")


if __name__ == "__main__":
    main()
