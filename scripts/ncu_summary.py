#!/usr/bin/env python3
"""Summary of one ncu report for the log: stall reasons and the SASS lines
with the most stall samples.

    python3 scripts/ncu_summary.py REPORT.ncu-rep [--top 40]
"""
import argparse
import csv
import io
import re
import subprocess
from collections import defaultdict


def ncu(*args):
    return subprocess.run(["ncu", *args], capture_output=True, text=True).stdout


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("report")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()

    raw = ncu("-i", args.report, "--page", "raw", "--csv")
    rows = list(csv.reader(io.StringIO(raw)))
    if len(rows) >= 3:
        names, values = rows[0], rows[2]
        stalls = []
        for n, v in zip(names, values):
            m = re.match(r"smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio$", n)
            if m:
                try:
                    stalls.append((float(v.replace(",", "")), m.group(1)))
                except ValueError:
                    pass
        print("stall cycles per issued instruction, by reason:")
        for v, n in sorted(stalls, reverse=True)[:14]:
            print(f"  {n:28s} {v:6.2f}")
        for key in ("sm__inst_executed.sum", "smsp__inst_executed.sum", "sm__cycles_elapsed.avg",
                    "gpu__time_duration.sum", "sm__warps_active.avg.pct_of_peak_sustained_active"):
            if key in names:
                print(f"  {key} = {values[names.index(key)]}")

    src = ncu("-i", args.report, "--page", "source", "--csv", "--print-source", "sass")
    lines = list(csv.reader(io.StringIO(src)))
    head = next((i for i, r in enumerate(lines) if "Source" in r), None)
    if head is None:
        print("no source page:", src[:400])
        return
    cols = lines[head]
    body = [r for r in lines[head + 1:] if len(r) == len(cols)]
    ci = cols.index("Source")
    samp = next((i for i, c in enumerate(cols) if c.startswith("Warp Stall Sampling (All")), None)
    exe = next((i for i, c in enumerate(cols) if c.startswith("Instructions Executed")), None)

    def num(r, i):
        try:
            return float(r[i].replace(",", "")) if i is not None else 0.0
        except ValueError:
            return 0.0

    total = sum(num(r, samp) for r in body) or 1.0
    by_op = defaultdict(lambda: [0.0, 0.0])
    for r in body:
        op = r[ci].split()[0] if r[ci].split() else "?"
        if op.startswith("@"):
            op = r[ci].split()[1] if len(r[ci].split()) > 1 else op
        op = op.split(".")[0]
        by_op[op][0] += num(r, samp)
        by_op[op][1] += num(r, exe)
    print(f"\nstall samples by opcode (of {total:.0f}), and instructions executed:")
    for op, (s, e) in sorted(by_op.items(), key=lambda x: -x[1][0])[:20]:
        print(f"  {op:10s} {100 * s / total:5.1f}%  executed {e:.0f}")
    # Each top line with its place in the listing (#index, and the address
    # where the page has one) and, for a branch, the instruction before it:
    # a wait loop's SYNCS names the mbarrier it polls (its shared offset
    # tells a stage's `full` barrier from its `empty` one).
    ai = cols.index("Address") if "Address" in cols else None
    print(f"\ntop {args.top} SASS lines by stall samples (#index in the listing):")
    order = sorted(range(len(body)), key=lambda j: -num(body[j], samp))[:args.top]
    for j in order:
        r = body[j]
        where = f"#{j}" + (f" {r[ai]}" if ai is not None else "")
        print(f"  {100 * num(r, samp) / total:5.1f}%  {where:>8s}  {r[ci][:90]}")
        if j > 0 and "BRA" in r[ci]:
            print(f"  {'':5s}   {'':>8s}    after: {body[j - 1][ci][:84]}")


if __name__ == "__main__":
    main()
