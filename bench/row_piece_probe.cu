// row_piece_probe: how fast the GPU streams a [rows][row_bytes] matrix when
// each CTA walks a band of 256 rows along the rows, P bytes of every row a
// step (the prefill kernel's weight tiles: 64 k a stage is 16 bytes a row
// for int2, 32 for int4, 64 for int8 / fp8, 128 for bf16), against the same
// bytes read in one contiguous run per CTA. Two readers: plain 16-byte loads
// (8 steps in flight a thread) and bulk tensor copies (TMA, 2D boxes of 256
// rows x P bytes into a ring of 64 KB of stages, as the prefill producer
// issues them) with each L2 promotion of the tensor map. Prints GB/s per P.
//
//   CMake target qmoe-row-piece-probe (CUDA builds), or
//   nvcc -O3 -std=c++17 -arch=sm_90a bench/row_piece_probe.cu -o row_piece_probe
//   ./row_piece_probe [MB=512] [row_bytes=2048]
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x)                                                                       \
  do {                                                                              \
    cudaError_t e_ = (x);                                                           \
    if (e_ != cudaSuccess) {                                                        \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

constexpr int kBand = 256;    // rows a CTA walks
constexpr int kDepth = 8;     // loads in flight a thread (plain reader)
constexpr int kRing = 65536;  // bytes of stages a CTA (TMA reader)

// Plain loads: step s reads P bytes of each of the band's rows (P / 16
// threads a row); kDepth steps are loaded before any is used.
template <int P>
__global__ void __launch_bounds__(256) rows_plain(const uint4* __restrict__ w, int64_t row_bytes, int bands,
                                                  unsigned* sink) {
  constexpr int kPerRow = P / 16, kRowsAStep = 256 / kPerRow;
  uint4 acc = make_uint4(0, 0, 0, 0);
  for (int band = blockIdx.x; band < bands; band += gridDim.x) {
    const char* base = reinterpret_cast<const char*>(w) + int64_t(band) * kBand * row_bytes;
    const int steps = int(row_bytes / P);
    for (int s0 = 0; s0 < steps; s0 += kDepth) {
      for (int rr = 0; rr < kBand; rr += kRowsAStep) {
        const int row = rr + threadIdx.x / kPerRow, part = threadIdx.x % kPerRow;
        uint4 v[kDepth];
#pragma unroll
        for (int d = 0; d < kDepth; ++d)
          v[d] = s0 + d < steps ? *reinterpret_cast<const uint4*>(base + row * row_bytes + int64_t(s0 + d) * P +
                                                                   part * 16)
                                : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int d = 0; d < kDepth; ++d) acc.x ^= v[d].x, acc.y ^= v[d].y, acc.z ^= v[d].z, acc.w ^= v[d].w;
      }
    }
  }
  if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x9e3779b9u) sink[0] = 1;
}

// Contiguous: the same bytes a CTA, read in one run.
__global__ void __launch_bounds__(256) contiguous(const uint4* __restrict__ w, int64_t per_cta, int ctas,
                                                  unsigned* sink) {
  uint4 acc = make_uint4(0, 0, 0, 0);
  for (int c = blockIdx.x; c < ctas; c += gridDim.x) {
    const uint4* p = w + int64_t(c) * (per_cta / 16);
    for (int64_t i = threadIdx.x; i < per_cta / 16; i += 256 * kDepth) {
      uint4 v[kDepth];
#pragma unroll
      for (int d = 0; d < kDepth; ++d)
        v[d] = i + d * 256 < per_cta / 16 ? p[i + d * 256] : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int d = 0; d < kDepth; ++d) acc.x ^= v[d].x, acc.y ^= v[d].y, acc.z ^= v[d].z, acc.w ^= v[d].w;
    }
  }
  if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x9e3779b9u) sink[0] = 1;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// TMA: thread 0 keeps kRing / (256 P) boxes of 256 rows x P bytes in
