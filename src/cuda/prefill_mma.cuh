// The CUDA prefill path: a persistent tensor-core grouped GEMM with the
// weight decode fused into the main loop (mma.sync.m16n8k16, f32 accumulate;
// runs on sm_80 and sm_90). One kernel template on <Act, Enc> for every
// encoding; the per-encoding part is the register decode of prefill_decode.cuh.
//
// Problem: out[t, n] = sum_k act[t, k] * W_e[n, k] for the rows t of expert e;
// activations [T, K] and weights [E, N, K_packed] (ARK layout), read as they
// are: no dequantized copy of the weights exists anywhere.
//
// Tiles. A work item is (expert, 64-token tile, 256-row n tile). A CTA of 4
// warps computes it; warp w owns weight rows [64w, 64w+64) of the n tile for
// all 64 tokens (4 m16 fragments x 8 n8 fragments, 128 fp32 accumulators per
// lane). The k loop runs over k tiles of BK = 64 (32 for 16-bit weights), each
// brought into shared memory by a multi-stage cp.async pipeline (activations,
// packed weights; scales and zero-point biases through registers).
//
// k order. The order of k inside a 32-wide k chunk is free for a dot product,
// as long as activations and weights agree. Lane (g = lane/4, c = lane%4)
// takes the 8 contiguous k values 8c..8c+7 of the chunk: m16n8k16 step s of
// the chunk maps fragment slots {2c, 2c+1, 2c+8, 2c+9} to k = 8c + 4s + {0, 1,
// 2, 3}. So a lane's activation fragment of a token row is one 16-byte load,
// and its weight codes of a row are Enc::kBits contiguous bytes (one load).
//
// Shared memory layout of one stage (all loads conflict-free):
//   A  [kc][64 tokens][32 k] 16-bit (64-byte rows)
//   B  [kc / KCG][256 rows][SRB bytes] packed codes; SRB = 4 * bits (16 for
//      int2, which keeps both chunks of the k tile in one 16-byte segment)
//   S  [kc][256] (scale, scale) words; Z [kc][256] bias words (asym only)
// Weight rows are permuted twice: (1) the n8 fragment j of warp w, row g,
// holds weight row 64w + 8(g/2) + 32(j/4) + 2(j%4) + g%2, so that a lane's
// accumulators cover 8 contiguous outputs twice (16-byte stores); (2) in
// shared memory row n sits at sigma(n) = n ^ (((n >> 3) & 3) << 1), which
// spreads the 8 rows of a fragment over distinct banks.
//
// Schedule. Persistent grid (SMs x resident CTAs). Each CTA computes, from the
// device-side counts, the clamped token range of every expert (like
// common.cuh's expert_range) and the prefix sum of work items in shared
// memory, then strides over the items. Experts with no tokens have no items;
// a partial token tile computes only ceil(rows/16) m16 fragments (the k loop
// is instantiated for 1..4). The pipeline runs across item boundaries. No
// host sync, no allocation: the launch is graph-capturable. Rows that no
// expert covers (counts summing to less than T) are written as zeros.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/prefill_decode.cuh"

