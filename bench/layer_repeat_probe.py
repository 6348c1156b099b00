#!/usr/bin/env python3
"""Repeated calls of the CUDA fused layer: are they bitwise equal, and free of NaN?

    PYTHONPATH=python python3 bench/layer_repeat_probe.py [--reps 20] [--layer Mixtral-8x7B]

For the layer shape --layer (bench/model_bench.py's LAYERS, int4 experts,
batch 1): 20 calls on the same inputs, first on a fresh workspace, then after
running each of the four layer shapes at batch 1, 64, 512 and 4096 (which
leave their counts and rows in the cached workspace). Prints, for each, the
NaN count of every call, the distinct relative errors against the torch loop
on bf16 weights, and whether all calls gave the same bits. This found the
early-launch race of 2026-11-27 (docs/PERFORMANCE.md, eighth session);
QMOE_PDL=0 runs the same without early launches.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import model_bench as mb  # noqa: E402


def inputs(shape, B, dev):
    gen = torch.Generator().manual_seed(B)
    x = torch.randn(B, shape["H"], generator=gen).to(torch.bfloat16).to(dev)
    lg = torch.randn(B, shape["E"], generator=gen).to(dev)
    return x, lg


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--layer", default="Mixtral-8x7B", choices=list(mb.LAYERS))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("layer_repeat_probe: needs a CUDA device")
    dev = torch.device("cuda")
    weights = {n: mb.layer_weights(mb.LAYERS[n], dev, 7, "int4") for n in mb.LAYERS}
    shape = mb.LAYERS[args.layer]
    w16, q = weights[args.layer]

    def check(tag):
        x, lg = inputs(shape, 1, dev)
        ref = mb.torch_loop_layer(x, lg, w16, shape).float()
        outs = [mb.qmoe_layer(x, lg, q, w16, shape).float() for _ in range(args.reps)]
        torch.cuda.synchronize()
        nans = [int(torch.isnan(o).sum()) for o in outs]
        errs = sorted({round(((o - ref).norm() / ref.norm()).item(), 4) for o in outs}, key=str)
        same = all(torch.equal(outs[0], o) for o in outs)
        print(f"{tag}: NaN counts {nans}; relative errors {errs[:6]}; all identical {same}", flush=True)
        return same and not any(nans)

    print(f"{torch.cuda.get_device_name()}, {args.layer} int4 batch 1, {args.reps} calls, "
          f"QMOE_PDL={os.environ.get('QMOE_PDL', '(default)')}")
    ok = check("fresh")
    for name, (w, qq) in weights.items():
        for B in (1, 64, 512, 4096):
            x, lg = inputs(mb.LAYERS[name], B, dev)
            mb.qmoe_layer(x, lg, qq, w, mb.LAYERS[name])
        ok = check("after " + name) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
