// cpu_decode_probe: the quick probes behind the CPU decode/prefill changes of
// docs/PERFORMANCE.md (CMake target qmoe-cpu-probe; qmoe-bench is the benchmark):
//   l2  ENC...   one thread (THR=n for more), ~512 KB of weights (L2-resident),
//                E=1, K=4096 (L2K), N=512 KB/row bytes (L2N), NT tokens (NT=1):
//                the decode's compute rate in GB/s of weights, best and median
//   dram ENC...  Mixtral b1 rows (gate_up 8x28672x4096, down 8x4096x14336, or
//                SHAPE=E,N,K,active), 2 experts of NT tokens, the active experts
//                rotating every call so no call finds its weights in the 32 MB L3
//                (qmoe-bench does not rotate), REPS calls (16), median, against the
//                all-threads read bandwidth measured just before and after
//   pre  ENC...  prefill E=2 N=K=4096, 256 tokens an expert, THR threads (1)
//   actl1 K [CHUNK...]  the 8-token decode's register loop alone (2 bf16
//                weight rows x 8 tokens, 16 accumulators, 32 steps of rows
//                over K), walking K whole or in CHUNKs: GFLOP/s a core while
//                the tokens' activations fit L1 or not (AVX512_BF16 only)
//   dots         one core's register-loop rates of the decode's products:
//                fp32 FMA, vdpbf16ps, vpdpwssd (instructions a ns; what
//                use_bf16_dot / use_i16_dot weigh)
// ACT=f16 for fp16 activations. Built as BUILD/bench/qmoe-cpu-probe.
#include <immintrin.h>
#include <qmoe/qmoe.h>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>
#include <memory>
#include <cstdlib>
#include <random>
#include <algorithm>
#include <array>
#include "cpu_anchors.h"
#include "cpu/isa.h"
using namespace qmoe;
static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
struct Enc { WeightType t; bool asym; };
static Enc parse(const std::string& s) {
  if (s == "int4") return {WeightType::int4, false};
  if (s == "int4_asym") return {WeightType::int4, true};
  if (s == "int8") return {WeightType::int8, false};
  if (s == "int8_asym") return {WeightType::int8, true};
  if (s == "int2") return {WeightType::int2, false};
  if (s == "int2_asym") return {WeightType::int2, true};
  if (s == "fp8_e4m3") return {WeightType::fp8_e4m3, false};
  if (s == "fp8_e5m2") return {WeightType::fp8_e5m2, false};
  return {WeightType::native16, false};
}
struct Prob {
  MoeGemmParams p; std::vector<uint16_t> act, sc, z, out; std::vector<uint8_t> w; std::vector<int32_t> counts; int64_t bytes;
};
static void make(Prob& pr, Enc enc, int64_t E, int64_t N, int64_t K, std::vector<int32_t> counts, ActType at) {
  auto& p = pr.p; p.act_type = at; p.weight_type = enc.t; p.asym = enc.asym; p.num_experts = E; p.n = N; p.k = K;
  pr.counts = counts; p.total_tokens = 0; for (auto c : counts) p.total_tokens += c;
  p.group_size = enc.t == WeightType::native16 ? 0 : 128;
  std::mt19937_64 rng(1);
  std::uniform_real_distribution<float> u(-1, 1);
  pr.act.resize(p.total_tokens * K); for (auto& v : pr.act) v = at == ActType::bf16 ? float_to_bf16_bits(u(rng)) : float_to_f16_bits(u(rng));
  int64_t wb = E * N * packed_k(enc.t, K) * (enc.t == WeightType::native16 ? 2 : 1);
  pr.w.resize(wb); uint64_t x = 12345;
  for (size_t i = 0; i < pr.w.size(); i += 8) { x ^= x << 13, x ^= x >> 7, x ^= x << 17; std::memcpy(&pr.w[i], &x, std::min<size_t>(8, pr.w.size() - i)); }
  if (enc.t == WeightType::fp8_e4m3) for (auto& b : pr.w) b = (b & 0x7f) == 0x7f ? b ^ 1 : b;
  if (enc.t == WeightType::fp8_e5m2) for (auto& b : pr.w) b = (b & 0x7c) == 0x7c ? b & 0xbb : b;
  if (enc.t == WeightType::native16) { auto* h = (uint16_t*)pr.w.data(); for (size_t i = 0; i < pr.w.size() / 2; ++i) h[i] = float_to_bf16_bits((float(h[i] & 0x3ff) / 1024.f - .5f) * .1f); }
  if (enc.t != WeightType::native16) {
    pr.sc.resize(E * N * (K / 128)); for (auto& v : pr.sc) v = float_to_bf16_bits(0.01f * (0.5f + std::fabs(u(rng))));
    if (enc.asym) { pr.z.resize(pr.sc.size()); int lv = 1 << weight_bits(enc.t); for (auto& v : pr.z) v = float_to_bf16_bits(float(rng() % lv)); }
  }
  pr.out.assign(p.total_tokens * N, 0);
  p.activations = pr.act.data(); p.weights = pr.w.data(); p.scales = pr.sc.empty() ? nullptr : pr.sc.data();
  p.zeros = pr.z.empty() ? nullptr : pr.z.data(); p.tokens_per_expert = pr.counts.data(); p.out = pr.out.data();
  int64_t active = 0; for (auto c : counts) active += c > 0;
  pr.bytes = active * weight_bytes_per_expert(p);
}
// The decode's 8-token inner loop (src/cpu/simd/kernels_avx512.cpp) without
// decode or folds: GFLOP/s of vdpbf16ps, K walked in chunks of `chunk`.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) static double act_l1_loop(int64_t K, int64_t chunk) {
  constexpr int kTokens = 8, kSteps = 32;
  // 64-byte aligned, as the library's tensors from PyTorch are
  auto buffer = [](int64_t n) {
    auto* p = static_cast<uint16_t*>(std::aligned_alloc(64, size_t((n * 2 + 63) / 64 * 64)));
    std::fill(p, p + n, uint16_t(0x3f80));
    return std::unique_ptr<uint16_t, void (*)(void*)>(p, std::free);
  };
  const auto act = buffer(kTokens * K), w = buffer(2 * kSteps * K);
  __m512 total = _mm512_setzero_ps();
  const int reps = int(std::max<int64_t>(1, 400 * 4096 / K));
  const double t0 = now();
  for (int r = 0; r < reps; ++r)
    for (int64_t c0 = 0; c0 < K; c0 += chunk)
      for (int s = 0; s < kSteps; ++s) {
        __m512 acc[2][kTokens];
        for (auto& q : acc)
          for (auto& x : q) x = _mm512_setzero_ps();
        const uint16_t* w0 = w.get() + (2 * s) * K;
        const uint16_t* w1 = w0 + K;
        const int64_t c1 = std::min(K, c0 + chunk);
        for (int64_t k = c0; k < c1; k += 32) {
          const __m512i a0 = _mm512_loadu_si512(w0 + k), a1 = _mm512_loadu_si512(w1 + k);
#pragma GCC unroll 8
          for (int t = 0; t < kTokens; ++t) {
            const __m512i x = _mm512_loadu_si512(act.get() + t * K + k);
            acc[0][t] = _mm512_dpbf16_ps(acc[0][t], (__m512bh)a0, (__m512bh)x);
            acc[1][t] = _mm512_dpbf16_ps(acc[1][t], (__m512bh)a1, (__m512bh)x);
          }
        }
        for (auto& q : acc)
          for (auto& x : q) total = _mm512_add_ps(total, x);
      }
  const double dt = now() - t0;
  if (_mm512_reduce_add_ps(total) == 1.0f) std::printf(" ");  // keep the sums
  return double(reps) * kSteps * (K / 32) * 2 * kTokens * 64 / dt / 1e9;
}

