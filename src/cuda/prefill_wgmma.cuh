// The Hopper (sm_90a) prefill path: a persistent, warp-specialized grouped
// GEMM on wgmma.mma_async with the weight decode fused into the main loop.
// One kernel template on <Act, Enc>; the per-encoding parts are the register
// decode of prefill_decode.cuh (shared with the mma.sync path) and a small
// gather (WGather below) that picks a lane's codes out of shared memory.
//
// Orientation. out^T = W * X^T per expert, like prefill_mma.cuh: the decoded
// weights are the wgmma A operand, from registers (per warp of a warpgroup,
// A is the m16n8k16 A-fragment layout: 4 warps cover 64 weight rows), and
// the tokens the B operand, read by the tensor cores straight from shared
// memory through a matrix descriptor (K-major, 128-byte swizzle).
//
// CTA: 3 warpgroups (384 threads), one CTA per SM, persistent.
//  - warpgroup 0, the producer (setmaxnreg 40): thread 0 announces each
//    stage's bytes (expect_tx) and brings the stage in with two bulk tensor
//    copies (TMA): 64 k x up to 128 tokens (box rows 128, 64 or 32: the
//    item's token width, so small experts do not fetch 128 rows; wide items
//    256) and 64 k x 256 packed weight rows (wide: 128); the threads load
//    the 16-bit scales / zero points of their two weight rows for the
//    stage's two 32-wide k chunks (loaded two stages ahead, raw, in
//    registers; once a group where every k tile lies in one group), convert
//    them into the words the decoders want (scale pair, asym bias), store
//    them into the stage and
//    arrive on the stage's `full` mbarrier (128 arrivals + the TMA bytes).
//  - warpgroups 1 and 2, the consumers (setmaxnreg 232): each owns 128 of
//    the item's 256 weight rows (two m64 blocks; wide: 64 of 128, one) and
//    every token of the item: accumulators 2 x m64nN (N = 32, 96 or 128, or
//    with the mid item set 64, 96 or 128: 16..64 fp32 each; wide: 1 x m64nN,
//    N up to 256).
//    Per 32-wide k chunk: gather + decode the A fragments of both m64
//    blocks (16 registers), wgmma.fence, 4 wgmma (2 k16 steps x 2 blocks),
//    commit, wait until at most one group is in flight, so the decode of
//    the next chunk overlaps this chunk's wgmmas; one arrival per thread
//    on a stage's `empty` mbarrier once both its groups completed (each
//    thread after its own reads of the stage's scale words). The two
//    consumer warpgroups run independently as well.
//
// k order. wgmma reads B (tokens) in natural k order from shared memory, so
// the A fragments must be too: lane (g, c) holds, per k16 step, weight k
// pairs (2c, 2c+1) and (2c+8, 2c+9). In the packed codes those are the c-th
// k pair of every 8-wide k group: one byte of each 4-byte word (int4), one
// 16-bit half of each 8 bytes (int8 / fp8), one nibble of each 16-bit word
// (int2). WGather loads the row's chunk (16-byte loads, shared by the 4 lanes
// of a row) and gathers the lane's pairs into the raw word that
// PrefillDecode::decode takes, whose four outputs are then exactly the A
// registers (k groups 0..3 of the 32-wide chunk = (step 0, low), (step 0,
// high), (step 1, low), (step 1, high)). 16-bit weights use ldmatrix from a
// 128-byte-swizzled layout (conflict-free, no gather).
//
// B descriptor (K-major, SWIZZLE_128B): a token's 64-k stage row is one
// 128-byte row; 8 rows form a 1024-byte swizzle atom (the TMA writes 16-byte
// chunk j of row r at r*128 + 16 (j ^ (r & 7))); start address >> 4,
// leading byte offset 1 (unused for swizzled K-major), stride byte offset
// 1024 >> 4, layout type 1 (128B swizzle) in bits 62-63; the k16 step s adds
// 32 s bytes to the start address inside the atom (the hardware applies the
// swizzle to the final address bits, so the stage buffers are 1024-aligned).
//
// Wide items (quantized weights, plain and glu products; WCfg): 128 weight
// rows x up to 256 tokens, one m64 block a consumer warpgroup and wgmma N up
// to 256: the same accumulators and tensor work a k chunk for half the
// decode, and an expert of up to 256 tokens is one item per n tile.
//
// Schedule (prefill_schedule.h): the device-side counts -> clamped token ranges
// and work-item prefix sums in shared memory, items (expert, 256-row n tile,
// 128-token tile; wide: 128-row n tile, 256-token tile); for quantized
// weights the heavy (widest) items first and handed to the CTAs in snake
// order, else expert-major; producer and consumers walk the same item list,
// the pipeline runs across items. Split tail: launched in clusters of 2 CTAs
// (where every SM can hold one, K >= 512), the items of a last round that
// fills at most half the CTAs each run on a CTA pair over the two halves of
// the k tiles, the pair exchanging half of their fp32 sums through
// distributed shared memory (exchange below; no workspace, deterministic).
// No host sync, no allocation (the tensor maps are kernel parameters):
// graph-capturable. Rows that no expert covers are written as zeros.
//
// Rules (besides prefill.cu's): an sm_90 device with the sm_90a kernel
// compiled in, E * N < 2^31 (rows of the weight tensor map). The K tail
// (K % 64 == 32) and rows past N / T are zero-filled by the TMA; the group
// of the last chunk is clamped.
//
// Measured (H100, 2026-11-28, bench/prefill_bench.py; docs/PERFORMANCE.md,
// fourteenth session): Mixtral 4096 tokens top-2 at 63-79% of dense cuBLAS
// bf16 for every encoding (wide items); ARK's rows int8 / fp8 71-78% of the
// byte floor on t252 and t528, int4 45-51%, int2 27-40%, the uneven t610u
// 28-40%; 16-bit weights 83-98% of the floor on the even rows (71% on
// t610u), 1.06-1.32x torch._grouped_mm.
// ncu on the int4 rows: the consumers' decode (232 instructions a k tile, 56
// of them byte gathers) with two consumer warps a scheduler, ~1.5
// instructions a cycle an SM: bound by the decode's latency and issue, not by
// the tensor pipe or DRAM. Left: a one-time prepack of the codes into the
// lane order (no gather, fewer decode instructions); a per-expert choice of
// item shape (the uneven 610-token row); a shared-memory epilogue (16-byte
// stores).
// Tried: four consumer warpgroups of one m64 block each (16 warps to hide
// the decode's latency, 112-120 registers): no faster than two on ARK's t528
// and t610u rows (H100, 2026-11-27: before the producer's scale loads were
// cut to one a group), and setmaxnreg must then stay within the CTA's own
// launch registers (640 x 96), or it can wait for ever.
#pragma once

#include <cuda.h>  // CUtensorMap and its enums (the encoder comes through the runtime)
#include <cuda_runtime.h>

#include <mutex>
#include <type_traits>

#include "core/env.h"
#include "core/routing.h"
#include "cuda/prefill_mma.cuh"
#include "cuda/prefill_wgmma_ops.cuh"

namespace qmoe::cuda::prefill {
int item_set_override();  // prefill.cu: -1 automatic, 0 widths 32 / 96 / 128, 1 wide, 2 widths 64 / 96 / 128
int split_override();     // prefill.cu: the split tail, -1 automatic, 0 never, 1 wherever it applies
int grid_override();      // prefill.cu: at most this many CTAs (tests: several rounds on small shapes), 0 none
void note_pair_launch(bool pairs);  // prefill.cu: whether the last launch ran in CTA pairs (tests check it)
}  // namespace qmoe::cuda::prefill

