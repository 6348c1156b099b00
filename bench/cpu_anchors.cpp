// See cpu_anchors.h. The vector loops use function-level target attributes,
// so this file needs no special flags and runs on any x86-64 CPU (the level
// is checked at run time through qmoe's own detection).
#include "cpu_anchors.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <thread>
#include <vector>

#include "cpu/isa.h"
#include "cpu/simd/simd.h"
#include "qmoe/qmoe.h"

namespace qmoe::bench {
namespace {

using Clock = std::chrono::steady_clock;

int resolve(int threads) { return threads > 0 ? threads : qmoe::num_threads(); }
bool has_avx512() { return cpu::best_isa() == cpu::Isa::avx512; }
bool has_avx2() { return cpu::best_isa() >= cpu::Isa::avx2; }

// Runs f(i) on `n` threads released together; returns the wall time.
template <class F>
double on_threads(int n, F&& f) {
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> th;
  for (int i = 0; i < n; ++i)
    th.emplace_back([&, i] {
      ready.fetch_add(1);
      while (!go.load()) {
      }
      f(i);
    });
  while (ready.load() < n) {
  }
  const Clock::time_point t0 = Clock::now();
  go.store(true);
  for (auto& t : th) t.join();
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

template <int W>
double hsum(const float* t) {
  double s = 0;
  for (int i = 0; i < W; ++i) s += t[i];
  return s;
}

__attribute__((target("avx512f"))) double sum512(const float* p, size_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i + 64 <= n; i += 64) {
    a0 = _mm512_add_ps(a0, _mm512_load_ps(p + i));
    a1 = _mm512_add_ps(a1, _mm512_load_ps(p + i + 16));
    a2 = _mm512_add_ps(a2, _mm512_load_ps(p + i + 32));
    a3 = _mm512_add_ps(a3, _mm512_load_ps(p + i + 48));
  }
  alignas(64) float t[16];
  _mm512_store_ps(t, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  return hsum<16>(t);
}

__attribute__((target("avx2"))) double sum256(const float* p, size_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_load_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_load_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_load_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_load_ps(p + i + 24));
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  return hsum<8>(t);
}

double sum_scalar(const float* p, size_t n) {
  float a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (size_t i = 0; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) a[j] += p[i + j];
  return hsum<8>(a);
}

// Register-only loops: 12 independent accumulator chains hide the latency;
// the accumulators are 12 named variables (an array would be kept in
// memory) and the empty asm keeps the compiler from folding the loop.
#define QMOE_ACC12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define QMOE_KEEP12                                                                             \
  __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), \
                   "+v"(a7), "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11))

__attribute__((target("avx512f,fma"))) double fma512(int64_t iters) {
#define DECL(i) __m512 a##i = _mm512_set1_ps(float(i) * 1e-3f);
  QMOE_ACC12(DECL)
#undef DECL
  const __m512 x = _mm512_set1_ps(0.999999f), y = _mm512_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it) {
#define STEP(i) a##i = _mm512_fmadd_ps(a##i, x, y);
    QMOE_ACC12(STEP)
#undef STEP
    QMOE_KEEP12;
  }
  __m512 s = _mm512_setzero_ps();
#define SUM(i) s = _mm512_add_ps(s, a##i);
  QMOE_ACC12(SUM)
#undef SUM
  alignas(64) float t[16];
  _mm512_store_ps(t, s);
  return hsum<16>(t);
}

__attribute__((target("avx2,fma"))) double fma256(int64_t iters) {
#define DECL(i) __m256 a##i = _mm256_set1_ps(float(i) * 1e-3f);
  QMOE_ACC12(DECL)
#undef DECL
  const __m256 x = _mm256_set1_ps(0.999999f), y = _mm256_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it) {
#define STEP(i) a##i = _mm256_fmadd_ps(a##i, x, y);
    QMOE_ACC12(STEP)
#undef STEP
    QMOE_KEEP12;
  }
  __m256 s = _mm256_setzero_ps();
#define SUM(i) s = _mm256_add_ps(s, a##i);
  QMOE_ACC12(SUM)
#undef SUM
  alignas(32) float t[8];
  _mm256_store_ps(t, s);
  return hsum<8>(t);
}

__attribute__((target("avx512f,avx512bf16"))) double dot512(int64_t iters) {
#define DECL(i) __m512 a##i = _mm512_set1_ps(float(i) * 1e-3f);
  QMOE_ACC12(DECL)
#undef DECL
  const __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80), y = (__m512bh)_mm512_set1_epi16(0x3380);
  for (int64_t it = 0; it < iters; ++it) {
#define STEP(i) a##i = _mm512_dpbf16_ps(a##i, x, y);
    QMOE_ACC12(STEP)
#undef STEP
    QMOE_KEEP12;
  }
  __m512 s = _mm512_setzero_ps();
#define SUM(i) s = _mm512_add_ps(s, a##i);
  QMOE_ACC12(SUM)
#undef SUM
  alignas(64) float t[16];
  _mm512_store_ps(t, s);
  return hsum<16>(t);
}