namespace qmoe::cuda::prefill {

// ---------------------------------------------------------------------------
// Compile-time configuration per (Act, Enc).
// ---------------------------------------------------------------------------
template <class Act, class Enc>
struct Cfg {
  static constexpr int kBits = Enc::kBits;  // 2, 4, 8, 16
  static constexpr bool kScaled = Enc::kScaled;
  static constexpr bool kBias = Enc::kAsym;
  static constexpr int KC = kBits == 16 ? 1 : 2;  // 32-wide k chunks per k tile
  static constexpr int BK = 32 * KC;
  static constexpr int BM = 64, BN = 256, kWarps = 4, kThreads = 128;
  static constexpr int SRB = kBits * 4 < 16 ? 16 : kBits * 4;  // bytes of a B row segment
  static constexpr int KCG = SRB / (kBits * 4);                 // k chunks per segment
  static constexpr int NSUB = KC / KCG;                         // B segments per stage
  static constexpr int KPB = BK * kBits / 8;                    // packed bytes per row per k tile
  static constexpr int CPR = KPB / 16;                          // 16-byte chunks per row per k tile
  static constexpr int A_BYTES = KC * BM * 64;
  static constexpr int B_BYTES = NSUB * BN * SRB;
  static constexpr int S_BYTES = kScaled ? KC * BN * 4 : 0;
  static constexpr int Z_BYTES = kBias ? KC * BN * 4 : 0;
  static constexpr int STAGE = A_BYTES + B_BYTES + S_BYTES + Z_BYTES;
  // Two CTAs per SM on Hopper (228 KB) with room for the schedule arrays.
  static constexpr int STAGES_RAW = (108 * 1024) / STAGE;
  static constexpr int STAGES = STAGES_RAW > 6 ? 6 : (STAGES_RAW < 2 ? 2 : STAGES_RAW);
  static constexpr int A_ITERS = BM * 4 * KC / kThreads;  // 16-byte A chunks per thread per stage
  static constexpr int B_ITERS = BN * CPR / kThreads;
  static_assert(CPR >= 1 && (BN * CPR) % kThreads == 0, "B chunks");
  static_assert(KC % KCG == 0, "segments");
  using Dec = PrefillDecode<Act, Enc>;
  using raw_t = typename Dec::raw_t;
  static_assert(sizeof(raw_t) == kBits, "a lane reads bits bytes per row per k chunk");
};

struct Args {
  const uint16_t* act;
  const uint8_t* w;
  const uint16_t* scales;
  const uint16_t* zeros;
  const int32_t* counts;
  uint16_t* out;
  int E, N, K, T;
  int64_t kp;        // packed bytes per weight row
  int groups;        // K / group_size
  uint32_t gdiv;     // ceil(2^32 / (group_size / 32)), 0 for group_size 32: chunk -> group
  int n_tiles, k_tiles;
  int vec_out;       // 16-byte output stores allowed (N % 8 == 0, aligned out)
};

// ---------------------------------------------------------------------------
// PTX helpers.
// ---------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

template <class Act>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  if constexpr (Act::type == ActType::f16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// threadIdx.x read anew at each use: the loader's address math is then
// recomputed per stage instead of being hoisted into registers that the
// main loop needs for its accumulators.
__device__ __forceinline__ int fresh_tid() {
  int t;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
  return t;
}

// Shared-memory row of weight row n (0..255) of the n tile.
__device__ __forceinline__ int sigma(int n) { return n ^ (((n >> 3) & 3) << 1); }
// Index of the scale word of weight row n: lane g of warp w reads the 8 words
// of its fragments j = 0..7 contiguously.
__device__ __forceinline__ int tau(int n) {
  const int w = n >> 6, m = n & 63;
  const int a = (m >> 3) & 3, J = m >> 5, jj = (m >> 1) & 3, b = m & 1;
  return 64 * w + 8 * (2 * a + b) + 4 * J + jj;
}

// Exclusive scan over the 128 threads of the block (4 warps).
template <class V>
__device__ __forceinline__ V block_exclusive_scan(V v, V* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  V x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const V y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  V base = 0;
  for (int w = 0; w < warp; ++w) base += scratch[w];
  __syncthreads();
  return base + x - v;
}

struct Item {
  int e, tok0, rows, n0;
};

template <class C>
__device__ __forceinline__ Item decode_item(int item, const int* s_tok, const int* s_items, int E,
                                            int n_tiles) {
  int lo = 0, hi = E;  // s_items[lo] <= item < s_items[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (s_items[mid] <= item)
      lo = mid;
    else
      hi = mid;
  }
  Item it;
  it.e = lo;
  const int tb = s_tok[lo], te = s_tok[lo + 1];
  const int mt = (te - tb + C::BM - 1) / C::BM;
  const int local = item - s_items[lo];
  const int nt = local / mt;
  const int mtile = local - nt * mt;
  it.tok0 = tb + mtile * C::BM;
  it.rows = min(C::BM, te - it.tok0);
  it.n0 = nt * C::BN;
  (void)n_tiles;
  return it;
}

// ---------------------------------------------------------------------------
// The kernel.
// ---------------------------------------------------------------------------
template <class Act, class Enc>
struct Kernel {
  using C = Cfg<Act, Enc>;
  using Dec = typename C::Dec;
  using P = Pair<Act>;
  using raw_t = typename C::raw_t;