namespace qmoe::cuda::prefill::hopper {

// Wide: items of 128 weight rows x up to 256 tokens (one m64 block a
// consumer warpgroup, wgmma N up to 256) instead of 256 x 128: the same
// accumulators and MMA work for half the decode (each weight decoded once
// per 256 tokens, not 128), and one item for an expert of up to 256 tokens.
// Quantized weights, plain and glu products (launch, item_set).
template <class Act, class Enc, ItemSet S = ItemSet::narrow>
struct WCfg {
  static constexpr bool Wide = S == ItemSet::wide;
  static constexpr int kBits = Enc::kBits;
  static constexpr bool kScaled = Enc::kScaled;
  static constexpr bool kBias = Enc::kAsym;
  static constexpr bool kNative = kBits == 16;
  static constexpr bool kWide = Wide;
  static constexpr int BK = 64;                    // k per stage (one 128-byte token row)
  static constexpr int MB = Wide ? 1 : 2;          // m64 blocks of weight rows a consumer warpgroup
  static constexpr int BM = Wide ? 256 : 128;      // tokens per item (schedule_item)
  static constexpr int BN = 128 * MB;              // weight rows per item
  static constexpr int KPB = BK * kBits / 8;       // packed bytes per weight row per stage
  static constexpr int TOK_BYTES = BM * 128;
  static_assert(!Wide || !kNative, "wide items are for quantized weights");
  static constexpr int W_BYTES = BN * KPB;
  static constexpr int S_BYTES = kScaled ? 2 * BN * 4 : 0;  // word per (chunk, row)
  static constexpr int Z_BYTES = kBias ? 2 * BN * 4 : 0;     // (asym: beside each scale word)
  static constexpr int STAGE = (TOK_BYTES + W_BYTES + S_BYTES + Z_BYTES + 1023) / 1024 * 1024;
  static constexpr int STAGES_RAW = (208 * 1024) / STAGE;
  static constexpr int STAGES = STAGES_RAW > 8 ? 8 : STAGES_RAW;
  static constexpr int kThreads = 384;
#ifndef QMOE_SCALE_AHEAD
#define QMOE_SCALE_AHEAD 2
#endif
  static constexpr int kScaleAhead = QMOE_SCALE_AHEAD;  // fills of lead of the producer's scale loads
  // The TMA's swizzle of a quantized weight tile (WGather reads it back):
  // 64-byte for the 64-byte rows of 8-bit codes, none for 4-bit and 2-bit.
  static constexpr CUtensorMapSwizzle kWSwizzle = kBits == 8 ? CU_TENSOR_MAP_SWIZZLE_64B : CU_TENSOR_MAP_SWIZZLE_NONE;
  // The L2 sector promotion of the weight tiles' reads. A stage reads 64 k
  // of each of its rows: 16 bytes a row for int2, where 128-byte promotion
  // streamed 2.12 TB/s against 1.94-1.96 with 256-byte (H100,
  // bench/row_piece_probe.cu, boxes of 256 rows x 16 bytes); 32 bytes and up
  // stream fastest with 256-byte.
#ifndef QMOE_INT2_W_PROMOTION
#define QMOE_INT2_W_PROMOTION CU_TENSOR_MAP_L2_PROMOTION_L2_128B
#endif
  static constexpr CUtensorMapL2promotion kWPromotion =
      kBits == 2 ? QMOE_INT2_W_PROMOTION : CU_TENSOR_MAP_L2_PROMOTION_L2_256B;
  static_assert(STAGES >= 3, "pipeline depth");
  static constexpr int kBarriers = 2 * STAGES + 1;  // full[STAGES], empty[STAGES], the split tail's ready
  static_assert((TOK_BYTES + W_BYTES) % 1024 == 0, "scale words after 1024-aligned buffers");
  using Dec = PrefillDecode<Act, Enc>;
  using raw_t = typename Dec::raw_t;
};

struct WArgs {
  // glu = I > 0 (the fused layer's gate/up product, N = 2I): an item takes
  // gate rows n0.. and up rows I + n0.. (128 each) and writes [T, I] =
  // SiLU(gate) * up; its weight rows are then 128 outputs wide.
  int glu;
  int ordered;  // items by width class in snake order (Schedule; ordered_items)
  const uint16_t* col_scales;  // [E, K, N] weights: optional per-column scales [E, N]
  const uint16_t* scales;
  const uint16_t* zeros;
  const int32_t* counts;
  uint16_t* out;
  int E, N, K, T;
  int groups;
  uint32_t gdiv;  // 32-wide k chunk -> group by a multiply (chunk_group)
  int two_groups;  // some 64-wide k tile spans two groups (group_size % 64 != 0): the producer's Two
  int n_tiles, k_tiles;
  int split;  // launched in CTA pairs (clusters of 2): the last round's items split over k (split_first_item)
};

// Tensor maps: activations with box rows 256, 128, 64, 32 (act_map of the
// item's tokens: the smallest box that holds them), and the packed weights
// [E * N, K_packed] -- or, for 16-bit weights [E, K, N], a 3-D map {N, K, E}
// with boxes of 64 n x 64 k (four a stage; k past K reads as zero, never the
// next expert's rows). (Boxes of 96 and 48 rows for items of that many
// tokens: H100, t528 int4 1.00-1.09 times the time of 128-row boxes.)
struct WMaps {
  CUtensorMap act[4];
  CUtensorMap w;
};
__device__ __forceinline__ int box_rows(int rows) { return rows <= 32 ? 32 : rows <= 64 ? 64 : rows <= 128 ? 128 : 256; }
__device__ __forceinline__ int act_map(int box) { return box == 256 ? 0 : box == 128 ? 1 : box == 64 ? 2 : 3; }

// ---------------------------------------------------------------------------
// PTX helpers (sm_90).
// ---------------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Waits for the phase of `parity`; Cluster: acquiring at cluster scope (the
// partner CTA's arrivals, the split tail's exchange).
template <bool Cluster = false>
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    if constexpr (Cluster)
      asm volatile(
          "{\n .reg .pred p;\n mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, "
          "1, 0, p;\n}\n"
          : "=r"(done)
          : "r"(bar), "r"(parity)
          : "memory");
    else
      asm volatile(
          "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
          : "=r"(done)
          : "r"(bar), "r"(parity)
          : "memory");
  } while (!done);
}
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::
          "r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2,
                                            uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
      "[%5];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}
// Distributed shared memory (the split tail's hand-over between the two CTAs
// of a cluster): the partner's address of a local shared address, loads
// from it, and arrivals on its barriers (waits: mbar_wait<true>).
__device__ __forceinline__ uint32_t cluster_addr(uint32_t local, uint32_t rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(local), "r"(rank));
  return r;
}
__device__ __forceinline__ float4 ld_cluster_f4(uint32_t addr) {
  float4 v;
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t remote_bar) {
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(remote_bar) : "memory");
}
// The cluster barrier: every thread arrives at the start (after the
// barrier initialisation's fence) and waits for that phase before it first
// touches the partner's barriers (exchange) or at the end; then all leave
// together (a CTA's shared memory must outlive the partner's reads of it).
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive;\n" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accumulator reads / writes across the
// asynchronous wgmma (which it cannot see through).
template <int R>
__device__ __forceinline__ void fence_regs(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Matrix descriptor of a K-major, 128-byte-swizzled B tile at shared
// address `addr` (see the top of the file).
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr) {
  return uint64_t((addr >> 4) & 0x3fff) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) | (uint64_t(1) << 62);
}

// ---------------------------------------------------------------------------
// Gather: the raw codes of lane c (= lane % 4) for weight row r of the
// stage's weight tile (shared memory at `tile`) and 32-wide k chunk q, in
// the order PrefillDecode::decode takes: k group i (k 8i..8i+7 of the chunk)
// gives the lane's pair (8i + 2c, 8i + 2c + 1).
// ---------------------------------------------------------------------------
template <class Enc, int Bits = Enc::kBits>
struct WGather;

// int4: 16 bytes per chunk; byte c of each 4-byte word.
template <class Enc>
struct WGather<Enc, 4> {
  __device__ static __forceinline__ uint32_t get(const unsigned char* tile, int r, int q, int c) {
    const uint4 v = *reinterpret_cast<const uint4*>(tile + 32 * r + 16 * q);
    const uint32_t sel = uint32_t(c) | (uint32_t(c + 4) << 4);
    return __byte_perm(__byte_perm(v.x, v.y, sel), __byte_perm(v.z, v.w, sel), 0x5410u);
  }
};

