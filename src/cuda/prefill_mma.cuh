// The CUDA prefill path: a persistent tensor-core grouped GEMM with the
// weight decode fused into the main loop (mma.sync.m16n8k16, f32 accumulate;
// runs on sm_80 and sm_90). One kernel template on <Act, Enc> for every
// encoding; the per-encoding part is the register decode of prefill_decode.cuh.
//
// Problem: out[t, n] = sum_k act[t, k] * W_e[n, k] for the rows t of expert e;
// activations [T, K] and weights [E, N, K_packed] (ARK layout), read as they
// are: no dequantized copy of the weights exists anywhere.
//
// Operands. Weights are the A operand of the mma (16 weight rows per m16
// fragment, decoded into registers, which can be built in the register order
// the instruction wants), tokens the B operand (8 tokens per n8 fragment).
//
// Tiles. A work item is (expert, 128-token tile, 256-row n tile -- or 128-row
// under the small-tile schedule, see the tuning log and the kernel's warp
// shapes); a CTA of 8 warps computes it. Tiles of more than 64 tokens: warp (h, r) owns weight
// rows [64r, 64r+64) and tokens [64h, 64h+64) (4 m16 x 8 n8 fragments, 128
// fp32 accumulators per lane). Tiles of at most 64 tokens: warp w owns rows
// [32w, 32w+32) and every token, with 1, 2, 4 or 8 n8 fragments as the tile
// needs, so small experts keep all warps busy and pay no padding to 64.
// (The kernel is also written for 16 warps -- 64 x 32 warp tiles -- but that
// layout measured slower and is not instantiated; see kPrefillWarps.)
// The k loop runs over k tiles of BK = 64 (32 for 16-bit weights) brought into
// shared memory by a multi-stage cp.async pipeline (tokens, packed weights,
// and the raw scale / zero words, which each loader thread converts for its
// weight row one iteration before use; through registers by plain loads
// where the group count is odd).
//
// k order (quantized weights). The order of k inside a 32-wide k chunk is
// free for a dot product as long as both operands agree. Lane (g = lane/4,
// c = lane%4) takes k = 8c..8c+7 of the chunk: step s maps fragment slots
// {2c, 2c+1, 2c+8, 2c+9} to k = 8c + 4s + {0, 1, 2, 3}. A lane's codes of a
// weight row are then Enc::kBits contiguous bytes (one load) and its token
// fragment one 16-byte load. 16-bit weights keep the natural k order and use
// ldmatrix for both operands (swizzled 16-byte chunks).
//
// [E, K, N] weights (moe_gemm's 16-bit layout; the KN variant, a template
// argument, so the [E, N, K] kernels keep their code and registers): a stage
// holds the tile's 32 k rows of 256 (128) columns, k-major as in memory,
// copied by cp.async in 16-byte chunks of 8 columns (chunk j of k row r at
// j ^ (r & 7): the 8 rows of an ldmatrix in distinct banks); ldmatrix .trans
// turns each 8 k x 8 n matrix into the A fragment of 8 weight rows. Those
// rows are 8 contiguous columns (not the strided rows below), so a lane's
// outputs are 8 columns apart: the epilogue applies the optional per-column
// scale and pairs adjacent columns of two lanes by one shuffle (4-byte
// stores). Needs N % 8 == 0 (whole 16-byte chunks).
//
// Weight rows. Lane g of an m16 fragment holds weight rows rowbase + 8g + t
// (4 fragments) or rowbase + 4g + t (2 fragments), t = 2*mi + (fragment row
// >= 8): a lane's accumulators are 8 (4) contiguous outputs of a token, one
// 16-byte (8-byte) store. In shared memory weight row n sits at sigma(n) =
// n ^ ((n >> 3) & 7), which puts the rows a warp reads together in distinct
// banks.
//
// Schedule. Persistent grid (SMs x resident CTAs). Each CTA computes, from the
// device-side counts, the clamped token range of every expert (like
// common.cuh's expert_range) and the prefix sum of work items in shared
// memory, chooses 256- or 128-row n tiles from the item count (the same
// answer in every CTA), then strides over the items. Experts with no tokens
// have no items.
// The pipeline runs across item boundaries. No host sync, no allocation: the
// launch is graph-capturable. Rows that no expert covers (counts summing to
// less than T) are written as zeros.
//
// Tuning log (predictions written before the GPU run; baseline H100
// 2026-11-27, int4 Mixtral w13 8 warps: 229 registers, issue active 39%,
// stalls per issued instruction: dependent 1.23, tensor busy 0.93, global
// load 0.87 (the scale loads), dispatch 0.36, barrier 0.19).
//  1. Scales and zeros by cp.async (scale_async). Before: each loader thread
//     read its row's scale (and zero) with plain loads into registers and
//     stored them to shared memory at the end of the same k tile; the warp
//     stalled on the load there (0.87 / instruction). Now the 4-byte word
//     that holds the groups of both k chunks of the tile (groups g0 & ~1,
//     g0 | 1) is copied by cp.async with the stage's other data, STAGES - 1
//     tiles ahead, and turned into the per-chunk words (scale pair, asym bias)
//     by the same thread one iteration before the stage is read. Needs an
//     even group count and 4-byte aligned scales / zeros (every model shape);
//     otherwise the plain-load path runs. Predicted: the global-load stall
//     leaves the int4 / int8 / int2 / fp8 profiles (~0.8 of ~4.6 stall cycles
//     per instruction): +10-20% on the compute-bound Mixtral rows, less where
//     the weights' bytes bound the row. bf16 weights: unchanged.
//     Restore: QMOE_PREFILL_SCALES=ldg.
//  2. Small-tile schedule (128-row weight tiles), chosen on the device from
//     the counts, the same in every CTA: when the 256-row items fill less
//     than two waves of the grid and halving the tiles shortens the busiest
//     CTA's list, or N <= 128. Warps then take 32 weight rows x 64 tokens
//     (tiles of > 64 tokens) or 32 x 32 (2 x NJ fragments, NJ 8/4/2/1/0):
//     each weight is still decoded once per 64 tokens (> 64) or once (<= 64),
//     the shapes already instantiated for 256-row tiles are reused, one call
//     site per shape (compile time: -15% against before, not +80% as with
//     separate call sites). Predicted: the uneven (8, 4096, 4096, 610) row
//     has ~176 items of 256 rows on 132 SMs (the busiest CTA does 2, most
//     1-2 -> ~1.33 waves at full cost); 352 items of 128 rows take 3 half
//     items at most: busiest CTA -25% of its work, the row +15-30%. Rows
//     with >= 2 waves of items (Mixtral, 8192 tokens) keep 256-row tiles:
//     unchanged. Rows that fill exactly one wave (128 items: ark 252, 528
//     even) keep 256-row tiles (no gain from halving). Restore:
//     QMOE_PREFILL_TILES=256 (=128 forces the small tiles).
//  3. Not done: 2 CTAs per SM (<= 128 registers for 8 warps) cannot hold the
//     64 x 64 warp tile's 128 fp32 accumulators per lane; 16 warps (64 x 32)
//     measured slower (see kPrefillWarps). SASS of the int4 4 x 8 k loop
//     (sm_90a): 819 instructions for 128 HMMA, of them ~272 decode (PRMT,
//     LOP3, HFMA2, HMUL2, SHF: 2.1 per HMMA, minimal for the natural nibble
//     order: the tokens' 16-byte k order fixes the register pairs) and ~330
//     loader / loop (IMAD 127, ISETP 41, SEL 26, LEA 21...; executed once per
//     k tile per warp, the item change branches rarely): the next step is a
//     loader with per-item base offsets and per-tile increments (est. -150
//     instructions per k tile, ~-1 per HMMA; matters only where issue-bound).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "cuda/prefill_decode.cuh"
#include "cuda/prefill_schedule.h"