// flight; the CTA waits for each and hands its slot back.
__global__ void __launch_bounds__(128) rows_tma(const __grid_constant__ CUtensorMap map, int p_bytes, int64_t row_bytes,
                                                int bands, unsigned* sink) {
  extern __shared__ __align__(1024) unsigned char ring[];
  __shared__ __align__(8) uint64_t full[64];
  const int box = kBand * p_bytes, stages = kRing / box, steps = int(row_bytes / p_bytes);
  if (threadIdx.x == 0)
    for (int s = 0; s < stages; ++s)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(&full[s])));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  __syncthreads();
  unsigned acc = 0;
  int phase_bits = 0;  // bit s: the parity stage s waits for next
  auto issue = [&](int slot, int band, int step) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(&full[slot])), "r"(box)
                 : "memory");
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(
            smem_addr(ring + slot * box)),
        "l"(&map), "r"(step * p_bytes), "r"(band * kBand), "r"(smem_addr(&full[slot]))
        : "memory");
  };
  for (int band = blockIdx.x; band < bands; band += gridDim.x) {
    if (threadIdx.x == 0)
      for (int s = 0; s < stages && s < steps; ++s) issue(s, band, s);
    for (int i = 0; i < steps; ++i) {
      const int slot = i % stages;
      const uint32_t parity = (phase_bits >> slot) & 1;
      asm volatile(
          "{\n .reg .pred p;\n W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra W;\n}" ::"r"(
              smem_addr(&full[slot])),
          "r"(parity)
          : "memory");
      phase_bits ^= 1 << slot;
      acc ^= reinterpret_cast<const unsigned*>(ring + slot * box)[threadIdx.x];
      __syncthreads();
      if (threadIdx.x == 0 && i + stages < steps) issue(slot, band, i + stages);
    }
  }
  if (acc == 0x9e3779b9u) sink[0] = 1;
}

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
static EncodeTiledFn encode_tiled() {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult q;
  CK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q));
  return reinterpret_cast<EncodeTiledFn>(fn);
}

template <class F>
static float time_ms(F&& launch) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  launch();  // warm-up
  std::vector<float> ts;
  for (int r = 0; r < 9; ++r) {
    CK(cudaEventRecord(a));
    launch();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    ts.push_back(ms);
  }
  CK(cudaGetLastError());
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

int main(int argc, char** argv) {
  const int64_t mb = argc > 1 ? std::atoll(argv[1]) : 512;
  const int64_t row_bytes = argc > 2 ? std::atoll(argv[2]) : 2048;  // (int4 rows of K = 4096; int2 1024)
  const int64_t rows = mb * (1 << 20) / row_bytes / kBand * kBand;
  const int64_t bytes = rows * row_bytes;
  const int bands = int(rows / kBand);
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  uint4* w = nullptr;
  unsigned* sink = nullptr;
  CK(cudaMalloc(&w, bytes));
  CK(cudaMalloc(&sink, 4));
  CK(cudaMemset(w, 0x5a, bytes));
  std::printf("# row_piece_probe on %s (%d SMs): %lld MB as %lld rows x %lld bytes, bands of %d rows, %d CTAs\n",
              prop.name, sms, (long long)(bytes >> 20), (long long)rows, (long long)row_bytes, kBand, sms);
  const float tc = time_ms([&] { contiguous<<<sms, 256>>>(w, int64_t(kBand) * row_bytes, bands, sink); });
  const double gc = bytes / tc / 1e6;
  std::printf("contiguous run a CTA: %.1f GB/s\n", gc);
  auto encode = encode_tiled();
  std::printf("%-10s %12s %8s %12s %12s %12s %12s  (TMA: L2 promotion none / 64B / 128B / 256B)\n", "P bytes",
              "plain GB/s", "/contig", "TMA none", "TMA 64B", "TMA 128B", "TMA 256B");
  auto row = [&](int p, auto plain) {
    const float tp = time_ms([&] { plain<<<sms, 256>>>(w, row_bytes, bands, sink); });
    float tt[4];
    const CUtensorMapL2promotion promo[4] = {CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_64B,
                                             CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B};
    for (int pi = 0; pi < 4; ++pi) {
    CUtensorMap map;
    cuuint64_t dims[2] = {cuuint64_t(row_bytes), cuuint64_t(rows)};
    cuuint64_t strides[1] = {cuuint64_t(row_bytes)};
    cuuint32_t box[2] = {cuuint32_t(p), cuuint32_t(kBand)}, elem[2] = {1, 1};
    if (encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, w, dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
               CU_TENSOR_MAP_SWIZZLE_NONE, promo[pi], CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
      std::fprintf(stderr, "tensor map P=%d failed\n", p);
      std::exit(1);
    }
    CK(cudaFuncSetAttribute(rows_tma, cudaFuncAttributeMaxDynamicSharedMemorySize, kRing));
    tt[pi] = time_ms([&] { rows_tma<<<sms, 128, kRing>>>(map, p, row_bytes, bands, sink); });
    }
    std::printf("%-10d %12.1f %8.2f %12.1f %12.1f %12.1f %12.1f\n", p, bytes / tp / 1e6, bytes / tp / 1e6 / gc,
                bytes / tt[0] / 1e6, bytes / tt[1] / 1e6, bytes / tt[2] / 1e6, bytes / tt[3] / 1e6);
  };
  row(16, rows_plain<16>);
  row(32, rows_plain<32>);
  row(64, rows_plain<64>);
  row(128, rows_plain<128>);
  row(256, rows_plain<256>);
  return 0;
}