int main(int argc, char** argv) {
  if (argc >= 3 && std::string(argv[1]) == "actl1") {
    if (!cpu::isa_supported(cpu::Isa::avx512) || !__builtin_cpu_supports("avx512bf16")) {
      std::fprintf(stderr, "actl1 needs AVX512_BF16\n");
      return 2;
    }
    const int64_t K = atoll(argv[2]);
    std::vector<int64_t> chunks = {K};
    for (int i = 3; i < argc; ++i) chunks.push_back(atoll(argv[i]));
    for (int64_t c : chunks)
      std::printf("actl1 K=%lld chunk=%lld (activations %lld KB): %.0f GFLOP/s a core\n", (long long)K,
                  (long long)c, (long long)(8 * std::min(c, K) * 2 / 1024), act_l1_loop(K, c));
    return 0;
  }
  if (argc == 2 && std::string(argv[1]) == "dots") {  // instructions a ns, one core
    const double fma = bench::cpu_peak_fma_gflops(1) / 32, dot = bench::cpu_peak_bf16_dot_gflops(1) / 64,
                 i16 = bench::cpu_peak_i16_dot_gops(1) / 64;
    printf("one core, 12 chains: fp32 FMA %.2f, vdpbf16ps %.2f, vpdpwssd %.2f instructions a ns\n", fma, dot, i16);
    return 0;
  }
  if (argc < 3 || (std::string(argv[1]) != "l2" && std::string(argv[1]) != "dram" && std::string(argv[1]) != "pre")) {
    std::fprintf(stderr, "usage: qmoe-cpu-probe l2|dram|pre ENCODING... | actl1 K [CHUNK...] | dots (see the header of bench/cpu_decode_probe.cpp)\n");
    return 2;
  }
  std::string mode = argv[1];
  ActType at = ActType::bf16;
  if (getenv("ACT") && std::string(getenv("ACT")) == "f16") at = ActType::f16;
  if (mode == "pre") {  // probe pre enc... : E=2, N=K=4096, 256 tok/expert, THR threads
    set_num_threads(getenv("THR") ? atoi(getenv("THR")) : 1);
    for (int i = 2; i < argc; ++i) {
      Enc enc = parse(argv[i]);
      Prob pr; make(pr, enc, 2, 4096, 4096, {256, 256}, at);
      for (int w = 0; w < 2; ++w) moe_gemm_prefill(pr.p);
      std::vector<double> ts;
      for (int r = 0; r < 7; ++r) { double t0 = now(); moe_gemm_prefill(pr.p); ts.push_back(now() - t0); }
      std::sort(ts.begin(), ts.end());
      double fl = 2.0 * 512 * 4096 * 4096;
      printf("pre %-10s best %.2f ms (%.0f GFLOP/s) median %.2f ms\n", argv[i], ts[0] * 1e3, fl / ts[0] / 1e9, ts[3] * 1e3);
    }
    return 0;
  }
  if (mode == "l2") {  // probe l2 enc... [ntok]
    int nt = getenv("NT") ? atoi(getenv("NT")) : 1;
    set_num_threads(getenv("THR") ? atoi(getenv("THR")) : 1);
    for (int i = 2; i < argc; ++i) {
      Enc enc = parse(argv[i]);
      Prob pr; int64_t K = getenv("L2K") ? atoi(getenv("L2K")) : 4096; int64_t rowb = packed_k(enc.t, K) * (enc.t == WeightType::native16 ? 2 : 1);
      int64_t N = getenv("L2N") ? atoi(getenv("L2N")) : std::max<int64_t>(64, (512 << 10) / rowb) / 64 * 64;
      make(pr, enc, 1, N, K, {nt}, at);
      for (int w = 0; w < 20; ++w) moe_gemm_decode(pr.p);
      double best = 1e9; std::vector<double> ts;
      for (int r = 0; r < 7; ++r) {
        double t0 = now(); int it = 200; for (int j = 0; j < it; ++j) moe_gemm_decode(pr.p); double dt = (now() - t0) / it; ts.push_back(dt);
      }
      std::sort(ts.begin(), ts.end());
      printf("l2 %-10s nt=%d N=%ld bytes=%ld  %.1f GB/s (median %.1f)\n", argv[i], nt, N, pr.bytes, pr.bytes / ts[0] / 1e9, pr.bytes / ts[3] / 1e9);
    }
    return 0;
  }
  // dram: probe dram enc... ; Mixtral b1 gate_up and down
  int reps = getenv("REPS") ? atoi(getenv("REPS")) : 16;
  int nt = getenv("NT") ? atoi(getenv("NT")) : 1;
  for (int i = 2; i < argc; ++i) {
    Enc enc = parse(argv[i]);
    std::vector<std::array<int64_t,5>> shapes = {{8, 28672, 4096, 2, 0}, {8, 4096, 14336, 2, 1}};
    if (getenv("SHAPE")) { std::array<int64_t,5> a{}; sscanf(getenv("SHAPE"), "%ld,%ld,%ld,%ld", &a[0], &a[1], &a[2], &a[3]); a[4] = 2; shapes = {a}; }
    for (auto sh : shapes) {
      const int which = int(sh[4]);
      Prob pr;
      std::vector<int32_t> c0(sh[0], 0); for (int j = 0; j < sh[3]; ++j) c0[j] = nt;
      make(pr, enc, sh[0], sh[1], sh[2], c0, at);
      std::vector<int32_t> cnt(sh[0], 0);
      pr.p.tokens_per_expert = cnt.data();
      auto call = [&](int r) { std::fill(cnt.begin(), cnt.end(), 0); for (int j = 0; j < sh[3]; ++j) cnt[(sh[3] * r + j) % sh[0]] = nt; moe_gemm_decode(pr.p); };
      for (int r = 0; r < 4; ++r) call(r);
      double bw0 = bench::cpu_read_bandwidth_gbs(size_t(1) << 30, 0, 2);
      std::vector<double> ts;
      for (int r = 0; r < reps; ++r) { double t0 = now(); call(r); ts.push_back(now() - t0); }
      double bw1 = bench::cpu_read_bandwidth_gbs(size_t(1) << 30, 0, 2);
      std::sort(ts.begin(), ts.end());
      double gbs = pr.bytes / ts[ts.size() / 2] / 1e9, bw = std::max(bw0, bw1);
      printf("dram %-10s %-7s %4.0f MB  %.3f ms  %.1f GB/s  read %.1f/%.1f  => %.0f%%\n", argv[i], which == 2 ? "shape" : which ? "down" : "gate_up",
             pr.bytes / 1e6, ts[ts.size() / 2] * 1e3, gbs, bw0, bw1, 100 * gbs / bw);
      fflush(stdout);
    }
  }
}