namespace qmoe::cuda::prefill {

// ---------------------------------------------------------------------------
// Compile-time configuration per (Act, Enc).
// ---------------------------------------------------------------------------
template <class Act, class Enc, int Warps>
struct Cfg {
  static constexpr int kBits = Enc::kBits;  // 2, 4, 8, 16
  static constexpr bool kScaled = Enc::kScaled;
  static constexpr bool kBias = Enc::kAsym;
  static constexpr bool kNative = kBits == 16;      // ldmatrix path, natural k order
  static constexpr int KC = kNative ? 1 : 2;        // 32-wide k chunks per k tile
  static constexpr int BK = 32 * KC;
  static constexpr int BM = 128, BN = 256, kWarps = Warps, kThreads = 32 * Warps;
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
  // One CTA per SM; leave room for the schedule arrays (8 bytes per expert).
  static constexpr int STAGES_RAW = (200 * 1024) / STAGE;
  static constexpr int STAGES = STAGES_RAW > 8 ? 8 : (STAGES_RAW < 2 ? 2 : STAGES_RAW);
  static constexpr int A_ITERS = BM * 4 * KC / kThreads;            // 16-byte token chunks per thread
  static constexpr int B_ITERS = (BN * CPR + kThreads - 1) / kThreads;  // 16-byte weight chunks per thread
  static constexpr bool B_EXACT = (BN * CPR) % kThreads == 0;
  static_assert(CPR >= 1 && A_ITERS >= 1 && (BM * 4 * KC) % kThreads == 0, "chunks");
  static_assert(B_EXACT || BN * CPR < kThreads, "weight chunks");
  static_assert(KC % KCG == 0, "segments");
  using Dec = PrefillDecode<Act, Enc>;
  using raw_t = typename Dec::raw_t;
  static_assert(sizeof(raw_t) == kBits, "a lane reads bits bytes per row per k chunk");
};

enum { kScalesAuto = 0, kScalesLdg = 1 };              // scale_path_override()
enum { kTilesAuto = 0, kTiles256 = 1, kTiles128 = 2 };  // tile_override(), Args::tile_mode

struct Args {
  const uint16_t* act;
  const uint8_t* w;
  const uint16_t* col_scales;  // [E, K, N] weights (KN): optional per-column scales [E, N], else null
  const uint16_t* scales;
  const uint16_t* zeros;
  const int32_t* counts;
  uint16_t* out;
  int E, N, K, T;
  int64_t kp;        // packed bytes per weight row
  int groups;        // K / group_size
  uint32_t gdiv;     // ceil(2^32 / (group_size / 32)), 0 for group_size 32: chunk -> group
  int n_tiles, k_tiles;  // n tiles of BN (256) rows, k tiles
  int n_tiles128;        // n tiles of 128 rows (small-tile schedule)
  int tile_mode;         // kTilesAuto, kTiles256, kTiles128
  int vec_out;       // vector output stores allowed (N % 8 == 0, aligned out)
  int scale_async;   // scales / zeros by cp.async (4-byte words; groups even, aligned), else plain loads
};

// ---------------------------------------------------------------------------
// PTX helpers.
// ---------------------------------------------------------------------------
// The group of 32-wide k chunk `chunk` (group_size / 32 chunks a group) by a
// multiply: umulhi(x, ceil(2^32 / d)) == x / d whenever x * d < 2^32, which
// launch_prefill's rules keep (K / 32 * group_size / 32 < 2^32); gdiv 0 for
// groups of one chunk.
inline uint32_t group_divisor(int64_t group_size) {
  const uint64_t d = uint64_t(group_size / 32);
  return d <= 1 ? 0u : uint32_t(((uint64_t(1) << 32) + d - 1) / d);
}
__device__ __forceinline__ uint32_t chunk_group(uint32_t chunk, uint32_t gdiv) {
  return gdiv ? __umulhi(chunk, gdiv) : chunk;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// 4 bytes (cp.async.ca: sizes below 16 go through L1); both addresses 4-byte aligned.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
// The same, each 8 x 8 matrix transposed (rows of shared memory become
// columns of the fragment): for operands stored k-major, e.g. [K, N] weights.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr)
               : "memory");
  r[2] = r[3] = 0;
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

// Shared-memory row of weight row n (0..255) of the n tile: the low three
// bits are xor-ed with the next three, so the rows 8g + t or 4g + t (g =
// 0..7) that the lanes of a warp read together fall in distinct banks.
__device__ __forceinline__ int sigma(int n) { return n ^ ((n >> 3) & 7); }
// 16-byte chunk q (0..3) of a 64-byte row r of the ldmatrix (16-bit) layouts.
__device__ __forceinline__ int swz(int r, int q) { return q ^ ((r >> 1) & 3); }

// Token fragments (n8) computed for `rows` (>= 1) tokens: 1, 2, 4 or 8.
__device__ __forceinline__ int token_frags(int rows) { return rows <= 8 ? 1 : rows <= 16 ? 2 : rows <= 32 ? 4 : 8; }
// Token rows of a tile that the warps read (the rest of the tile is not
// loaded): up to the last n8 fragment computed. Tiles of more than 64 tokens
// are split over the warps in token groups of 64 (8 warps) or 32 (16 warps).
template <int Warps>
__device__ __forceinline__ int padded_rows(int rows) {
  if (rows <= 64) return 8 * token_frags(rows);
  if constexpr (Warps == 8) return rows - 64 > 32 ? 128 : 96;  // second half: 4 or 8 fragments
  const int last = (rows - 1) / 32 * 32;                       // last group: 1, 2 or 4 fragments
  return last + 8 * token_frags(rows - last);
}

// The schedule both prefill kernels build in shared memory from the device
// counts, every CTA the same: s_tok[e] = the clamped first token of expert e
// (s_tok[E] = the tokens covered), s_items[e] = token tiles of BM tokens of
// the experts before e. Returns s_items[E] on thread kThreads - 1 (which also
// stores it). The caller sets s_items[E + 1], [E + 2] (see decode_item) and
// synchronises. `scratch` holds a block scan (one long long a warp).
// The experts [i0, i1) this thread handles when a block of kThreads walks
// all E of them (contiguous runs of about E / kThreads).
template <int kThreads>
__device__ __forceinline__ int2 expert_range(int E) {
  const int per = (E + kThreads - 1) / kThreads;
  const int i0 = min(E, int(threadIdx.x) * per);
  return make_int2(i0, min(E, i0 + per));
}
// s_tok[e] for e <= E (see build_schedule) from a block scan of the counts.
// Ends with a barrier.
template <int kThreads>
__device__ __forceinline__ void build_token_ranges(const int32_t* counts, int E, int64_t T, int* s_tok,
                                                   long long* scratch) {
  const auto [i0, i1] = expert_range<kThreads>(E);
  long long sum = 0;
  for (int i = i0; i < i1; ++i) sum += max(counts[i], 0);
  long long off = block_exclusive_scan<long long>(sum, scratch);
  for (int i = i0; i < i1; ++i) {
    s_tok[i] = int(min(off, (long long)T));
    off += max(counts[i], 0);
  }
  if (threadIdx.x == kThreads - 1) s_tok[E] = int(min(off, (long long)T));
  __syncthreads();
}

template <int kThreads, int BM>
__device__ __forceinline__ int build_schedule(const int32_t* counts, int E, int64_t T, int* s_tok, int* s_items,
                                              long long* scratch) {
  const int tid = threadIdx.x;
  build_token_ranges<kThreads>(counts, E, T, s_tok, scratch);
  const auto [i0, i1] = expert_range<kThreads>(E);
  int isum = 0;
  for (int i = i0; i < i1; ++i) isum += (s_tok[i + 1] - s_tok[i] + BM - 1) / BM;
  int ioff = block_exclusive_scan<int>(isum, reinterpret_cast<int*>(scratch));
  for (int i = i0; i < i1; ++i) {
    s_items[i] = ioff;
    ioff += (s_tok[i + 1] - s_tok[i] + BM - 1) / BM;
  }
  if (tid == kThreads - 1) s_items[E] = ioff;
  return ioff;
}

// s_items[e]: token tiles of the experts before e; s_items[E + 1], [E + 2]:
// the schedule's n tiles per token tile and rows per n tile (256 or 128).
// Item i: expert e with s_items[e] * nt <= i < s_items[e + 1] * nt, then n
// tile major, token tile minor within the expert.
template <class C>
__device__ __forceinline__ Item decode_item(int item, const int* s_tok, const int* s_items, int E) {
  const int ntiles = s_items[E + 1];
  const int lo = expert_of(s_items, E, ntiles, item);
  Item it;
  it.e = lo;
  it.bn = s_items[E + 2];
  const int tb = s_tok[lo], te = s_tok[lo + 1];
  const int mt = (te - tb + C::BM - 1) / C::BM;
  const int local = item - s_items[lo] * ntiles;
  const int nt = local / mt;
  const int mtile = local - nt * mt;
  it.tok0 = tb + mtile * C::BM;
  it.rows = min(C::BM, te - it.tok0);
  it.n0 = nt * it.bn;
  return it;
}

// ---------------------------------------------------------------------------
// The kernel.
// ---------------------------------------------------------------------------
// KN: 16-bit weights in moe_gemm's [E, K, N] layout (a compile-time variant,
// so the [E, N, K] kernels keep their code and registers; see the top).
template <class Act, class Enc, int Warps, bool KN = false>
struct Kernel {
  using C = Cfg<Act, Enc, Warps>;
  static_assert(!KN || C::kNative, "[E, K, N] is 16-bit only");
  using Dec = typename C::Dec;
  using P = Pair<Act>;
  using raw_t = typename C::raw_t;

