#include "bench_anchors.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

#include "cpu/isa.h"
#include "cpu/simd/simd.h"
#include "cpu_anchors.h"

#if QMOE_BENCH_CUDA
#include <cublas_v2.h>
#include <cuda_runtime.h>
#endif

namespace qmoe::bench {
#if QMOE_BENCH_CUDA
void launch_copy(void* dst, const void* src, size_t bytes, cudaStream_t stream);  // copy_kernel.cu
#endif
namespace {

double now_ms() {
  using namespace std::chrono;
  return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

}  // namespace

double Anchors::floor_ms(double bytes, double flops) const {
  const double t_bytes = bandwidth_gbps > 0 ? bytes / (bandwidth_gbps * 1e6) : 0;
  const double t_flops = peak_gflops > 0 ? flops / (peak_gflops * 1e6) : 0;
  return std::max(t_bytes, t_flops);
}

std::string Anchors::describe() const {
  char buf[512];
  std::snprintf(buf, sizeof buf, "%s %.1f GB/s; %s %.1f GFLOP/s", bandwidth_what.c_str(), bandwidth_gbps,
                peak_what.c_str(), peak_gflops);
  return buf;
}

Anchors measure_cpu_anchors(ActType act) {
  const CpuAnchors c = measure_cpu_anchors_full();
  Anchors a;
  a.device_name = c.cpu_model + ", " + std::to_string(c.threads) + " threads, " + c.isa;
  a.bandwidth_gbps = c.read_gbs;
  a.bandwidth_what = "all-threads read bandwidth";
  // The peak of the instruction the prefill kernels compute with: the AMX
  // tile product where the AVX-512 level runs it (fp16 activations: from 24
  // tokens an expert), else vdpbf16ps for bf16 activations where it runs
  // that, else fp32 FMA.
  const bool avx512 = cpu::selected_isa() == cpu::Isa::avx512;
  const bool amx = avx512 && c.amx_bf16_gflops > 0;
  const bool bf16_dot = avx512 && act == ActType::bf16 && !amx && cpu::simd::avx512_uses_bf16_dot() &&
                        c.bf16_dot_gflops > 0;
  a.peak_gflops = amx ? c.amx_bf16_gflops : bf16_dot ? c.bf16_dot_gflops : c.fma_f32_gflops;
  a.peak_what = amx ? "bf16 tile (AMX TDPBF16PS) peak" : bf16_dot ? "bf16 dot (vdpbf16ps) peak" : "fp32 FMA peak";
  return a;
}

Timing time_cpu(const MoeGemmParams& p, Phase phase, bool quick) {
  Timing t;
  t.status = moe(p, Device{}, phase);  // warm-up (and the checked output)
  if (!t.status.ok()) return t;
  std::vector<double> times;
  const double budget_ms = quick ? 1000 : 4000, start = now_ms();
  while (int(times.size()) < 20 && (times.size() < 3 || now_ms() - start < budget_ms)) {
    const double t0 = now_ms();
    t.status = moe(p, Device{}, phase);
    times.push_back(now_ms() - t0);
    if (!t.status.ok()) return t;
  }
  t.ms = median(times);
  t.runs = int(times.size());
  return t;
}

#if QMOE_BENCH_CUDA

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

namespace {

#define BENCH_CUDA(expr)                                                                 \
  do {                                                                                   \
    const cudaError_t e_ = (expr);                                                       \
    if (e_ != cudaSuccess) {                                                             \
      std::fprintf(stderr, "qmoe-bench: %s: %s\n", #expr, cudaGetErrorString(e_));        \
      std::exit(1);                                                                      \
    }                                                                                    \
  } while (0)

// Median time of one replay of `body` captured in a graph, over `reps` replays.
template <class Body>
double graph_ms(Body body, int launches, int reps) {
  cudaStream_t s;
  BENCH_CUDA(cudaStreamCreate(&s));
  cudaGraph_t g;
  cudaGraphExec_t ge;
  BENCH_CUDA(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < launches; ++i) body(s, i);
  BENCH_CUDA(cudaStreamEndCapture(s, &g));
  BENCH_CUDA(cudaGraphInstantiate(&ge, g, 0));
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  for (int w = 0; w < 3; ++w) BENCH_CUDA(cudaGraphLaunch(ge, s));
  std::vector<double> times;
  for (int r = 0; r < reps; ++r) {
    cudaEventRecord(e0, s);
    BENCH_CUDA(cudaGraphLaunch(ge, s));
    cudaEventRecord(e1, s);
    BENCH_CUDA(cudaEventSynchronize(e1));
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    times.push_back(double(ms) / launches);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaGraphExecDestroy(ge);
  cudaGraphDestroy(g);
  cudaStreamDestroy(s);
  return median(times);
}

}  // namespace

Anchors measure_cuda_anchors() {
  Anchors a;
  cudaDeviceProp prop{};
  BENCH_CUDA(cudaGetDeviceProperties(&prop, 0));
  a.device_name = prop.name;
  // Device copy bandwidth, counting bytes read and written.
  const size_t bytes = size_t(1) << 30;
  void *src, *dst;
  BENCH_CUDA(cudaMalloc(&src, bytes));
  BENCH_CUDA(cudaMalloc(&dst, bytes));
  BENCH_CUDA(cudaMemset(src, 1, bytes));
  const double copy_ms = graph_ms([&](cudaStream_t s, int) { launch_copy(dst, src, bytes, s); }, 1, 20);
  a.bandwidth_gbps = 2.0 * double(bytes) / (copy_ms * 1e6);
  a.bandwidth_what = "device copy (read + write)";
  BENCH_CUDA(cudaFree(src));
  BENCH_CUDA(cudaFree(dst));

  // Dense bf16 cuBLAS GEMM rate, 8192^3, on random (non-zero) data.
  const int n = 8192;
  void *A, *B, *C;
  BENCH_CUDA(cudaMalloc(&A, size_t(n) * n * 2));
  BENCH_CUDA(cudaMalloc(&B, size_t(n) * n * 2));
  BENCH_CUDA(cudaMalloc(&C, size_t(n) * n * 2));
  {
    std::vector<uint16_t> host(size_t(n) * n);
    uint32_t x = 12345;
    for (auto& h : host) {
      x = x * 1664525u + 1013904223u;
      h = float_to_bf16_bits(float(int(x >> 16) - 32768) / 32768.0f);
    }
    cudaMemcpy(A, host.data(), host.size() * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(B, host.data(), host.size() * 2, cudaMemcpyHostToDevice);
  }
  cublasHandle_t h;
  cublasCreate(&h);
  const float alpha = 1, beta = 0;
  const double gemm_ms = graph_ms(
      [&](cudaStream_t s, int) {
        cublasSetStream(h, s);
        cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &alpha, A, CUDA_R_16BF, n, B, CUDA_R_16BF, n, &beta, C,
                     CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      },
      1, 10);
  a.peak_gflops = 2.0 * double(n) * n * n / (gemm_ms * 1e6);
  a.peak_what = "dense bf16 cuBLAS 8192^3";
  cublasDestroy(h);
  cudaFree(A);
  cudaFree(B);
  cudaFree(C);
  return a;
}

Timing time_cuda(const MoeGemmParams& p, Phase phase, std::vector<uint16_t>& out, bool quick) {
  Timing t;
  const auto act_bytes = size_t(p.total_tokens * p.k * 2), out_bytes = size_t(p.total_tokens * p.n * 2);
  const size_t w_bytes = size_t(p.num_experts * p.n * packed_k(p.weight_type, p.k) * (p.weight_type == WeightType::native16 ? 2 : 1));
  const size_t groups = p.weight_type == WeightType::native16 ? 0 : size_t(p.num_experts * p.n * (p.k / p.group_size));
  const size_t s_bytes = p.scales ? groups * 2 : 0, z_bytes = p.zeros ? groups * 2 : 0;
  const size_t set_bytes = act_bytes + w_bytes + s_bytes + z_bytes + out_bytes;
  // Enough copies that one pass over them is several times the L2.
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  const int copies = int(std::clamp<size_t>(4 * size_t(prop.l2CacheSize) / std::max<size_t>(set_bytes, 1) + 1, 1, 16));
  struct Set {
    void *act, *w, *s, *z, *out;
    int32_t* counts;
  };
  std::vector<Set> sets(static_cast<size_t>(copies));
  for (Set& s : sets) {
    BENCH_CUDA(cudaMalloc(&s.act, std::max<size_t>(act_bytes, 2)));
    BENCH_CUDA(cudaMalloc(&s.w, w_bytes));
    BENCH_CUDA(cudaMalloc(&s.s, std::max<size_t>(s_bytes, 2)));
    BENCH_CUDA(cudaMalloc(&s.z, std::max<size_t>(z_bytes, 2)));
    BENCH_CUDA(cudaMalloc(&s.out, std::max<size_t>(out_bytes, 2)));
    BENCH_CUDA(cudaMalloc(&s.counts, size_t(p.num_experts) * 4));
    cudaMemcpy(s.act, p.activations, act_bytes, cudaMemcpyHostToDevice);
    cudaMemcpy(s.w, p.weights, w_bytes, cudaMemcpyHostToDevice);
    if (s_bytes) cudaMemcpy(s.s, p.scales, s_bytes, cudaMemcpyHostToDevice);
    if (z_bytes) cudaMemcpy(s.z, p.zeros, z_bytes, cudaMemcpyHostToDevice);
    cudaMemcpy(s.counts, p.tokens_per_expert, size_t(p.num_experts) * 4, cudaMemcpyHostToDevice);
    cudaMemset(s.out, 0xff, std::max<size_t>(out_bytes, 2));
  }
  const auto params_of = [&](const Set& s) {
    MoeGemmParams q = p;
    q.activations = s.act;
    q.weights = s.w;
    q.scales = s_bytes ? s.s : nullptr;
    q.zeros = z_bytes ? s.z : nullptr;
    q.out = s.out;
    q.tokens_per_expert = s.counts;
    return q;
  };
  t.status = moe(params_of(sets[0]), Device{DeviceType::cuda, 0, nullptr}, phase);
  if (t.status.ok()) {
    BENCH_CUDA(cudaDeviceSynchronize());
    cudaMemcpy(out.data(), sets[0].out, out_bytes, cudaMemcpyDeviceToHost);
    const int launches = std::max(copies, 8);
    t.ms = graph_ms([&](cudaStream_t s, int i) {
                      moe(params_of(sets[size_t(i % copies)]), Device{DeviceType::cuda, 0, s}, phase);
                    },
                    launches, quick ? 10 : 25);
    t.runs = quick ? 10 : 25;
  }
  for (Set& s : sets) {
    cudaFree(s.act);
    cudaFree(s.w);
    cudaFree(s.s);
    cudaFree(s.z);
    cudaFree(s.out);
    cudaFree(s.counts);
  }
  return t;
}

#else

int cuda_device_count() { return 0; }
Anchors measure_cuda_anchors() { return {}; }
Timing time_cuda(const MoeGemmParams&, Phase, std::vector<uint16_t>&, bool) {
  return {Status::unsupported("qmoe-bench was built without CUDA"), 0, 0};
}

#endif

}  // namespace qmoe::bench