// int8 / fp8: 32 bytes per chunk; the c-th 16-bit half of each 8 bytes. The
// tile's 64-byte rows are 64-byte swizzled (the TMA writes 16-byte unit j of
// row r at 16 (j ^ ((r >> 1) & 3))): the 8 rows a warp reads then lie in
// different banks (unswizzled, rows r and r + 2 share theirs: 4 wavefronts
// a load instead of 1).
template <class Enc>
struct WGather<Enc, 8> {
  __device__ static __forceinline__ uint2 get(const unsigned char* tile, int r, int q, int c) {
    // 16-byte unit j of the row at (64 r + 16 x) ^ 16 j, x = (r >> 1) & 3:
    // one lane base, then constant xors (the row's other bits are untouched).
    // The lane's halves c and c + 4 of a unit are in its words c / 2 and
    // c / 2 + 2: two 4-byte loads a unit (a warp's 16 distinct words lie in
    // 16 banks: one wavefront), no lane select of 16-byte loads.
    const uint32_t base = uint32_t(64 * r) | uint32_t(16 * ((r >> 1) & 3));
    const uint32_t w = 4u * uint32_t(c >> 1);
    const unsigned char* u = tile + ((base ^ uint32_t(32 * q)) + w);
    const unsigned char* v = tile + ((base ^ uint32_t(32 * q + 16)) + w);
    const uint32_t sel = (c & 1) ? 0x7632u : 0x5410u;
    return make_uint2(__byte_perm(*reinterpret_cast<const uint32_t*>(u), *reinterpret_cast<const uint32_t*>(u + 8), sel),
                      __byte_perm(*reinterpret_cast<const uint32_t*>(v), *reinterpret_cast<const uint32_t*>(v + 8), sel));
  }
};

// int2: 8 bytes per chunk; nibble c of each 16-bit word.
template <class Enc>
struct WGather<Enc, 2> {
  __device__ static __forceinline__ uint16_t get(const unsigned char* tile, int r, int q, int c) {
    const uint2 w = *reinterpret_cast<const uint2*>(tile + 16 * r + 8 * q);
    const uint32_t x = (w.x >> (4 * c)) & 0x000f000fu;   // words 0, 1: bits 0..3, 16..19
    const uint32_t y = (w.y >> (4 * c)) & 0x000f000fu;   // words 2, 3
    const uint32_t z = x | (y << 8);                     // 0..3 w0, 8..11 w2, 16..19 w1, 24..27 w3
    return uint16_t(z | (z >> 12));                      // nibbles w0, w1, w2, w3
  }
};

// ---------------------------------------------------------------------------
// The kernel. The item schedule (prefill_schedule.h): each CTA builds the
// same arrays in shared memory from the device counts, then walks its items.
// ---------------------------------------------------------------------------
template <int kThreads, int BM>
__device__ __forceinline__ void build_class_schedule(const int32_t* counts, int E, int64_t T, int n_tiles, int k_tiles,
                                                     int bn, bool ordered, bool split, int* s_tok, int* s_cls,
                                                     int* s_meta, long long* scratch) {
  const int tid = threadIdx.x;
  build_token_ranges<kThreads>(counts, E, T, s_tok, scratch);
  const auto [i0, i1] = expert_range<kThreads>(E);
  // The order pays where experts of several token tiles make items of very
  // different weight (ARK's t610u, Mixtral); where every expert is one tile
  // it was 1.10 times the time of Qwen1.5's layer at 512 tokens (H100).
  bool multi = false;
  for (int i = i0; i < i1; ++i) multi |= s_tok[i + 1] - s_tok[i] > BM;
  ordered = __syncthreads_or(ordered && multi) != 0;
  int* scan = reinterpret_cast<int*>(scratch);
#pragma unroll 1
  for (int c = 0; c < kClasses; ++c) {
    int n = 0;
    for (int i = i0; i < i1; ++i) n += class_tiles<BM>(s_tok[i + 1] - s_tok[i], c, ordered);
    int o = block_exclusive_scan<int>(n, scan);
    for (int i = i0; i < i1; ++i) {
      s_cls[c * (E + 1) + i] = o;
      o += class_tiles<BM>(s_tok[i + 1] - s_tok[i], c, ordered);
    }
    if (tid == kThreads - 1) s_cls[c * (E + 1) + E] = o;
  }
  __syncthreads();
  if (tid == 0) schedule_meta(E, n_tiles, bn, ordered, s_cls, s_meta, gridDim.x, split && k_tiles >= 2);
}

// What a kernel instantiation computes (compile-time: one variant per
// kernel, so each keeps the register budget of a single main loop; one
// kernel holding all three had ptxas serialise its wgmma, C7512, and ran
// the quantized rows ~20% slower on H100).
enum Variant { kPlain = 0, kEKN = 1, kGlu = 2 };

template <class Act, class Enc, int V, ItemSet S>
struct WKernel {
  using C = WCfg<Act, Enc, S>;
  static constexpr bool Wide = C::Wide, Mid = S == ItemSet::mid;
  static_assert(!Wide || V != kEKN, "wide items: [E, N, K] products");
  // Wide glu items: 64 outputs, their gate rows as tile rows 0..63 and up
  // rows 64..127; fragment rows g and 8 + g of a warp are the gate and up
  // rows of one output (tile rows o and 64 + o), so a lane holds both.
  static constexpr bool kGluWide = V == kGlu && Wide;
  static constexpr int kHalfStep = kGluWide ? C::BN / 2 : 8;  // tile rows from a lane's row g to its row 8 + g
  static_assert(V != kEKN || C::kNative, "[E, K, N] is 16-bit only");
  using Dec = typename C::Dec;
  using P = Pair<Act>;

  struct Smem {
    unsigned char* base;  // stage 0 (1024-aligned)
    uint32_t full, empty;  // shared addresses of the barrier arrays
    uint32_t ready;  // the split tail's exchange: the partner's half is stored
  };

  __device__ static __forceinline__ uint32_t full_bar(const Smem& s, int st) { return s.full + 8 * st; }
  __device__ static __forceinline__ uint32_t empty_bar(const Smem& s, int st) { return s.empty + 8 * st; }

  // ---- producer ----------------------------------------------------------
  struct Fill {
    int round, item, kt, k0, k1;  // k tile kt of the round's unit [k0, k1)
    Item it;
  };

  __device__ static __forceinline__ Unit unit(const WArgs& a, const Schedule& sc, int r) {
    return unit_of_round(sc, r, gridDim.x, blockIdx.x, a.k_tiles);
  }
  __device__ static __forceinline__ void start(const WArgs& a, Fill& f, const Schedule& sc) {
    const Unit u = unit(a, sc, f.round);
    f.item = u.item;
    f.kt = u.k0;
    f.k0 = u.k0;
    f.k1 = u.k1;
    if (f.item < sc.total()) f.it = schedule_item<C::BM>(sc, f.item);
  }

  // The producer's scale words. Two: some k tile spans two groups (group
  // sizes that are not multiples of 64); else each tile has one group and
  // the tiles of a group after its first store the words of the first again
  // (groups of 128: every other tile), without loading them. (Each 16-bit
  // scale load brings a 32-byte sector from L2 into an L1 of ~20 KB beside
  // the stages: on ARK's t528 8x4096x14336 row the scale and zero loads of
  // every tile kept L2 78.7% busy for int4 asym with 14% L1 hits, sym 63%
  // and 60%, H100 ncu. Copying the previous stage's words instead of keeping
  // them in registers made Mixtral's rows 1.05x slower, the consumers' waits
  // on full stages 4.9% -> 18.9% of the samples: likely the copy's shared
  // load queued behind the stage's bulk copies, delaying the arrival.)
  //
  // The raw 16-bit scales (zeros) of rows 2t, 2t + 1 of one k tile, one a
  // register: s[2 q + j] is chunk q's group (Two), row j. They are packed
  // only where they are stored (store_scales), so their loads stay in flight
  // until then: packing them here made the producer wait for each load as it
  // was issued.
  template <bool Two>
  struct RawScales {
    static constexpr int kN = Two ? 4 : 2;
    uint32_t s[kN], z[C::kBias ? kN : 1];
  };
  // The words a thread stores for each chunk: (scale, scale) per row, with
  // the zero's bias word beside each (asym: one 8-byte load a consumer).
  struct Words {
    uint32_t w[C::kBias ? 4 : 2];
  };