  // Per-thread loader state: the next (item, k tile) to bring in.
  struct Loader {
    int item, kt;
    Item it;
    uint32_t sreg, zreg;  // 16-bit scale / zero of chunk kc in bits 16kc..16kc+15
    bool pending;
  };

  __device__ static __forceinline__ void issue(const Args& a, Loader& L, unsigned char* stage,
                                               int total, const int* s_tok, const int* s_items) {
    const int tid = fresh_tid();
    if (L.item < total) {
      const int kt = L.kt;
      const Item& it = L.it;
      // Tokens: BM rows x BK, 16-byte chunks (q = tid + 256 i: row q / (4 KC),
      // chunk q % (4 KC)); rows past the tile's rows are zero up to the last
      // fragment computed, and not loaded after it.
      {
        const uint32_t sA = smem_addr(stage);
        const int pad = padded_rows<C::kWarps>(it.rows);
        constexpr int CH = 4 * C::KC;  // chunks per row
        const int j = tid % CH;
        const int kcol = kt * C::BK + 8 * j;
        const bool kok = kcol < a.K;
        const uint16_t* base = a.act + int64_t(it.tok0) * a.K + (kok ? kcol : 0);
#pragma unroll
        for (int i = 0; i < C::A_ITERS; ++i) {
          const int r = tid / CH + (C::kThreads / CH) * i;
          if (r < pad) {
            const bool ok = kok && r < it.rows;
            uint32_t dst;
            if constexpr (C::kNative)
              dst = sA + r * 64 + swz(r, j) * 16;
            else
              dst = sA + (j >> 2) * (C::BM * 64) + r * 64 + (j & 3) * 16;
            cp_async16(dst, base + (ok ? int64_t(r) * a.K : 0), ok ? 16u : 0u);
          }
        }
      }
      // [E, K, N] weights: the tile's BK k rows of it.bn columns, 16-byte
      // chunks of 8 n (q = tid + 256 i: k row q / (bn / 8), chunk q % (bn /
      // 8)), chunk j of k row r at j ^ (r & 7) (the 8 k rows an ldmatrix
      // reads hit distinct banks). n past N (whole chunks: N % 8 == 0) and k
      // past K read as zero; the row offset stays inside expert e.
      if constexpr (KN) {
        const uint32_t sB = smem_addr(stage + C::A_BYTES);
        const int sh = it.bn == C::BN ? 5 : 4;  // log2 of the chunks per k row
        const int j = tid & ((1 << sh) - 1);
        const int n = it.n0 + 8 * j;
        const int k0 = kt * C::BK;
        const bool nok = n < a.N;
        const uint16_t* base =
            reinterpret_cast<const uint16_t*>(a.w) + (int64_t(it.e) * a.K + k0) * a.N + (nok ? n : 0);
#pragma unroll
        for (int i = 0; i < C::B_ITERS; ++i) {
          const int r = (tid >> sh) + (C::kThreads >> sh) * i;
          if (r >= C::BK) continue;  // 128-column tiles: half the chunks
          const bool ok = nok && k0 + r < a.K;
          cp_async16(sB + r * (2 * C::BN) + ((j ^ (r & 7)) << 4), base + (ok ? int64_t(r) * a.N : 0),
                     ok ? 16u : 0u);
        }
      } else {
        // Packed weights: BN rows x KPB bytes (q = tid + 256 i: row q / CPR,
        // chunk q % CPR); rows past N are zero.
        const uint32_t sB = smem_addr(stage + C::A_BYTES);
        const int j = tid % C::CPR;
        const int64_t kb = int64_t(kt) * C::KPB + 16 * j;
        const bool kok = kb < a.kp;
        const uint8_t* base = a.w + int64_t(it.e) * a.N * a.kp + (kok ? kb : 0);
#pragma unroll
        for (int i = 0; i < C::B_ITERS; ++i) {
          if (!C::B_EXACT && tid >= C::BN * C::CPR) break;
          const int n = tid / C::CPR + (C::kThreads / C::CPR) * i;
          if (n >= it.bn) continue;  // 128-row tiles: rows 128.. are not read
          const int row = it.n0 + n;
          const bool ok = kok && row < a.N;
          const int sn = sigma(n);
          uint32_t dst;
          if constexpr (C::kNative) {
            dst = sB + sn * 64 + swz(sn, j) * 16;
          } else {
            constexpr int CPS = C::SRB / 16;  // chunks per segment
            dst = sB + (j / CPS) * (C::BN * C::SRB) + sn * C::SRB + (j % CPS) * 16;
          }
          cp_async16(dst, base + (ok ? int64_t(row) * a.kp : 0), ok ? 16u : 0u);
        }
      }
      // Scales and zero points of this k tile's groups (thread = weight row).
      // Async path: the 4-byte word holding the groups of both k chunks
      // (group g0 & ~1 and g0 | 1, see scale_halves) is copied raw into the
      // stage's chunk-0 words; convert_scales turns it into the per-chunk
      // words one iteration before the stage is consumed.
      if (C::kScaled && a.scale_async && tid < it.bn) {
        const int row = min(it.n0 + tid, a.N - 1);
        const uint32_t chunk = uint32_t(kt * C::KC);
        const int word = int(chunk_group(chunk, a.gdiv)) & ~1;
        const int64_t off = (int64_t(it.e) * a.N + row) * a.groups + word;
        const uint32_t sS = smem_addr(stage + C::A_BYTES + C::B_BYTES) + 4 * tid;
        cp_async4(sS, a.scales + off);
        if constexpr (C::kBias) cp_async4(sS + C::S_BYTES, a.zeros + off);
      }
      // Plain-load path: to registers now, to shared memory after this
      // iteration's math (store_scales).
      if (C::kScaled && !a.scale_async && tid < it.bn) {
        const int row = min(it.n0 + tid, a.N - 1);
        const uint16_t* srow = a.scales + (int64_t(it.e) * a.N + row) * a.groups;
        const uint16_t* zrow = a.zeros + (int64_t(it.e) * a.N + row) * a.groups;
#pragma unroll
        for (int kc = 0; kc < C::KC; ++kc) {
          const uint32_t chunk = uint32_t(kt * C::KC + kc);
          const int grp = min(int(chunk_group(chunk, a.gdiv)), a.groups - 1);
          const uint32_t sv = __ldg(srow + grp);
          L.sreg = kc == 0 ? sv : (L.sreg | (sv << 16));
          if constexpr (C::kBias) {
            const uint32_t zv = __ldg(zrow + grp);
            L.zreg = kc == 0 ? zv : (L.zreg | (zv << 16));
          }
        }
        L.pending = true;
      }
      if (++L.kt == a.k_tiles) {
        L.kt = 0;
        L.item += gridDim.x;
        if (L.item < total) L.it = decode_item<C>(L.item, s_tok, s_items, a.E);
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
        for (int kc = 0; kc < C::KC; ++kc) {
          if (C::kThreads > C::BN && tid >= C::BN) break;
          sS[kc * C::BN + tid] = dup16(uint16_t(L.sreg >> (16 * kc)));
          if constexpr (C::kBias) sZ[kc * C::BN + tid] = Dec::bias_word(P::to_float(uint16_t(L.zreg >> (16 * kc))));
        }
        L.pending = false;
      }
    }
  }

