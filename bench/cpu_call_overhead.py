"""Fixed cost of one small qmoe CPU call, 1 thread vs the default pool.

    python3 bench/cpu_call_overhead.py [--calls 3000]

A decode product of 2 tokens on 2 of 8 tiny int4 experts (64 x 128): nearly
all of its time is the call itself (Python binding, argument checks, waking the
thread pool). Prints microseconds a call, mean over --calls calls after 100
warm-up calls.
"""
import argparse
import time

import numpy as np

import qmoe


def per_call_us(x, q, s, counts, calls):
    for _ in range(100):
        qmoe.moe_gemm_decode(x, q, counts, scales=s, group_size=64)
    t = time.perf_counter()
    for _ in range(calls):
        qmoe.moe_gemm_decode(x, q, counts, scales=s, group_size=64)
    return (time.perf_counter() - t) / calls * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=3000)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64, 128), dtype=np.float32) * 0.05
    q, s, _ = qmoe.quantize(w, weight_bits=4, group_size=64, dtype="float16")
    counts = np.array([1, 0, 0, 1, 0, 0, 0, 0], np.int32)
    x = rng.standard_normal((2, 128)).astype(np.float16)
    default = qmoe.num_threads()
    print(f"{default} threads: {per_call_us(x, q, s, counts, a.calls):.1f} us/call")
    qmoe.set_num_threads(1)
    print(f"1 thread: {per_call_us(x, q, s, counts, a.calls):.1f} us/call")
    qmoe.set_num_threads(0)


if __name__ == "__main__":
    main()