  // Whether fill f's k tile (one group: !Two) has the group of the tile
  // before it in its unit.
  __device__ static __forceinline__ bool same_group(const WArgs& a, const Fill& f) {
    return f.kt > f.k0 && chunk_group(2 * f.kt, a.gdiv) == chunk_group(2 * f.kt - 2, a.gdiv);
  }

  template <bool Two>
  __device__ static __forceinline__ void load_scales(const WArgs& a, const Fill& f, int t, RawScales<Two>& r) {
    if (!C::kScaled || 2 * t >= C::BN) return;
    if (!Two && same_group(a, f)) return;  // (uniform: store_scales keeps the words)
    const int g0 = int(chunk_group(2 * f.kt, a.gdiv));
    const int g1 = min(int(chunk_group(2 * f.kt + 1, a.gdiv)), a.groups - 1);  // (K % 64 == 32: clamped)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int row = min(global_row(a, f.it.n0, 2 * t + j), a.N - 1);
      const int64_t off = (int64_t(f.it.e) * a.N + row) * a.groups;
      r.s[j] = __ldg(a.scales + off + g0);
      if constexpr (Two) r.s[2 + j] = __ldg(a.scales + off + g1);
      if constexpr (C::kBias) {
        r.z[j] = __ldg(a.zeros + off + g0);
        if constexpr (Two) r.z[2 + j] = __ldg(a.zeros + off + g1);
      }
    }
  }

  __device__ static __forceinline__ Words pack_words(uint32_t s0, uint32_t s1, uint32_t z0, uint32_t z1) {
    Words w;
    if constexpr (C::kBias) {
      w.w[0] = dup16(uint16_t(s0));
      w.w[1] = Dec::bias_word(P::to_float(uint16_t(z0)));
      w.w[2] = dup16(uint16_t(s1));
      w.w[3] = Dec::bias_word(P::to_float(uint16_t(z1)));
    } else {
      w.w[0] = dup16(uint16_t(s0));
      w.w[1] = dup16(uint16_t(s1));
    }
    return w;
  }
  __device__ static __forceinline__ void put_words(unsigned char* stage, int q, int t, const Words& w) {
    uint32_t* sS = reinterpret_cast<uint32_t*>(stage + C::TOK_BYTES + C::W_BYTES);
    if constexpr (C::kBias) {  // (word stores: wider ones made ptxas spill in the producer of a glu kernel)
      uint32_t* sz = sS + 2 * (q * C::BN + 2 * t);
#pragma unroll
      for (int i = 0; i < 4; ++i) sz[i] = w.w[i];
    } else {
      *reinterpret_cast<uint2*>(sS + q * C::BN + 2 * t) = make_uint2(w.w[0], w.w[1]);
    }
  }

  // A stage's scale words (scale_words reads them): per chunk q and row, the
  // scale twice, and for asym the zero's bias word beside it. `kept`: the
  // words of the group's first tile (!Two), packed there and stored again
  // for its other tiles.
  template <bool Two>
  __device__ static __forceinline__ void store_scales(const WArgs& a, const Fill& f, unsigned char* stage, int t,
                                                      const RawScales<Two>& r, Words& kept) {
    if (!C::kScaled || 2 * t >= C::BN) return;
    const uint32_t* z = r.z;
    if constexpr (Two) {
#pragma unroll
      for (int q = 0; q < 2; ++q)
        put_words(stage, q, t,
                  pack_words(r.s[2 * q], r.s[2 * q + 1], C::kBias ? z[2 * q] : 0u, C::kBias ? z[2 * q + 1] : 0u));
    } else {
      if (!same_group(a, f)) kept = pack_words(r.s[0], r.s[1], C::kBias ? z[0] : 0u, C::kBias ? z[1] : 0u);
      put_words(stage, 0, t, kept);
      put_words(stage, 1, t, kept);
    }
  }

  // The scale word and bias word of row r, chunk q of a stage (store_scales).
  __device__ static __forceinline__ uint2 scale_words(const unsigned char* stage, int q, int r) {
    const uint32_t* sS = reinterpret_cast<const uint32_t*>(stage + C::TOK_BYTES + C::W_BYTES);
    if constexpr (C::kBias) return reinterpret_cast<const uint2*>(sS)[q * C::BN + r];
    else return make_uint2(C::kScaled ? sS[q * C::BN + r] : 0u, Dec::kSymBias);
  }

  // Weight row of row r (0..255) of an item's tile at n0: rows n0 + r, or
  // (glu) gate rows n0 + r for r < 128 and up rows I + n0 + r - 128.
  __device__ static __forceinline__ int global_row(const WArgs& a, int n0, int r) {
    if constexpr (V == kGlu) return r >= C::BN / 2 ? a.glu + n0 + r - C::BN / 2 : n0 + r;
    return n0 + r;
  }

  __device__ static __forceinline__ void advance(const WArgs& a, Fill& f, const Schedule& sc) {
    if (++f.kt == f.k1) {
      ++f.round;
      start(a, f, sc);
    }
  }

  template <bool Two>
  __device__ static void producer(const WArgs& a, const WMaps& maps, const Smem& sm, const Schedule& sc) {
    const int t = threadIdx.x;  // 0..127
    const int total = sc.total();
    Fill f;
    f.round = 0;
    start(a, f, sc);
    if (f.item >= total) return;
    // The raw scales (zeros) of fill + i in r[i]: their loads are issued
    // kAhead fills before the stage is filled. Loaded one fill ahead and
    // packed as they came, the producer waited for them at every fill (the
    // packing's PRMT held 9% of the stall samples on ARK's t528 int4 row,
    // H100) while the consumers waited on the full barriers.
    constexpr int kAhead = Two && C::kBias ? 1 : C::kScaleAhead;  // (asym Two: 8 raw registers a fill; two fills ahead spilled)
    RawScales<Two> r[kAhead];
    Words kept;  // (!Two) the words of the current group
    Fill ahead = f;  // the fill whose scales load next
#pragma unroll
    for (int i = 0; i < kAhead; ++i) {
      if (ahead.item < total) load_scales(a, ahead, t, r[i]);
      advance(a, ahead, sc);
    }
#pragma unroll 1
    for (int fill = 0; f.item < total; ++fill) {
      RawScales<Two> nr;
      if (ahead.item < total) load_scales(a, ahead, t, nr);  // in flight during the waits below
      advance(a, ahead, sc);
      const int st = fill % C::STAGES;
      mbar_wait(empty_bar(sm, st), ((fill / C::STAGES) & 1) ^ 1);
      unsigned char* stage = sm.base + st * C::STAGE;
      const uint32_t fb = full_bar(sm, st);
      if (t == 0) {
        // The bytes are announced without an arrival, so the copies start
        // before this thread's scale words (whose loads may still be in
        // flight) are stored; the phase completes once all 128 threads
        // arrived (after their stores) and the bytes landed.
        const int box = box_rows(f.it.rows);
        mbar_expect_tx(fb, uint32_t(box * 128 + C::W_BYTES));
        const uint32_t dst = smem_addr(stage);
        tma_load_2d(dst, &maps.act[act_map(box)], f.kt * C::BK, f.it.tok0, fb);
        if constexpr (V == kEKN) {
          // [E, K, N]: four boxes of 64 k x 64 n (128-byte rows, swizzled);
          // a loop, not unrolled: the producer has 40 registers.
#pragma unroll 1
          for (int b = 0; b < C::BN / 64; ++b)
            tma_load_3d(dst + C::TOK_BYTES + b * (64 * 128), &maps.w, f.it.n0 + 64 * b, f.kt * C::BK, f.it.e, fb);
        } else {
          // One box of 256 rows, or (glu, a map of 128-row boxes) the gate
          // rows and then the up rows.
          const int wk = C::kNative ? f.kt * C::BK : f.kt * C::KPB;  // elements of the weight map
          if constexpr (V == kGlu) {
            for (int b = 0; b < 2; ++b)
              tma_load_2d(dst + C::TOK_BYTES + b * (C::W_BYTES / 2), &maps.w, wk,
                          f.it.e * a.N + global_row(a, f.it.n0, b * C::BN / 2), fb);
          } else {
            tma_load_2d(dst + C::TOK_BYTES, &maps.w, wk, f.it.e * a.N + f.it.n0, fb);
          }
        }
      }
      store_scales(a, f, stage, t, r[0], kept);
      mbar_arrive(fb);
#pragma unroll
      for (int i = 0; i + 1 < kAhead; ++i) r[i] = r[i + 1];
      r[kAhead - 1] = nr;
      advance(a, f, sc);
    }
  }

  // ---- consumers ---------------------------------------------------------
  // wgmma of N = 2R tokens (the item's width) on accumulators d.
  template <int R>
  __device__ static __forceinline__ void mma(float (&d)[R], const uint32_t (&x)[4], uint64_t desc) {
    if constexpr (Act::type == ActType::f16)
      wgmma::mma_f16(d, x, desc);
    else
      wgmma::mma_bf16(d, x, desc);
  }

  // The A registers of 32-wide k chunk q for m64 block mb of this warp:
  // x[s][.] = k16 step 2q + s. Weight rows of the lane: rbase + kHalfStep h + g.
  __device__ static __forceinline__ void a_frags(const unsigned char* stage, int q, int rbase,
                                                 uint32_t (&x)[2][4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    if constexpr (V == kEKN) {
      // [E, K, N]: the stage holds k rows of n (box b: n 64b..64b+63, 128-byte
      // rows, swizzled); ldmatrix .trans turns each 8 k x 8 n matrix into the
      // fragment of 8 weight rows x 8 k. Matrix m = lane / 8: weight rows
      // rbase + 8 (m & 1) .., k 8 (m >> 1) .. of the k16 step.
      const int m = lane >> 3;
      const int n = rbase + 8 * (m & 1);
      const uint32_t box = smem_addr(stage + C::TOK_BYTES) + uint32_t(n >> 6) * (64 * 128);
      const int j = (n & 63) >> 3;
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const int r = 32 * q + 16 * s + 8 * (m >> 1) + (lane & 7);
        ldmatrix_x4_trans(x[s], box + uint32_t(r) * 128 + uint32_t(16 * (j ^ (r & 7))));
      }
    } else if constexpr (C::kNative) {
      // ldmatrix x4 per k16 step: matrix m = lane / 8 -> fragment rows
      // 8 (m & 1) .. +7, k chunk 2 step + (m >> 1); swizzled 128-byte rows.
      const int m = lane >> 3;
      const int r = rbase + 8 * (m & 1) + (lane & 7);
      const uint32_t rowaddr = smem_addr(stage + C::TOK_BYTES) + uint32_t(r) * 128;
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const int j = 2 * (2 * q + s) + (m >> 1);
        ldmatrix_x4(x[s], rowaddr + uint32_t(16 * (j ^ (r & 7))));
      }
    } else {
      const unsigned char* sw = stage + C::TOK_BYTES;
      __builtin_assume((rbase & 7) == 0);  // tile_row: the lane's rows are g mod 8
      uint32_t b[2][4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = rbase + kHalfStep * h + g;
        const auto raw = WGather<Enc>::get(sw, r, q, c);
        const uint2 sb = scale_words(stage, q, r);
        Dec::decode(raw, sb.x, sb.y, b[h]);
      }
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        x[s][0] = b[0][2 * s];
        x[s][1] = b[1][2 * s];
        x[s][2] = b[0][2 * s + 1];
        x[s][3] = b[1][2 * s + 1];
      }
    }
  }

  // First tile row of warp `warp` of consumer warpgroup wg, m64 block mb:
  // wg * 64 MB + mb * 64 + ..., or (glu) block 0 in the gate rows and block 1
  // in the up rows of the same outputs, so a lane holds gate and up of each.
  __device__ static __forceinline__ int tile_row(int wg, int mb, int warp) {
    if constexpr (kGluWide) return wg * 32 + warp * 8;
    return (V == kGlu ? mb * 128 + wg * 64 : wg * 64 * C::MB + mb * 64) + warp * 16;
  }

  // The split tail's exchange (split_first_item in prefill_schedule.h). Both
  // CTAs of the pair finish the item's sums for half its tokens: the owner
  // accumulator indices [0, R / 2) (tokens [0, NT / 2)), the helper the rest.
  // Once both consumer warpgroups are past their last stage (this is the
  // CTA's last unit: nothing reads or fills the stages any more), each thread
  // stores the half it does not finish into its own stage buffers
  // (thread-major float4s), and after the partner's `ready` arrival adds the
  // partner's copy of the half it finishes, read through distributed shared
  // memory. Storing first frees the registers the loads then take (loading
  // the whole partial beside all the accumulators made ptxas spill). Each
  // sum is own + partner's, the same whichever CTA computes it. Both CTAs
  // leave together (the cluster barrier at the kernel's end).
  // Not for [E, K, N] weights: the exchange beside their epilogue's column
  // scales made ptxas spill (moe_gemm's layout; ARK's rows are [E, N, K]).
  static constexpr bool kSplit = V != kEKN;
  static constexpr int kPartialBytes = C::MB * (C::BM / 4) * 4 * 256;  // half the widest item's accumulators
  static_assert(kPartialBytes <= C::STAGES * C::STAGE, "the partial sums fit the stage buffers");
  __device__ static __forceinline__ uint32_t partner() {
    uint32_t rank;
    asm("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
    return rank ^ 1u;
  }
  template <int R>
  __device__ static __forceinline__ void exchange(const Smem& sm, float (&acc)[C::MB][R], bool owner) {
    constexpr int H = R / 2;
    const int ct = threadIdx.x - 128;
    const uint32_t rank = partner();
    cluster_wait();                                                   // the partner's barriers are initialised
    asm volatile("bar.sync 1, 256;\n" ::: "memory");                // both consumer warpgroups past their last stage
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // after the TMA writes and wgmma reads
    float4* dst = reinterpret_cast<float4*>(sm.base);
#pragma unroll
    for (int mb = 0; mb < C::MB; ++mb)
#pragma unroll
      for (int i = 0; i < H / 4; ++i) {
        const float* x = &acc[mb][4 * i];
        const float* y = &acc[mb][H + 4 * i];
        dst[(mb * (H / 4) + i) * 256 + ct] = owner ? make_float4(y[0], y[1], y[2], y[3])
                                                   : make_float4(x[0], x[1], x[2], x[3]);
      }
    mbar_arrive_cluster(cluster_addr(sm.ready, rank));
    mbar_wait<true>(sm.ready, 0);
    const uint32_t src = cluster_addr(smem_addr(sm.base), rank);
#pragma unroll
    for (int mb = 0; mb < C::MB; ++mb)
#pragma unroll
      for (int i = 0; i < H / 4; ++i) {
        const float4 v = ld_cluster_f4(src + 16u * uint32_t((mb * (H / 4) + i) * 256 + ct));
        float* x = &acc[mb][4 * i];
        float* y = &acc[mb][H + 4 * i];
        // (a select, not an index: the accumulators stay in registers)
        (owner ? x[0] : y[0]) += v.x;
        (owner ? x[1] : y[1]) += v.y;
        (owner ? x[2] : y[2]) += v.z;
        (owner ? x[3] : y[3]) += v.w;
      }
  }

  // f(j, i, r) for the lane's tokens r = 8j + 2c + i of [8 j0, 8 j1) (j, i
  // compile-time after unrolling: they index the accumulators).
  template <int NT, class F>
  __device__ static __forceinline__ void for_lane_tokens(int j0, int j1, F&& f) {
    const int c = threadIdx.x & 3;
#pragma unroll
    for (int j = 0; j < NT / 8; ++j)
#pragma unroll
      for (int i = 0; i < 2; ++i)
        if (j >= j0 && j < j1) f(j, i, 8 * j + 2 * c + i);
  }

  // The output of the item's tokens [8 j0, 8 j1) from the accumulators:
  // d[4j + 2h + i] of block mb is tile row tile_row + kHalfStep h + g, token
  // 8j + 2c + i.
  template <int NT>
  __device__ static __forceinline__ void store_out(const WArgs& a, const Item& it, float (&acc)[C::MB][NT / 2],
                                                   int j0, int j1) {
    constexpr int MB = C::MB;
    const int wg = (threadIdx.x >> 7) - 1, warp = (threadIdx.x >> 5) & 3;
    const int g = (threadIdx.x & 31) >> 2;
    if constexpr (V == kGlu) {  // SiLU(gate) * up of the 16-bit products, as the unfused layer
      // Outputs of the lane: (wide) one, gate in fragment row g and up in
      // 8 + g; else two (h), gate in block 0 and up in block 1.
#pragma unroll
      for (int h = 0; h < (kGluWide ? 1 : 2); ++h) {
        const int n = it.n0 + (kGluWide ? tile_row(wg, 0, warp) + g : wg * 64 + warp * 16 + 8 * h + g);
        if (n >= a.glu) continue;
        for_lane_tokens<NT>(j0, j1, [&](int j, int i, int r) {
          const float gate = P::to_float(P::from_float(acc[0][4 * j + 2 * h + i]));
          const float up = P::to_float(P::from_float(acc[MB - 1][4 * j + (kGluWide ? 2 : 2 * h) + i]));
          if (r < it.rows) a.out[int64_t(it.tok0 + r) * a.glu + n] = P::from_float(silu(gate) * up);
        });
      }
    } else {
#pragma unroll
      for (int mb = 0; mb < MB; ++mb)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int n = it.n0 + tile_row(wg, mb, warp) + 8 * h + g;
          if (n >= a.N) continue;
          float cs = 1.0f;  // [E, K, N] weights: the optional per-column scale
          if constexpr (V == kEKN)
            if (a.col_scales) cs = P::to_float(a.col_scales[int64_t(it.e) * a.N + n]);
          for_lane_tokens<NT>(j0, j1, [&](int j, int i, int r) {
            if (r < it.rows) a.out[int64_t(it.tok0 + r) * a.N + n] = P::from_float(acc[mb][4 * j + 2 * h + i] * cs);
          });
        }
    }
  }

  template <int NT>
  __device__ static __forceinline__ void run_item(const WArgs& a, const Item& it, const Unit& u, const Smem& sm,
                                                  int& fill) {
    const int wg = (threadIdx.x >> 7) - 1, warp = (threadIdx.x >> 5) & 3;
    constexpr int MB = C::MB;
    float acc[MB][NT / 2];
#pragma unroll
    for (int mb = 0; mb < MB; ++mb)
#pragma unroll
      for (int i = 0; i < NT / 2; ++i) acc[mb][i] = 0.0f;
    // One wgmma shape per main loop and accumulator: alternatives on the
    // same registers (N = 128 or 96 + 32) made ptxas serialise every wgmma
    // (C7511), and a fourth main loop inlined beside three, C7512. A 96-wide
    // item used to run N = 64 and, past 64 tokens, N = 32: the conditional
    // wgmma took ptxas's injected warpgroup arrives into the loop, and one
    // N = 96 is 0.90-0.98 of its time on ARK's t252, t528 and t610u rows
    // (H100, int4 and int8).
    // One commit group per 32-wide k chunk, at most one group left in
    // flight (wait 1): the decode of chunk c + 1 overlaps the wgmmas of chunk
    // c. The A registers of chunk parity q are rewritten only after the
    // group that read them (two groups back) completed; the stage of k tile
    // kt is released once its second group completed, i.e. after the wait
    // that follows the first group of tile kt + 1 (or at the item's end).
    // (Two groups in flight, wait 2, would let chunk c + 1's decode overwrite
    // the A registers of chunk c - 1 while its wgmmas still read them: ptxas
    // does not keep them apart, and every prefill test failed, H100.)
    int prev = -1;  // stage of the previous k tile, not yet released
#pragma unroll 1
    for (const int end = fill + (u.k1 - u.k0); fill < end; ++fill) {
      const int st = fill % C::STAGES;
      mbar_wait(full_bar(sm, st), (fill / C::STAGES) & 1);
      const unsigned char* stage = sm.base + st * C::STAGE;
      const uint32_t tok = smem_addr(stage);
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        uint32_t x[MB][2][4];  // [mb][k16 step][register]
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) a_frags(stage, q, tile_row(wg, mb, warp), x[mb]);
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) fence_regs(acc[mb]);
        wgmma_fence();
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          const uint64_t desc = desc_sw128(tok + 32 * (2 * q + s));
#pragma unroll
          for (int mb = 0; mb < MB; ++mb) mma(acc[mb], x[mb][s], desc);
        }
        wgmma_commit();
        wgmma_wait<1>();
        if (q == 0 && prev >= 0) mbar_arrive(empty_bar(sm, prev));
      }
      prev = st;
    }
    wgmma_wait<0>();