  // Async scale path: which half (0 low, 1 high) of the raw word of k tile kt
  // holds the group of chunk 0 and of chunk 1. The word holds groups
  // (g0 & ~1, g0 | 1); g1 is g0 or g0 + 1, and when it is g0 + 1, g0 is
  // even (chunks 2kt and 2kt + 1 straddle a group boundary only if
  // 2kt + 1 = m (g0 + 1), m = group_size / 32: m and g0 + 1 odd, or m = 1).
  __device__ static __forceinline__ void scale_halves(const Args& a, int kt, uint32_t& h0, uint32_t& h1) {
    const uint32_t c0 = uint32_t(kt * C::KC);
    const uint32_t g0 = chunk_group(c0, a.gdiv);
    const uint32_t g1 = chunk_group(c0 + 1, a.gdiv);
    h0 = g0 & 1u;
    h1 = g1 - (g0 & ~1u);
  }

  // Async scale path: the raw words of one stage (this thread's row, its own
  // cp.async, complete) into the words the math reads: the scale pair per
  // chunk, and for asym the bias word per chunk. Runs for the stage consumed
  // next, after this iteration's math (the next barrier orders it before the
  // reads). Stages past the last item hold stale words: converted, unread.
  __device__ static __forceinline__ void convert_scales(const Args& a, unsigned char* stage, int kt) {
    static_assert(!C::kScaled || C::KC == 2, "two k chunks per tile");
    if constexpr (C::kScaled) {
      const int tid = fresh_tid();
      if (C::kThreads > C::BN && tid >= C::BN) return;
      uint32_t h0, h1;
      scale_halves(a, kt, h0, h1);
      const uint32_t sel0 = h0 ? 0x3232u : 0x1010u, sel1 = h1 ? 0x3232u : 0x1010u;
      uint32_t* sS = reinterpret_cast<uint32_t*>(stage + C::A_BYTES + C::B_BYTES);
      const uint32_t s = sS[tid];
      sS[tid] = __byte_perm(s, 0u, sel0);
      sS[C::BN + tid] = __byte_perm(s, 0u, sel1);
      if constexpr (C::kBias) {
        uint32_t* sZ = reinterpret_cast<uint32_t*>(stage + C::A_BYTES + C::B_BYTES + C::S_BYTES);
        const uint32_t z = sZ[tid];
        sZ[tid] = Dec::bias_word(P::to_float(uint16_t(z >> (16 * h0))));
        sZ[C::BN + tid] = Dec::bias_word(P::to_float(uint16_t(z >> (16 * h1))));
      }
    }
  }

