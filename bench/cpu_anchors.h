// CPU anchors for qmoe-bench, measured in the same run as the figures they
// sit beside (DESIGN.md §5: a speed is always a ratio):
//   * memory read bandwidth: every thread sums its share of a >= 1 GiB array
//     with full-width vector loads (the floor of decode: weight bytes / this);
//   * peak GFLOP/s of the instructions the kernels compute with, by
//     register-only loops on every thread at once: fp32 FMA (AVX-512 or
//     AVX2 vfmadd) and bf16 dot product (vdpbf16ps, AVX512_BF16; 0 when
//     absent). The AVX-512 prefill kernel computes with vdpbf16ps for bf16
//     activations and with fp32 FMA for fp16 ones; the AVX2 level with FMA.
//
// Why not bench_anchors.cpp's CPU anchors (measure_cpu_anchors): on the
// 2-core AMD EPYC (Zen 5) dev machine its scalar uint64 sum read ~24 GB/s
// and its FMA loop (accumulator arrays, not registers) ~43 GFLOP/s in one
// run, where the full-width loops here reach ~77 GB/s and ~540 GFLOP/s
// (vdpbf16ps ~1000): ratios against those anchors come out far too
// flattering. It also has no bf16 dot-product peak.
//
// Threads: qmoe's CPU pool size (qmoe::num_threads()) unless given.
#pragma once

#include <cstddef>
#include <string>

namespace qmoe::bench {

struct CpuAnchors {
  std::string cpu_model;       // /proc/cpuinfo "model name"
  std::string isa;             // level qmoe's kernels run on (portable/avx2/avx512)
  int threads = 0;
  double read_gbs = 0;         // GB/s (1e9 bytes/s)
  double fma_f32_gflops = 0;   // 2 flops per fp32 multiply-add
  double bf16_dot_gflops = 0;  // 2 flops per bf16 multiply-add (64 per zmm vdpbf16ps)
  double amx_bf16_gflops = 0;  // 2 flops per bf16 multiply-add (16 x 16 x 32 per TDPBF16PS); 0 without AMX
};

// All-threads sum over `bytes` (>= 1 GiB by default); best of `passes`.
double cpu_read_bandwidth_gbs(size_t bytes = size_t(1) << 30, int threads = 0, int passes = 5);
// Register-only loops on every thread at once, ~`seconds` each; best of 3.
double cpu_peak_fma_gflops(int threads = 0, double seconds = 0.3);
double cpu_peak_bf16_dot_gflops(int threads = 0, double seconds = 0.3);  // 0: no AVX512_BF16
double cpu_peak_i16_dot_gops(int threads = 0, double seconds = 0.3);  // vpdpwssd, Gop/s (products + adds)
double cpu_peak_amx_bf16_gflops(int threads = 0, double seconds = 0.3);  // 0: qmoe does not use AMX here
std::string cpu_model_name();

// All of the above.
CpuAnchors measure_cpu_anchors_full(int threads = 0);

}  // namespace qmoe::bench