#pragma unroll
    for (int mb = 0; mb < MB; ++mb) fence_regs(acc[mb]);
    if (prev >= 0) mbar_arrive(empty_bar(sm, prev));
    if (!kSplit || u.role == Role::whole) return store_out<NT>(a, it, acc, 0, NT / 8);
    const bool owner = u.role == Role::owner;
    exchange(sm, acc, owner);
    store_out<NT>(a, it, acc, owner ? 0 : NT / 16, owner ? NT / 16 : NT / 8);
  }

  __device__ static void consumer(const WArgs& a, const Smem& sm, const Schedule& sc) {
    int fill = 0;
#pragma unroll 1
    for (int r = 0;; ++r) {
      const Unit u = unit(a, sc, r);
      if (u.item >= sc.total()) break;
      const Item it = schedule_item<C::BM>(sc, u.item);
      const int tw = tok_width(it.rows);
      if (C::BM == 256 && tw == 256)
        run_item<C::BM == 256 ? 256 : 128>(a, it, u, sm, fill);
      else if (tw == 128)
        run_item<128>(a, it, u, sm, fill);
      else if (tw == 96 && (!Mid || it.rows > 64))
        run_item<96>(a, it, u, sm, fill);
      else if constexpr (Mid)  // items of up to 64 tokens
        run_item<64>(a, it, u, sm, fill);
      else
        run_item<32>(a, it, u, sm, fill);
    }
  }
};