  // Per-thread loader state: the next (item, k tile) to bring in.
  struct Loader {
    int item, kt;
    Item it;
    uint32_t sreg[2], zreg[2];  // 16-bit scale / zero of chunk kc in bits 16kc..16kc+15
    bool pending;
  };

  __device__ static __forceinline__ void issue(const Args& a, Loader& L, unsigned char* stage,
                                               int total, const int* s_tok, const int* s_items) {
    const int tid = fresh_tid();
    if (L.item < total) {
      const int kt = L.kt;
      const Item& it = L.it;
      // Activations: BM rows x BK, 16-byte chunks; rows past the tile's
      // rows are zero (up to the last m16 fragment computed) or skipped.
      {
        const uint32_t sA = smem_addr(stage);
        const int rows16 = (it.rows + 15) & ~15;
#pragma unroll
        for (int i = 0; i < C::A_ITERS; ++i) {
          const int q = tid + C::kThreads * i;
          const int r = q / (4 * C::KC), j = q % (4 * C::KC);
          if (r < rows16) {
            const int kc = j >> 2, pos = j & 3;
            const int kcol = kt * C::BK + 8 * j;
            const bool ok = r < it.rows && kcol < a.K;
            const uint16_t* src = a.act + int64_t(it.tok0 + (r < it.rows ? r : 0)) * a.K + (ok ? kcol : 0);
            cp_async16(sA + kc * (C::BM * 64) + r * 64 + pos * 16, src, ok ? 16u : 0u);
          }
        }
      }
      // Packed weights: BN rows x KPB bytes; rows past N are zero.
      {
        const uint32_t sB = smem_addr(stage + C::A_BYTES);
        const int64_t ebase = int64_t(it.e) * a.N;
#pragma unroll
        for (int i = 0; i < C::B_ITERS; ++i) {
          const int q = tid + C::kThreads * i;
          const int n = q / C::CPR, j = q % C::CPR;
          constexpr int CPS = C::SRB / 16;  // chunks per segment
          const int sub = j / CPS, pos = j % CPS;
          const int row = it.n0 + n;
          const int64_t kb = int64_t(kt) * C::KPB + 16 * j;
          const bool ok = row < a.N && kb < a.kp;
          const uint8_t* src = a.w + (ebase + (row < a.N ? row : a.N - 1)) * a.kp + (ok ? kb : 0);
          cp_async16(sB + sub * (C::BN * C::SRB) + sigma(n) * C::SRB + pos * 16, src, ok ? 16u : 0u);
        }
      }
      // Scales and zero points of the groups of this k tile: to registers
      // now, to shared memory after this iteration's math (store_scales).
      if constexpr (C::kScaled) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = min(it.n0 + tid + C::kThreads * r, a.N - 1);
          const int64_t gbase = (int64_t(it.e) * a.N + row) * a.groups;
#pragma unroll
          for (int kc = 0; kc < C::KC; ++kc) {
            const uint32_t chunk = uint32_t(kt * C::KC + kc);
            const int grp = min(int(a.gdiv ? __umulhi(chunk, a.gdiv) : chunk), a.groups - 1);
            const uint32_t sv = __ldg(a.scales + gbase + grp);
            L.sreg[r] = kc == 0 ? sv : (L.sreg[r] | (sv << 16));
            if constexpr (C::kBias) {
              const uint32_t zv = __ldg(a.zeros + gbase + grp);
              L.zreg[r] = kc == 0 ? zv : (L.zreg[r] | (zv << 16));
            }
          }
        }
        L.pending = true;
      }
      if (++L.kt == a.k_tiles) {
        L.kt = 0;
        L.item += gridDim.x;
        if (L.item < total) L.it = decode_item<C>(L.item, s_tok, s_items, a.E, a.n_tiles);
      }
    }
    cp_async_commit();
  }

  __device__ static __forceinline__ void store_scales(Loader& L, unsigned char* stage) {
    if constexpr (C::kScaled) {
      if (L.pending) {
        uint32_t* sS = reinterpret_cast<uint32_t*>(stage + C::A_BYTES + C::B_BYTES);
        uint32_t* sZ = reinterpret_cast<uint32_t*>(stage + C::A_BYTES + C::B_BYTES + C::S_BYTES);
        const int tid = fresh_tid();
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int idx = tau(tid + C::kThreads * r);
#pragma unroll
          for (int kc = 0; kc < C::KC; ++kc) {
            sS[kc * C::BN + idx] = dup16(uint16_t(L.sreg[r] >> (16 * kc)));
            if constexpr (C::kBias)
              sZ[kc * C::BN + idx] = Dec::bias_word(P::to_float(uint16_t(L.zreg[r] >> (16 * kc))));
          }
        }
        L.pending = false;
      }
    }
  }

  // Per-lane constant offsets into a stage.
  struct LaneOffsets {
    int a;      // A: row g, column 16c (bytes)
    int b[4];   // B: per jj = j % 4, within a segment (bytes)
    int s;      // S / Z: word index 64w + 8g
  };

  template <int MT>
  __device__ static __forceinline__ void compute(const unsigned char* stage, const LaneOffsets& lo,
                                                 float (&acc)[4][8][4]) {
    const unsigned char* sA = stage;
    const unsigned char* sB = stage + C::A_BYTES;
    const uint32_t* sS = reinterpret_cast<const uint32_t*>(stage + C::A_BYTES + C::B_BYTES);
    const uint32_t* sZ = reinterpret_cast<const uint32_t*>(stage + C::A_BYTES + C::B_BYTES + C::S_BYTES);
#pragma unroll
    for (int kc = 0; kc < C::KC; ++kc) {
      uint4 A[MT][2];
#pragma unroll
      for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          A[mi][h] = *reinterpret_cast<const uint4*>(sA + kc * (C::BM * 64) + (16 * mi + 8 * h) * 64 + lo.a);
      const unsigned char* seg = sB + (kc / C::KCG) * (C::BN * C::SRB) + (kc % C::KCG) * (4 * C::kBits);
#pragma unroll
      for (int J = 0; J < 2; ++J) {
        uint4 S = make_uint4(0, 0, 0, 0), Z = make_uint4(0, 0, 0, 0);
        if constexpr (C::kScaled) S = *reinterpret_cast<const uint4*>(sS + kc * C::BN + lo.s + 4 * J);
        if constexpr (C::kBias) Z = *reinterpret_cast<const uint4*>(sZ + kc * C::BN + lo.s + 4 * J);
        const uint32_t* Sv = reinterpret_cast<const uint32_t*>(&S);
        const uint32_t* Zv = reinterpret_cast<const uint32_t*>(&Z);
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          const raw_t raw = *reinterpret_cast<const raw_t*>(seg + lo.b[jj] + J * 32 * C::SRB);
          uint32_t bf[4];
          Dec::decode(raw, Sv[jj], C::kBias ? Zv[jj] : Dec::kSymBias, bf);
#pragma unroll
          for (int s = 0; s < 2; ++s)
#pragma unroll
            for (int mi = 0; mi < MT; ++mi) {
              const uint32_t* a0 = reinterpret_cast<const uint32_t*>(&A[mi][0]);
              const uint32_t* a1 = reinterpret_cast<const uint32_t*>(&A[mi][1]);
              mma16816<Act>(acc[mi][4 * J + jj], a0[2 * s], a1[2 * s], a0[2 * s + 1], a1[2 * s + 1],
                            bf[2 * s], bf[2 * s + 1]);
            }
        }
      }
    }
  }

  template <int MT>
  __device__ static __forceinline__ void store_tile(const Args& a, const Item& it, float (&acc)[4][8][4]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, c = lane & 3;
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = 16 * mi + 8 * h + g;
        if (r >= it.rows) continue;
        uint16_t* orow = a.out + int64_t(it.tok0 + r) * a.N;
#pragma unroll
        for (int J = 0; J < 2; ++J) {
          const int n = it.n0 + 64 * warp + 32 * J + 8 * c;
          uint32_t v[4];
#pragma unroll
          for (int jj = 0; jj < 4; ++jj) v[jj] = P::pack(acc[mi][4 * J + jj][2 * h], acc[mi][4 * J + jj][2 * h + 1]);
          if (a.vec_out && n + 8 <= a.N) {
            *reinterpret_cast<uint4*>(orow + n) = make_uint4(v[0], v[1], v[2], v[3]);
          } else {
#pragma unroll
            for (int e = 0; e < 8; ++e)
              if (n + e < a.N) orow[n + e] = uint16_t(v[e >> 1] >> (16 * (e & 1)));
          }
        }
      }
  }

  // The k loop of one item with MT m16 fragments, continuing the pipeline.
  template <int MT>
  __device__ static __forceinline__ void run_item(const Args& a, Loader& L, unsigned char* smem, int& slot,
                                                  int& ld_slot, int total, const int* s_tok,
                                                  const int* s_items, const LaneOffsets& lo,
                                                  float (&acc)[4][8][4]) {
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[mi][j][q] = 0.0f;
    for (int kt = 0; kt < a.k_tiles; ++kt) {
      cp_async_wait<C::STAGES - 2>();
      __syncthreads();
      unsigned char* ld_stage = smem + ld_slot * C::STAGE;
      issue(a, L, ld_stage, total, s_tok, s_items);
      compute<MT>(smem + slot * C::STAGE, lo, acc);
      store_scales(L, ld_stage);
      slot = slot + 1 == C::STAGES ? 0 : slot + 1;
      ld_slot = ld_slot + 1 == C::STAGES ? 0 : ld_slot + 1;
    }
  }
};