// vpdpwssd (two int16 products into each int32 lane): the integer decode's
// product (QMOE_CPU_DOT=i16), 12 independent chains.
__attribute__((target("avx512f,avx512bw,avx512vnni"))) double i16dot512(int64_t iters) {
#define DECL(i) __m512i a##i = _mm512_set1_epi32(i);
  QMOE_ACC12(DECL)
#undef DECL
  const __m512i x = _mm512_set1_epi16(3), y = _mm512_set1_epi16(-2);
  for (int64_t it = 0; it < iters; ++it) {
#define STEP(i) a##i = _mm512_dpwssd_epi32(a##i, x, y);
    QMOE_ACC12(STEP)
#undef STEP
    QMOE_KEEP12;
  }
  __m512i s = _mm512_setzero_si512();
#define SUM(i) s = _mm512_add_epi32(s, a##i);
  QMOE_ACC12(SUM)
#undef SUM
  return double(_mm512_reduce_add_epi32(s));
}

template <class Loop>
double peak(int threads, double seconds, Loop loop, double flops_per_iter) {
  int64_t iters = 1 << 16;  // calibrate on one thread
  for (;;) {
    const auto t0 = Clock::now();
    volatile double sink = loop(iters);
    (void)sink;
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    if (s > 0.02) {
      iters = int64_t(double(iters) * seconds / s) + 1;
      break;
    }
    iters *= 4;
  }
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    const double s = on_threads(threads, [&](int) {
      volatile double sink = loop(iters);
      (void)sink;
    });
    best = std::max(best, threads * double(iters) * flops_per_iter / s / 1e9);
  }
  return best;
}

}  // namespace

double cpu_read_bandwidth_gbs(size_t bytes, int threads, int passes) {
  threads = resolve(threads);
  const size_t chunk = 64 * size_t(threads);
  const size_t n = bytes / sizeof(float) / chunk * chunk;
  float* a = static_cast<float*>(std::aligned_alloc(64, n * sizeof(float)));
  if (!a) return 0;
  const size_t per = n / threads;
  on_threads(threads, [&](int i) {  // first touch by the reading thread
    for (size_t j = i * per; j < (i + 1) * per; ++j) a[j] = float(j & 1023) * 1e-3f;
  });
  std::vector<double> sums(threads);
  double best = 0;
  for (int pass = 0; pass < passes; ++pass) {
    const double s = on_threads(threads, [&](int i) {
      const float* p = a + i * per;
      sums[i] = has_avx512() ? sum512(p, per) : has_avx2() ? sum256(p, per) : sum_scalar(p, per);
    });
    best = std::max(best, double(n * sizeof(float)) / s / 1e9);
  }
  std::free(a);
  return best;
}

double cpu_peak_fma_gflops(int threads, double seconds) {
  threads = resolve(threads);
  if (has_avx512()) return peak(threads, seconds, fma512, 12.0 * 16 * 2);
  if (has_avx2()) return peak(threads, seconds, fma256, 12.0 * 8 * 2);
  return 0;
}

#if defined(QMOE_AMX)
// Three independent TDPBF16PS an iteration on tiles that stay in the tile
// registers (each thread configures its own tiles).
__attribute__((target("amx-tile,amx-bf16"))) double amx_loop(int64_t iters) {
  struct alignas(64) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 6; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  alignas(64) static const uint16_t src[16 * 32] = {};
  alignas(64) float out[16 * 16];
  _tile_loadconfig(&cfg);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_loadd(3, src, 64);
  _tile_loadd(4, src, 64);
  _tile_loadd(5, src, 64);
  for (int64_t i = 0; i < iters; ++i) {
    _tile_dpbf16ps(0, 3, 4);
    _tile_dpbf16ps(1, 3, 5);
    _tile_dpbf16ps(2, 3, 4);
  }
  _tile_stored(0, out, 64);
  _tile_release();
  return double(out[0]);
}

double cpu_peak_amx_bf16_gflops(int threads, double seconds) {
  threads = resolve(threads);
  if (!cpu::simd::avx512_uses_amx()) return 0;  // (also asks the OS for the tile state)
  return peak(threads, seconds, amx_loop, 3.0 * 16 * 16 * 32 * 2);
}
#else
double cpu_peak_amx_bf16_gflops(int, double) { return 0; }
#endif

double cpu_peak_bf16_dot_gflops(int threads, double seconds) {
  threads = resolve(threads);
  if (!has_avx512()) return 0;  // qmoe's avx512 level implies AVX512_BF16
  return peak(threads, seconds, dot512, 12.0 * 32 * 2);
}

double cpu_peak_i16_dot_gops(int threads, double seconds) {
  threads = resolve(threads);
  if (!has_avx512()) return 0;  // (qmoe's avx512 level: AVX512_VNNI where its integer decode runs)
  return peak(threads, seconds, i16dot512, 12.0 * 32 * 2);
}

std::string cpu_model_name() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("model name", 0) == 0) {
      const size_t c = line.find(':');
      if (c != std::string::npos) return line.substr(c + 2);
    }
  return "unknown";
}

CpuAnchors measure_cpu_anchors_full(int threads) {
  CpuAnchors a;
  a.threads = resolve(threads);
  a.cpu_model = cpu_model_name();
  a.isa = cpu::to_string(cpu::selected_isa());
  a.read_gbs = cpu_read_bandwidth_gbs(size_t(1) << 30, a.threads);
  a.fma_f32_gflops = cpu_peak_fma_gflops(a.threads);
  a.bf16_dot_gflops = cpu_peak_bf16_dot_gflops(a.threads);
  if (cpu::selected_isa() == cpu::Isa::avx512) a.amx_bf16_gflops = cpu_peak_amx_bf16_gflops(a.threads);
  return a;
}

}  // namespace qmoe::bench