template <class Act, class Enc, int V, ItemSet S>
__global__ void __launch_bounds__(384, 1) wgmma_kernel(const WArgs a, const __grid_constant__ WMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using K = WKernel<Act, Enc, V, S>;
  using C = typename K::C;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // Stage buffers 1024-aligned (128-byte swizzle atoms), then the barriers
  // and the schedule arrays.
  // (Pointer arithmetic on the shared array keeps the address space known:
  // shared loads, not generic ones.)
  unsigned char* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + C::STAGES * C::STAGE);  // C::kBarriers
  int* s_tok = reinterpret_cast<int*>(bars + C::kBarriers);                   // schedule_ints(E): Schedule
  long long* scratch = reinterpret_cast<long long*>(smem);                    // stage 0 is free until the loop
  const int tid = threadIdx.x;

  typename K::Smem sm;
  sm.base = smem;
  sm.full = smem_addr(bars);
  sm.empty = smem_addr(bars + C::STAGES);
  sm.ready = smem_addr(bars + 2 * C::STAGES);
  if (tid == 0) {
    for (int s = 0; s < C::STAGES; ++s) {
      mbar_init(sm.full + 8 * s, 128);  // the producer's 128 threads (+ TMA bytes)
      mbar_init(sm.empty + 8 * s, 256);  // every consumer thread, after its own reads of the stage
    }
    mbar_init(sm.ready, 256);  // every consumer thread of the partner, remotely
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  if (tid == 32) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&maps.w)) : "memory");
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&maps.act[0])) : "memory");
  }

  // ---- schedule (Schedule): token ranges and the items by width class.
  int* s_cls = s_tok + (a.E + 1);
  int* s_meta = s_cls + kClasses * (a.E + 1);
  build_class_schedule<C::kThreads, C::BM>(a.counts, a.E, a.T, a.n_tiles, a.k_tiles, V == kGlu ? C::BN / 2 : C::BN,
                                           a.ordered != 0, a.split != 0, s_tok, s_cls, s_meta, scratch);
  __syncthreads();  // also publishes the barrier initialisation
  if (a.split) cluster_arrive_relaxed();  // exchange waits for the partner's barrier initialisation
  // The schedule's view, made after the register split (nothing kept live across it).
  const auto schedule = [&] { return Schedule(s_tok, s_cls, s_meta, a.E); };

  if (tid < 128) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (a.two_groups)
      K::template producer<true>(a, maps, sm, schedule());
    else
      K::template producer<false>(a, maps, sm, schedule());
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    K::consumer(a, sm, schedule());
    // Rows no expert covers are zero (read again: nothing kept live across the loop).
    const int covered = *reinterpret_cast<volatile int*>(s_tok + a.E);
    if (covered < a.T) {
      const int cols = V == kGlu ? a.glu : a.N;
      const int64_t n_zero = int64_t(a.T - covered) * cols;
      uint16_t* base = a.out + int64_t(covered) * cols;
      for (int64_t i = int64_t(blockIdx.x) * 256 + (tid - 128); i < n_zero; i += int64_t(gridDim.x) * 256) base[i] = 0;
    }
  }
  if (a.split) {  // leave with the partner: it may still read this CTA's shared memory (exchange)
    // (the consumers of a split item's halves waited for the first phase in exchange)
    if (tid < 128 || !runs_split_half(schedule(), gridDim.x, blockIdx.x)) cluster_wait();
    cluster_arrive();
    cluster_wait();
  }