template <class Act, class Enc>
__global__ void __launch_bounds__(128, 2) prefill_kernel(const Args a) {
  using K = Kernel<Act, Enc>;
  using C = typename K::C;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // ---- schedule: clamped token ranges and item prefix sums, per CTA.
  int* s_tok = reinterpret_cast<int*>(smem + C::STAGES * C::STAGE);  // [E + 1]
  int* s_items = s_tok + (a.E + 1);                                   // [E + 1]
  long long* scratch = reinterpret_cast<long long*>(smem);            // pipeline buffers are free now
  {
    const int per = (a.E + C::kThreads - 1) / C::kThreads;
    const int i0 = min(a.E, tid * per), i1 = min(a.E, i0 + per);
    long long sum = 0;
    for (int i = i0; i < i1; ++i) sum += max(a.counts[i], 0);
    long long off = block_exclusive_scan<long long>(sum, scratch);
    for (int i = i0; i < i1; ++i) {
      s_tok[i] = int(min(off, (long long)a.T));
      off += max(a.counts[i], 0);
    }
    if (tid == C::kThreads - 1) s_tok[a.E] = int(min(off, (long long)a.T));
    __syncthreads();
    int isum = 0;
    for (int i = i0; i < i1; ++i) isum += (s_tok[i + 1] - s_tok[i] + C::BM - 1) / C::BM * a.n_tiles;
    int ioff = block_exclusive_scan<int>(isum, reinterpret_cast<int*>(scratch));
    for (int i = i0; i < i1; ++i) {
      s_items[i] = ioff;
      ioff += (s_tok[i + 1] - s_tok[i] + C::BM - 1) / C::BM * a.n_tiles;
    }
    if (tid == C::kThreads - 1) s_items[a.E] = ioff;
    __syncthreads();
  }
  const int total = s_items[a.E];
  const int covered = s_tok[a.E];

  // ---- per-lane offsets.
  typename K::LaneOffsets lo;
  {
    const int g = lane >> 2, c = lane & 3, ga = g >> 1, gb = g & 1;
    lo.a = g * 64 + 16 * c;
    const int row0 = 64 * warp + 8 * ga + 2 * ga + gb;  // sigma(row of fragment 0)
    const int base = row0 * C::SRB + c * C::kBits;
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) lo.b[jj] = base ^ (2 * jj * C::SRB);
    lo.s = 64 * warp + 8 * g;
  }

  // ---- pipeline prologue.
  typename K::Loader L;
  L.item = blockIdx.x;
  L.kt = 0;
  L.pending = false;
  if (L.item < total) L.it = decode_item<C>(L.item, s_tok, s_items, a.E, a.n_tiles);