  // Weight row (within the n tile) of lane g, row t of its fragments.
  template <int MI>
  __device__ static __forceinline__ int lane_row(int row0, int g) {
    return row0 + 2 * MI * g;
  }

  // One k tile, quantized weights: per 32-wide chunk, the token fragments
  // (B operand) of the NJ n8 fragments, then per m16 fragment mi the decoded
  // weights of rows t = 2mi and 2mi+1 (fragment rows g and g+8) and NJ mma
  // per k16 step.
  template <int MI, int NJ>
  __device__ static __forceinline__ void compute_q(const unsigned char* stage, int tok_off, int row0,
                                                   float (&acc)[MI][NJ][4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const unsigned char* sA = stage + (tok_off + g) * 64 + 16 * c;
    const unsigned char* sB = stage + C::A_BYTES;
    const int nl = lane_row<MI>(row0, g);
    const int lb = sigma(nl) * C::SRB + c * C::kBits;
    const uint32_t* sS = reinterpret_cast<const uint32_t*>(stage + C::A_BYTES + C::B_BYTES) + nl;
    const uint32_t* sZ = reinterpret_cast<const uint32_t*>(stage + C::A_BYTES + C::B_BYTES + C::S_BYTES) + nl;
    // 16 warps (128 registers): one chunk at a time, so the next chunk's
    // loads are not hoisted into registers the accumulators need.
#pragma unroll(C::kWarps == 8 ? C::KC : 1)
    for (int kc = 0; kc < C::KC; ++kc) {
      uint4 X[NJ];  // tokens 8j + g, k 8c .. 8c+7: step s uses words 2s, 2s+1
#pragma unroll
      for (int j = 0; j < NJ; ++j) X[j] = *reinterpret_cast<const uint4*>(sA + kc * (C::BM * 64) + 8 * j * 64);
      const unsigned char* seg = sB + (kc / C::KCG) * (C::BN * C::SRB) + (kc % C::KCG) * (4 * C::kBits);
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        const int t0 = 2 * mi, t1 = 2 * mi + 1;
        const raw_t r0 = *reinterpret_cast<const raw_t*>(seg + (lb ^ (t0 * C::SRB)));
        const raw_t r1 = *reinterpret_cast<const raw_t*>(seg + (lb ^ (t1 * C::SRB)));
        // Scale (and bias) words of rows t0, t1: adjacent, one 8-byte load each.
        uint2 sv = make_uint2(0, 0), zv = make_uint2(Dec::kSymBias, Dec::kSymBias);
        if constexpr (C::kScaled) sv = *reinterpret_cast<const uint2*>(sS + kc * C::BN + t0);
        if constexpr (C::kBias) zv = *reinterpret_cast<const uint2*>(sZ + kc * C::BN + t0);
        uint32_t w0[4], w1[4];
        Dec::decode(r0, sv.x, zv.x, w0);
        Dec::decode(r1, sv.y, zv.y, w1);
#pragma unroll
        for (int st = 0; st < 2; ++st)
#pragma unroll
          for (int j = 0; j < NJ; ++j) {
            const uint32_t* x = reinterpret_cast<const uint32_t*>(&X[j]);
            mma16816<Act>(acc[mi][j], w0[2 * st], w1[2 * st], w0[2 * st + 1], w1[2 * st + 1], x[2 * st],
                          x[2 * st + 1]);
          }
      }
    }
  }