#endif
}

// ---------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
// The driver's cuTensorMapEncodeTiled through the runtime (no link against
// libcuda), looked up once; null where the driver lacks it.
inline EncodeTiledFn encode_tiled() {
  static const EncodeTiledFn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) !=
            cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      f = nullptr;
    cudaGetLastError();
    return reinterpret_cast<EncodeTiledFn>(f);
  }();
  return fn;
}

// A 2-D map over a row-major [rows, cols] matrix of `elem`-byte elements
// (row stride `stride` bytes), box [box_rows, box_cols]; out-of-range
// elements read as zero.
inline bool make_map(CUtensorMap* m, const void* ptr, CUtensorMapDataType type, uint64_t cols, uint64_t rows,
                     uint64_t stride, uint32_t box_cols, uint32_t box_rows, CUtensorMapSwizzle swz,
                     CUtensorMapL2promotion promo = CU_TENSOR_MAP_L2_PROMOTION_L2_256B) {
  const EncodeTiledFn enc = encode_tiled();
  if (!enc) return false;
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {stride};
  const cuuint32_t box[2] = {box_cols, box_rows};
  const cuuint32_t estr[2] = {1, 1};
  return enc(m, type, 2, const_cast<void*>(ptr), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE, swz,
             promo, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The 3-D map of 16-bit [E, K, N] weights: dims {N, K, E}, box 64 n x 64 k x 1
// (128-byte swizzle); n and k past the ends read as zero.
inline bool make_map_ekn(CUtensorMap* m, const void* ptr, uint64_t n, uint64_t k, uint64_t e) {
  const EncodeTiledFn enc = encode_tiled();
  if (!enc || (n * 2) % 16 != 0) return false;
  const cuuint64_t dims[3] = {n, k, e};
  const cuuint64_t strides[2] = {n * 2, n * k * 2};
  const cuuint32_t box[3] = {64, 64, 1};
  const cuuint32_t estr[3] = {1, 1, 1};
  return enc(m, CU_TENSOR_MAP_DATA_TYPE_UINT16, 3, const_cast<void*>(ptr), dims, strides, box, estr,
             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Items by width class in snake order (Schedule) for quantized weights, where
// an expert has more than one token tile (the kernel checks the counts).
// H100, interleaved rounds: ARK's uneven t610u int4 / int8 0.74 / 0.71 of
// the time, Mixtral 4096 w2 0.93 / 0.95, the Mixtral layer at 512 tokens
// 0.91, Qwen3's at 4096 0.95; 16-bit weights keep the expert-major order
// (t610u bf16 1.05 times the time the other way: an expert's token tiles of
// one n tile then no longer run together, and their weights are read from
// DRAM again). QMOE_PREFILL_ORDER=0 turns it off.
template <class C>
int ordered_items() {
  static const bool on = env_int("QMOE_PREFILL_ORDER", 1) != 0;
  return !C::kNative && on;
}

// Launch attribute of the split tail: clusters of 2 CTAs (b, b + 1).
inline cudaLaunchAttribute cta_pairs() {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = 2;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  return attr;
}

// The split tail (unit_of_round) from this many k tiles on (each half then
// runs at least 4); QMOE_PREFILL_SPLIT=0 never, =1 from 2 k tiles.
constexpr int kSplitMinKTiles = 8;
inline bool use_split(int k_tiles) {
  const int o = split_override();
  static const int env = env_switch("QMOE_PREFILL_SPLIT");
  const int on = o >= 0 ? o : env;
  return on < 0 ? k_tiles >= kSplitMinKTiles : on == 1 && k_tiles >= 2;
}

template <class Act, class Enc, int V, ItemSet S>
bool launch_variant(const MoeGemmParams& p, cudaStream_t stream, Status* status, int64_t glu) {
  using C = WCfg<Act, Enc, S>;
  const auto kernel = wgmma_kernel<Act, Enc, V, S>;
  // Stage buffers (1024-aligned), barriers, the schedule.
  const auto smem_bytes_for = [](int64_t E) {
    return 1024 + int64_t(C::STAGES) * C::STAGE + 8 * C::kBarriers + 4 * schedule_ints(E);
  };

  constexpr int kMaxDevices = 64;
  struct DeviceInfo {
    int sms = 0, smem_optin = 0, major = 0;
    int pair_ctas = 0;  // CTAs co-resident as clusters of 2 (the split tail)
    bool ok = false;    // sm_90 with the sm_90a kernel compiled in, attributes set
  };
  static DeviceInfo info[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
    cudaGetLastError();
    return false;
  }
  std::call_once(once[dev], [&] {
    DeviceInfo d;
    cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev);
    cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev);
    if (d.major == 9) {
      // The kernel's body exists only in the sm_90a binary; a build without
      // it (e.g. sm_90 without 'a') has an empty stub with a handful of
      // registers: never launch that.
      cudaFuncAttributes fa{};
      d.ok = cudaFuncGetAttributes(&fa, kernel) == cudaSuccess && fa.binaryVersion == 90 && fa.numRegs >= 64 &&
             cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, d.smem_optin) == cudaSuccess;
      if (d.ok) {
        int clusters = 0;
        cudaLaunchAttribute attr = cta_pairs();
        cudaLaunchConfig_t cfg{};
        cfg.gridDim = dim3(unsigned(d.sms & ~1));
        cfg.blockDim = dim3(C::kThreads);
        // (one CTA an SM whatever E: the stages take more than half of it;
        // with E = 1024 int4 items would ask for more than an SM has)
        cfg.dynamicSmemBytes = size_t(smem_bytes_for(1));
        cfg.attrs = &attr;
        cfg.numAttrs = 1;
        if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) == cudaSuccess) d.pair_ctas = 2 * clusters;
      }
    }
    cudaGetLastError();
    info[dev] = d;
  });
  const DeviceInfo& d = info[dev];
  if (!d.ok || d.sms <= 0) return false;
  const int64_t smem_bytes = smem_bytes_for(p.num_experts);
  if (smem_bytes > d.smem_optin) return false;
  if (p.num_experts * p.n >= (int64_t(1) << 31)) return false;
  if (C::kScaled && p.n * (p.k / p.group_size) >= (int64_t(1) << 31)) return false;

  const int64_t kp = packed_k(p.weight_type, p.k) * (Enc::kBits == 16 ? 2 : 1);  // bytes per weight row
  WMaps maps;
  for (int i = 0; i < 4; ++i)
    if (!make_map(&maps.act[i], p.activations, CU_TENSOR_MAP_DATA_TYPE_UINT16, uint64_t(p.k), uint64_t(p.total_tokens),
                  uint64_t(p.k) * 2, C::BK, uint32_t(256 >> i), CU_TENSOR_MAP_SWIZZLE_128B))
      return false;
  const uint64_t wrows = uint64_t(p.num_experts * p.n);
  const bool ekn = V == kEKN;
  const bool wok = ekn ? make_map_ekn(&maps.w, p.weights, uint64_t(p.n), uint64_t(p.k), uint64_t(p.num_experts))
                 : C::kNative ? make_map(&maps.w, p.weights, CU_TENSOR_MAP_DATA_TYPE_UINT16, uint64_t(p.k), wrows,
                                         uint64_t(kp), C::BK, glu ? C::BN / 2 : C::BN, CU_TENSOR_MAP_SWIZZLE_128B)
                              : make_map(&maps.w, p.weights, CU_TENSOR_MAP_DATA_TYPE_UINT8, uint64_t(kp), wrows,
                                         uint64_t(kp), C::KPB, glu ? C::BN / 2 : C::BN, C::kWSwizzle, C::kWPromotion);
  if (!wok) return false;

  WArgs a;
  a.col_scales = ekn ? static_cast<const uint16_t*>(p.scales) : nullptr;
  a.scales = ekn ? nullptr : static_cast<const uint16_t*>(p.scales);
  a.zeros = static_cast<const uint16_t*>(p.zeros);
  a.counts = p.tokens_per_expert;
  a.out = static_cast<uint16_t*>(p.out);
  a.E = int(p.num_experts);
  a.N = int(p.n);
  a.K = int(p.k);
  a.T = int(p.total_tokens);
  a.groups = C::kScaled ? int(p.k / p.group_size) : 1;
  a.gdiv = C::kScaled ? group_divisor(p.group_size) : 0u;
  a.two_groups = C::kScaled && p.group_size % 64 != 0;
  a.glu = int(glu);
  a.ordered = ordered_items<C>();
  a.n_tiles = glu ? ceil_div(glu, C::BN / 2) : ceil_div(p.n, C::BN);
  a.k_tiles = ceil_div(p.k, C::BK);
  const int64_t max_items = int64_t(a.n_tiles) * ((p.total_tokens + C::BM - 1) / C::BM + p.num_experts);
  const int cap = grid_override() > 0 ? std::min(grid_override(), d.sms) : d.sms;
  // The split tail runs CTA pairs: an even grid, every CTA of it co-resident
  // in clusters of 2 (all the SMs, or it is not used), up to two a last-round item.
  a.split = WKernel<Act, Enc, V, S>::kSplit && use_split(a.k_tiles) && d.pair_ctas >= (d.sms & ~1);
  int grid = int(std::max<int64_t>(1, std::min<int64_t>(max_items, cap)));
  if (a.split) {
    grid = int(std::min<int64_t>(2 * max_items, std::min(cap, d.pair_ctas))) & ~1;
    if (grid < 2) {
      a.split = 0;
      grid = 1;
    }
  }
  // Launched normally, not early as the decode kernels are: an early launch
  // (PDL) saved 1-2% on small rows alone but took the 512-token layers of
  // Qwen1.5, DeepSeek and Qwen3 1.13, 1.08 and 1.04 times as long (H100): its
  // blocks hold SMs while they wait for the kernel before, beside the shared
  // expert's stream.
  if (a.split) {
    cudaLaunchAttribute attr = cta_pairs();
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(unsigned(grid));
    cfg.blockDim = dim3(C::kThreads);
    cfg.dynamicSmemBytes = size_t(smem_bytes);
    cfg.stream = stream;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    cudaLaunchKernelEx(&cfg, kernel, a, maps);
  } else {
    kernel<<<grid, C::kThreads, size_t(smem_bytes), stream>>>(a, maps);
  }
  *status = launch_status("prefill MoE kernel launch (wgmma)");
  note_pair_launch(a.split != 0);
  return true;
}