#pragma unroll 1
  for (int s = 0; s < C::STAGES - 1; ++s) {
    K::issue(a, L, smem + s * C::STAGE, total, s_tok, s_items);
    K::store_scales(L, smem + s * C::STAGE);
  }
  int slot = 0, ld_slot = C::STAGES - 1;

  float acc[4][8][4];
#pragma unroll 1
  for (int item = blockIdx.x; item < total; item += gridDim.x) {
    const Item it = decode_item<C>(item, s_tok, s_items, a.E, a.n_tiles);
    const int mt = (it.rows + 15) >> 4;
    switch (mt) {
      case 1:
        K::template run_item<1>(a, L, smem, slot, ld_slot, total, s_tok, s_items, lo, acc);
        K::template store_tile<1>(a, it, acc);
        break;
      case 2:
        K::template run_item<2>(a, L, smem, slot, ld_slot, total, s_tok, s_items, lo, acc);
        K::template store_tile<2>(a, it, acc);
        break;
      case 3:
        K::template run_item<3>(a, L, smem, slot, ld_slot, total, s_tok, s_items, lo, acc);
        K::template store_tile<3>(a, it, acc);
        break;
      default:
        K::template run_item<4>(a, L, smem, slot, ld_slot, total, s_tok, s_items, lo, acc);
        K::template store_tile<4>(a, it, acc);
        break;
    }
  }
  cp_async_wait<0>();

  // ---- rows no expert covers are zero.
  if (covered < a.T) {
    const int64_t n_zero = int64_t(a.T - covered) * a.N;
    uint16_t* base = a.out + int64_t(covered) * a.N;
    for (int64_t i = int64_t(blockIdx.x) * C::kThreads + tid; i < n_zero; i += int64_t(gridDim.x) * C::kThreads)
      base[i] = 0;
  }
}