  // One k tile (32 wide), 16-bit weights: natural k order, ldmatrix for both
  // operands from the swizzled layouts ([E, K, N]: ldmatrix .trans for the
  // weights).
  template <int MI, int NJ>
  __device__ static __forceinline__ void compute_n(const unsigned char* stage, int tok_off, int row0,
                                                   float (&acc)[MI][NJ][4]) {
    const int lane = threadIdx.x & 31, m = lane >> 3, i = lane & 7;
    const uint32_t sA = smem_addr(stage), sB = smem_addr(stage + C::A_BYTES);
    // Weights: matrix m = (fragment row half h = m & 1, k half m >> 1), row i.
    uint32_t wb;
    if constexpr (KN) {
      // k-major tile: matrix m is k rows 8 (m >> 1) + i of the k16 step, n
      // chunk row0 / 8 + (m & 1) (fragment rows = 8 contiguous columns),
      // transposed by ldmatrix. Fragment mi is chunk + 2 mi: row0 is a
      // multiple of 16 MI, so the sum is chunk ^ 2 mi, which commutes with
      // the swizzle: an xor of 32 mi bytes.
      const int kr = 8 * (m >> 1) + i;
      wb = uint32_t(kr * (2 * C::BN) + 16 * (((row0 >> 3) + (m & 1)) ^ i));
    } else {
      const int r0 = sigma(lane_row<MI>(row0, i) + (m & 1));
      wb = uint32_t(r0 * 64 + 16 * ((m >> 1) ^ ((r0 >> 1) & 3)));
    }
    // Tokens: matrix m = (fragment j + (m >> 1), k half m & 1), row i.
    const int tr = tok_off + 8 * (m >> 1) + i;
    const uint32_t tb = uint32_t(tr * 64 + 16 * ((m & 1) ^ ((i >> 1) & 3)));
#pragma unroll
    for (int st = 0; st < 2; ++st) {
      uint32_t T[(NJ + 1) / 2][4];
#pragma unroll
      for (int jp = 0; jp < (NJ + 1) / 2; ++jp) {
        const uint32_t addr = sA + ((tb ^ (32 * st)) + 1024 * jp);
        if constexpr (NJ == 1)
          ldmatrix_x2(T[jp], addr);
        else
          ldmatrix_x4(T[jp], addr);
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        uint32_t W[4];
        if constexpr (KN)
          ldmatrix_x4_trans(W, sB + ((wb + uint32_t(st * 16 * 2 * C::BN)) ^ uint32_t(32 * mi)));
        else
          ldmatrix_x4(W, sB + (wb ^ uint32_t(128 * mi ^ 16 * (2 * st ^ mi))));
#pragma unroll
        for (int j = 0; j < NJ; ++j)
          mma16816<Act>(acc[mi][j], W[0], W[1], W[2], W[3], T[j / 2][2 * (j & 1)], T[j / 2][2 * (j & 1) + 1]);
      }
    }
  }

  // Lane (g, c) holds, for tokens tok_off + 8j + 2c + i, the outputs of weight
  // rows lane_row + t, t = 2mi + h (accumulator element 2h + i): 2 MI
  // contiguous outputs, one vector store.
  template <int MI, int NJ>
  __device__ static __forceinline__ void store_tile(const Args& a, const Item& it, int tok_off, int row0,
                                                    float (&acc)[MI][NJ][4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int n = it.n0 + lane_row<MI>(row0, g);
#pragma unroll
    for (int j = 0; j < NJ; ++j)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = tok_off + 8 * j + 2 * c + i;
        if (r >= it.rows) continue;
        uint16_t* orow = a.out + int64_t(it.tok0 + r) * a.N;
        uint32_t v[MI];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) v[mi] = P::pack(acc[mi][j][i], acc[mi][j][2 + i]);
        if (a.vec_out && n + 2 * MI <= a.N) {
          if constexpr (MI == 4)
            *reinterpret_cast<uint4*>(orow + n) = make_uint4(v[0], v[1], v[2], v[3]);
          else if constexpr (MI == 2)
            *reinterpret_cast<uint2*>(orow + n) = make_uint2(v[0], v[1]);
          else
            *reinterpret_cast<uint32_t*>(orow + n) = v[0];
        } else {
#pragma unroll
          for (int e = 0; e < 2 * MI; ++e)
            if (n + e < a.N) orow[n + e] = uint16_t(v[e >> 1] >> (16 * (e & 1)));
        }
      }
  }

  // [E, K, N]: lane (g, c) holds, for tokens tok_off + 8j + 2c + i, column
  // n0 + row0 + 16 mi + 8 h + g (accumulator element 2h + i), times the
  // optional per-column scale. Lanes g and g ^ 1 (lane ^ 4) hold adjacent
  // columns of the same two tokens: one trade and the even lane stores its
  // first token's column pair, the odd lane its second's (4-byte stores).
  template <int MI, int NJ>
  __device__ static __forceinline__ void store_tile_kn(const Args& a, const Item& it, int tok_off, int row0,
                                                       float (&acc)[MI][NJ][4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const bool odd = g & 1;
    const int nb = it.n0 + row0 + g;
    float cs[MI][2];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int n = nb + 16 * mi + 8 * h;
        cs[mi][h] = a.col_scales && n < a.N ? P::to_float(a.col_scales[int64_t(it.e) * a.N + n]) : 1.0f;
      }
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
      const int r0 = tok_off + 8 * j + 2 * c;
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int n = nb + 16 * mi + 8 * h;
          const uint32_t v = P::pack(acc[mi][j][2 * h] * cs[mi][h], acc[mi][j][2 * h + 1] * cs[mi][h]);
          if (a.vec_out) {  // N % 8 == 0: columns n and n ^ 1 are both in or both out
            const uint32_t o = __shfl_xor_sync(0xffffffffu, v, 4);
            const int r = r0 + odd;
            if (r < it.rows && n < a.N)
              *reinterpret_cast<uint32_t*>(a.out + int64_t(it.tok0 + r) * a.N + (n & ~1)) =
                  odd ? __byte_perm(o, v, 0x7632) : __byte_perm(v, o, 0x5410);
          } else {
#pragma unroll
            for (int i = 0; i < 2; ++i)
              if (r0 + i < it.rows && n < a.N) a.out[int64_t(it.tok0 + r0 + i) * a.N + n] = uint16_t(v >> (16 * i));
          }
        }
    }
  }

  // One item for this warp: MI m16 x NJ n8 fragments at (tok_off, row0),
  // continuing the pipeline (every warp runs the same k loop and barriers).
  template <int MI, int NJ>
  __device__ static __forceinline__ void run_item(const Args& a, const Item& it, int tok_off, int row0,
                                                  Loader& L, unsigned char* smem, int& slot, int& ld_slot,
                                                  int total, const int* s_tok, const int* s_items) {
    float acc[MI][NJ > 0 ? NJ : 1][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int j = 0; j < (NJ > 0 ? NJ : 1); ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[mi][j][q] = 0.0f;
#pragma unroll 1
    for (int kt = 0; kt < a.k_tiles; ++kt) {
      cp_async_wait<C::STAGES - 2>();
      __syncthreads();
      unsigned char* ld_stage = smem + ld_slot * C::STAGE;
      issue(a, L, ld_stage, total, s_tok, s_items);
      if constexpr (NJ == 0)
        ;  // a warp with no tokens in this tile only loads
      else if constexpr (C::kNative)
        compute_n<MI, NJ>(smem + slot * C::STAGE, tok_off, row0, acc);
      else
        compute_q<MI, NJ>(smem + slot * C::STAGE, tok_off, row0, acc);
      const int next = slot + 1 == C::STAGES ? 0 : slot + 1;
      if (C::kScaled && a.scale_async) {
        // The next stage (k tile kt + 1, or 0 of the next item) has landed
        // once at most STAGES - 2 groups are pending (one was committed above).
        cp_async_wait<C::STAGES - 2>();
        convert_scales(a, smem + next * C::STAGE, kt + 1 == a.k_tiles ? 0 : kt + 1);
      } else {
        store_scales(L, ld_stage);
      }
      slot = next;
      ld_slot = ld_slot + 1 == C::STAGES ? 0 : ld_slot + 1;
    }
    if constexpr (NJ > 0 && KN)
      store_tile_kn<MI, NJ>(a, it, tok_off, row0, acc);
    else if constexpr (NJ > 0)
      store_tile<MI, NJ>(a, it, tok_off, row0, acc);
  }
};