// The item set for quantized weights (set_item_set_override, prefill.cu,
// takes precedence; the tests force each):
//  - wide items (WCfg) from 512 tokens an expert on average. H200,
//    prefill_bench and model_bench, 15:25-15:30 UTC: Mixtral 4096 tokens
//    top-2 (~1000 an expert) int8 / fp8 0.81-0.83 of the time of 256-row
//    items, int4 0.85-0.95, its layer 0.92; at 32-66 tokens an expert (ARK's
//    t252, t528 rows) 1.2-1.5 times it (one m64 block a warpgroup: half the
//    decode work to hide the latency); the 4096-token layers of 256-384
//    tokens an expert (Qwen1.5, DeepSeek, Qwen3) 1.02-1.12 times it.
//    QMOE_PREFILL_WIDE=0 never, =1 always.
//  - token widths 64 / 96 / 128 instead of 32 / 96 / 128 (a fourth main loop
//    would serialise the kernel's wgmma, C7512) from 32 to 64 token copies an
//    expert on average, as the 512-token layers of Qwen1.5 (34), DeepSeek (48)
//    and Qwen3 (32) have: random routing spreads them over ~18-66 tokens an
//    expert (H100: their gate/up products 0.87-0.99 of the time of the 32 / 96
//    set, and 1.02-1.08 with those items 96 wide). ARK's t252 (31.5 an
//    expert, every expert 31 or 32) and t610u (uneven, 76) keep the 32 / 96
//    set: 1.06-1.11 times as long with this one. QMOE_PREFILL_MID=0 never, =1
//    always (where the items are not wide).
//  (Tried: items of 32 tokens with 4 KB token buffers, twice the stages, for
//  rows under 32 tokens an expert: ARK's t252 and 2048-wide rows 0.99 of the
//  time, H100, 2026-11-28: the bytes in flight do not bound them.)
inline ItemSet item_set(const MoeGemmParams& p) {
  const int o = item_set_override();
  if (o >= 0) return ItemSet(o);
  static const int wide = env_switch("QMOE_PREFILL_WIDE"), mid = env_switch("QMOE_PREFILL_MID");
  const int64_t T = p.total_tokens, E = p.num_experts;
  if (wide == 1 || (wide < 0 && T >= 512 * E)) return ItemSet::wide;
  if (mid == 1 || (mid < 0 && T >= 32 * E && T <= 64 * E)) return ItemSet::mid;
  return ItemSet::narrow;
}

// The variant for the call: [E, K, N] weights (16-bit only), the glu
// epilogue (N = 2 glu, [E, N, K] weights), or the plain product.
template <class Act, class Enc>
bool launch(const MoeGemmParams& p, cudaStream_t stream, Status* status, int64_t glu) {
  if (p.layout == WeightLayout::EKN) {
    if constexpr (WCfg<Act, Enc>::kNative) {
      if (!glu) return launch_variant<Act, Enc, kEKN, ItemSet::narrow>(p, stream, status, 0);
    }
    return false;
  }
  // Plain or glu, with wide items where they apply (quantized weights).
  const auto variant = [&](auto v) {
    constexpr int V = decltype(v)::value;
    if constexpr (!WCfg<Act, Enc>::kNative) {
      switch (item_set(p)) {
        case ItemSet::wide: return launch_variant<Act, Enc, V, ItemSet::wide>(p, stream, status, glu);
        case ItemSet::mid: return launch_variant<Act, Enc, V, ItemSet::mid>(p, stream, status, glu);
        case ItemSet::narrow: break;
      }
    }
    return launch_variant<Act, Enc, V, ItemSet::narrow>(p, stream, status, glu);
  };
  if (glu) return p.n == 2 * glu && variant(std::integral_constant<int, kGlu>{});
  return variant(std::integral_constant<int, kPlain>{});
}

template <class Act>
bool launch_for_act(const MoeGemmParams& p, cudaStream_t stream, Status* status, int64_t glu) {
  bool launched = false;
  visit_encoding(p.act_type, p.weight_type, p.asym, [&](auto act, auto enc) {
    if constexpr (std::is_same_v<decltype(act), Act>) launched = launch<Act, decltype(enc)>(p, stream, status, glu);
  });
  return launched;
}

}  // namespace qmoe::cuda::prefill::hopper