// ---------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------
inline int ceil_div(int64_t a, int64_t b) { return int((a + b - 1) / b); }

template <class Act, class Enc>
bool launch(const MoeGemmParams& p, cudaStream_t stream, Status* status) {
  using C = Cfg<Act, Enc>;
  const auto kernel = prefill_kernel<Act, Enc>;

  // Per-device facts, computed once (attribute calls are not stream work, so
  // the first call may also happen inside a graph capture).
  constexpr int kMaxDevices = 64;
  struct DeviceInfo {
    int sms = 0, per_sm = 0, smem_optin = 0, major = 0;
  };
  static DeviceInfo info[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
    cudaGetLastError();
    return false;
  }
  const int64_t sched_bytes = 8 * (p.num_experts + 1);
  const int64_t smem_bytes = int64_t(C::STAGES) * C::STAGE + sched_bytes;
  std::call_once(once[dev], [&] {
    DeviceInfo d;
    cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev);
    cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev);
    // Allow the largest dynamic shared memory this device offers; residency
    // is then asked per call for the actual size.
    if (d.major >= 8) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, d.smem_optin);
    cudaGetLastError();
    info[dev] = d;
  });
  const DeviceInfo& d = info[dev];
  if (d.major < 8 || d.sms <= 0 || smem_bytes > d.smem_optin) return false;

  // Resident CTAs per SM for this shared-memory size (it varies with E
  // only); the last answer per device is cached.
  static std::atomic<int64_t> occ_cache[kMaxDevices];
  int per_sm = 0;
  const int64_t cached = occ_cache[dev].load(std::memory_order_relaxed);
  if (cached > 0 && (cached >> 8) == smem_bytes) {
    per_sm = int(cached & 0xff);
  } else {
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, C::kThreads, size_t(smem_bytes)) !=
            cudaSuccess ||
        per_sm < 1) {
      cudaGetLastError();
      return false;
    }
    occ_cache[dev].store((smem_bytes << 8) | std::min(per_sm, 255), std::memory_order_relaxed);
  }

  Args a;
  a.act = static_cast<const uint16_t*>(p.activations);
  a.w = static_cast<const uint8_t*>(p.weights);
  a.scales = static_cast<const uint16_t*>(p.scales);
  a.zeros = static_cast<const uint16_t*>(p.zeros);
  a.counts = p.tokens_per_expert;
  a.out = static_cast<uint16_t*>(p.out);
  a.E = int(p.num_experts);
  a.N = int(p.n);
  a.K = int(p.k);
  a.T = int(p.total_tokens);
  a.kp = packed_k(p.weight_type, p.k) * (Enc::kBits == 16 ? 2 : 1);
  a.groups = C::kScaled ? int(p.k / p.group_size) : 1;
  const uint32_t gs32 = C::kScaled ? uint32_t(p.group_size / 32) : 1u;
  // umulhi(x, ceil(2^32 / d)) == x / d whenever x * d < 2^32 (here x < K / 32).
  a.gdiv = gs32 == 1 ? 0u : uint32_t(((uint64_t(1) << 32) + gs32 - 1) / gs32);
  a.n_tiles = ceil_div(p.n, C::BN);
  a.k_tiles = ceil_div(p.k, C::BK);
  a.vec_out = (p.n % 8 == 0) && (reinterpret_cast<uintptr_t>(p.out) % 16 == 0);

  // Work items: at most n_tiles * (ceil(T / BM) + E); the grid never exceeds
  // what can be resident, nor the items that can exist.
  const int64_t max_items = int64_t(a.n_tiles) * ((p.total_tokens + C::BM - 1) / C::BM + p.num_experts);
  const int64_t resident = int64_t(d.sms) * per_sm;
  const int grid = int(std::max<int64_t>(1, std::min(max_items, resident)));
  prefill_kernel<Act, Enc><<<grid, C::kThreads, size_t(smem_bytes), stream>>>(a);
  *status = launch_status("prefill MoE kernel launch");
  return true;
}

// One activation type's encodings (instantiated in prefill_f16.cu / prefill_bf16.cu).
template <class Act>
bool launch_for_act(const MoeGemmParams& p, cudaStream_t stream, Status* status) {
  bool launched = false;
  visit_encoding(p.act_type, p.weight_type, p.asym, [&](auto act, auto enc) {
    if constexpr (std::is_same_v<decltype(act), Act>)
      launched = launch<Act, decltype(enc)>(p, stream, status);
  });
  return launched;
}

}  // namespace qmoe::cuda::prefill