template <class Act, class Enc, int Warps, bool KN>
__global__ void __launch_bounds__(32 * Warps, 1) prefill_kernel(const Args a) {
  using K = Kernel<Act, Enc, Warps, KN>;
  using C = typename K::C;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, warp = tid >> 5;

  // ---- schedule: clamped token ranges and item prefix sums, per CTA.
  int* s_tok = reinterpret_cast<int*>(smem + C::STAGES * C::STAGE);  // [E + 1]
  int* s_items = s_tok + (a.E + 1);                                   // [E + 3]
  long long* scratch = reinterpret_cast<long long*>(smem);            // pipeline buffers are free now
  {
    const int ioff = build_schedule<C::kThreads, C::BM>(a.counts, a.E, a.T, s_tok, s_items, scratch);
    if (tid == C::kThreads - 1) {
      // Weight tile rows, the same choice in every CTA (same counts, same
      // grid): 128-row tiles when the 256-row items fill less than two
      // waves of the grid and halving them shortens the busiest CTA's list
      // (in 128-row units: ceil(I128 / G) < 2 ceil(I256 / G)), or when N <=
      // 128 (a 256-row tile would leave half the warps on zero rows).
      const long long G = gridDim.x, i256 = (long long)ioff * a.n_tiles, i128 = (long long)ioff * a.n_tiles128;
      bool small = a.N <= 128 || (i256 < 2 * G && (i128 + G - 1) / G < 2 * ((i256 + G - 1) / G));
      if (a.tile_mode == kTiles256 || C::kWarps != 8) small = false;  // (written for 8 warps only)
      if (a.tile_mode == kTiles128) small = true;
      s_items[a.E + 1] = small ? a.n_tiles128 : a.n_tiles;
      s_items[a.E + 2] = small ? 128 : C::BN;
    }
    __syncthreads();
  }
  const int total = s_items[a.E] * s_items[a.E + 1];
  const int covered = s_tok[a.E];

  // ---- pipeline prologue.
  typename K::Loader L;
  L.item = blockIdx.x;
  L.kt = 0;
  L.pending = false;
  if (L.item < total) L.it = decode_item<C>(L.item, s_tok, s_items, a.E);
#pragma unroll 1
  for (int s = 0; s < C::STAGES - 1; ++s) {
    K::issue(a, L, smem + s * C::STAGE, total, s_tok, s_items);
    K::store_scales(L, smem + s * C::STAGE);  // plain-load path (no-op otherwise)
  }
  if (C::kScaled && a.scale_async) {
    cp_async_wait<C::STAGES - 2>();  // stage 0 has landed
    K::convert_scales(a, smem, 0);
  }
  int slot = 0, ld_slot = C::STAGES - 1;

#pragma unroll 1
  for (int item = blockIdx.x; item < total; item += gridDim.x) {
    const Item it = decode_item<C>(item, s_tok, s_items, a.E);
#define QMOE_RUN(MI, NJ, TOK, ROW) \
  K::template run_item<MI, NJ>(a, it, TOK, ROW, L, smem, slot, ld_slot, total, s_tok, s_items)
    if constexpr (Warps == 8) {
      // Each warp picks its fragment shape (MI m16 x NJ n8) and origin, then
      // one call site per shape (run_item is inlined: one copy each).
      //  256-row tiles, > 64 tokens: warp (h, r): tokens [64h, 64h + 64),
      //    weight rows [64r, 64r + 64): 4 x 8 (4 x 4 for a short second half).
      //  256-row tiles, <= 64 tokens: warp w: rows [32w, 32w + 32), every
      //    token: 2 x (1, 2, 4 or 8).
      //  128-row tiles (small-tile schedule), warp (h, r): rows [32r, 32r +
      //    32), tokens [64h, 64h + 64) for > 64 tokens (2 x 8 or 2 x 4), else
      //    [32h, 32h + 32) (2 x 4, 2, 1, or 0: loads only).
      const int h = warp >> 2;
      int shape, tok, row0;  // shape: 0 = 4x8, 1 = 4x4, 2 + log2(NJ) = 2xNJ, 6 = 2x0
      if (it.bn == C::BN) {
        if (it.rows > 64) {
          shape = (h == 0 || it.rows - 64 > 32) ? 0 : 1;
          tok = 64 * h;
          row0 = 64 * (warp & 3);
        } else {
          shape = 2 + __ffs(token_frags(it.rows)) - 1;
          tok = 0;
          row0 = 32 * warp;
        }
      } else {
        row0 = 32 * (warp & 3);
        if (it.rows > 64) {
          shape = (h == 0 || it.rows - 64 > 32) ? 5 : 4;
          tok = 64 * h;
        } else {
          const int mine = it.rows - 32 * h;
          shape = mine <= 0 ? 6 : 2 + __ffs(token_frags(min(mine, 32))) - 1;
          tok = 32 * h;
        }
      }
      switch (shape) {
        case 0: QMOE_RUN(4, 8, tok, row0); break;
        case 1: QMOE_RUN(4, 4, tok, row0); break;
        case 2: QMOE_RUN(2, 1, tok, row0); break;
        case 3: QMOE_RUN(2, 2, tok, row0); break;
        case 4: QMOE_RUN(2, 4, tok, row0); break;
        case 5: QMOE_RUN(2, 8, tok, row0); break;
        default: QMOE_RUN(2, 0, tok, row0); break;
      }
    } else {
      if (it.rows > 64) {
        // Warp (h, r): tokens [32h, 32h + 32), weight rows [64r, 64r + 64).
        const int h = warp >> 2, row0 = 64 * (warp & 3), mine = it.rows - 32 * h;
        if (mine > 16)
          QMOE_RUN(4, 4, 32 * h, row0);
        else if (mine > 8)
          QMOE_RUN(4, 2, 32 * h, row0);
        else if (mine > 0)
          QMOE_RUN(4, 1, 32 * h, row0);
        else
          QMOE_RUN(4, 0, 32 * h, row0);
      } else {
        // Warp w: weight rows [16w, 16w + 16), every token of the tile.
        const int nj = token_frags(it.rows), row0 = 16 * warp;
        if (nj == 8)
          QMOE_RUN(1, 8, 0, row0);
        else if (nj == 4)
          QMOE_RUN(1, 4, 0, row0);
        else if (nj == 2)
          QMOE_RUN(1, 2, 0, row0);
        else
          QMOE_RUN(1, 1, 0, row0);
      }
    }
#undef QMOE_RUN
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

// Switches that restore earlier behaviour (for A/B runs and tests; defined
// in prefill.cu). Environment, read once: QMOE_PREFILL_SCALES=ldg (scales by
// plain loads, the path before the async one), QMOE_PREFILL_TILES=256 (only
// 256-row weight tiles, the schedule before the small-tile one) or =128
// (always 128-row tiles). set_overrides (tests) takes precedence; -1 = env.
int scale_path_override();
int tile_override();
void set_overrides(int scales, int tiles);

template <class Act, class Enc, int Warps, bool KN>
bool launch(const MoeGemmParams& p, cudaStream_t stream, Status* status) {
  using C = Cfg<Act, Enc, Warps>;
  const auto kernel = prefill_kernel<Act, Enc, Warps, KN>;
  if (KN && p.n % 8 != 0) return false;  // [E, K, N]: k rows of whole 16-byte chunks

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
  const int64_t sched_bytes = 8 * (p.num_experts + 1) + 8;  // s_tok, s_items, 2 schedule words
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
  a.col_scales = KN ? static_cast<const uint16_t*>(p.scales) : nullptr;
  a.scales = KN ? nullptr : static_cast<const uint16_t*>(p.scales);
  a.zeros = static_cast<const uint16_t*>(p.zeros);
  a.counts = p.tokens_per_expert;
  a.out = static_cast<uint16_t*>(p.out);
  a.E = int(p.num_experts);
  a.N = int(p.n);
  a.K = int(p.k);
  a.T = int(p.total_tokens);
  a.kp = packed_k(p.weight_type, p.k) * (Enc::kBits == 16 ? 2 : 1);
  a.groups = C::kScaled ? int(p.k / p.group_size) : 1;
  a.gdiv = C::kScaled ? group_divisor(p.group_size) : 0u;
  a.n_tiles = ceil_div(p.n, C::BN);
  a.n_tiles128 = ceil_div(p.n, 128);
  a.tile_mode = tile_override();
  a.k_tiles = ceil_div(p.k, C::BK);
  a.vec_out = (p.n % 8 == 0) && (reinterpret_cast<uintptr_t>(p.out) % 16 == 0);
  const auto aligned4 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 4 == 0; };
  a.scale_async = C::kScaled && a.groups % 2 == 0 && aligned4(p.scales) && (!C::kBias || aligned4(p.zeros)) &&
                  scale_path_override() != kScalesLdg;

  // Work items: at most n_tiles * (ceil(T / BM) + E); the grid never exceeds
  // what can be resident, nor the items that can exist.
  // (n tiles of 128 rows: the small-tile schedule's count).
  const int64_t max_items = int64_t(a.n_tiles128) * ((p.total_tokens + C::BM - 1) / C::BM + p.num_experts);
  const int64_t resident = int64_t(d.sms) * per_sm;
  const int grid = int(std::max<int64_t>(1, std::min(max_items, resident)));
  kernel<<<grid, C::kThreads, size_t(smem_bytes), stream>>>(a);
  *status = launch_status("prefill MoE kernel launch");
  return true;
}

// Warps per CTA. Both layouts are written (the kernel is a template on it);
// only 8 is instantiated: on an H100 (2026-11-27) the 16-warp layout (64 x 32
// warp tiles, 4 warps per scheduler, 128 registers) was 5-25% slower than 8
// warps (64 x 64 warp tiles, 2 warps per scheduler) on every reference row:
// each weight is decoded once per 32 tokens instead of 64, which costs more
// issue slots than the extra warps win back in latency hiding.
constexpr int kPrefillWarps = 8;

// One activation type's encodings (instantiated in prefill_f16.cu / prefill_bf16.cu),
// and its [E, K, N] variant for 16-bit weights.
template <class Act>
bool launch_for_act(const MoeGemmParams& p, cudaStream_t stream, Status* status) {
  bool launched = false;
  const bool kn = p.layout == WeightLayout::EKN;
  visit_encoding(p.act_type, p.weight_type, p.asym, [&](auto act, auto enc) {
    using Enc = decltype(enc);
    if constexpr (std::is_same_v<decltype(act), Act>) {
      if (!kn)
        launched = launch<Act, Enc, kPrefillWarps, false>(p, stream, status);
      else if constexpr (Enc::kBits == 16)
        launched = launch<Act, Enc, kPrefillWarps, true>(p, stream, status);
    }
  });
  return launched;
}

}  // namespace qmoe::cuda::prefill
