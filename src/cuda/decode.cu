// The tensor-core decode kernel: few tokens per expert, every weight
// encoding, bound by the bytes of weight read.
//
// Work split. A block of 8 warps takes one active expert (blockIdx.y is the
// index among the experts that have tokens, found on the device from the
// counts, so experts with no tokens cost neither weight traffic nor blocks)
// and 16 * wn consecutive output rows; its warps form a wn x wk grid: wn
// 16-row tiles, each tile's K range split among wk warps, which reduce
// through shared memory at the end (no workspace, no atomics).
//
// A warp computes a 16-row x 8-token tile with mma.sync.m16n8k16 (f16 or bf16
// operands, fp32 accumulation): weights are the A operand (m = 16 rows), the
// expert's tokens the B operand (n = 8; 9-24 tokens are 2-3 B fragments on
// the same A, more take several passes; for 9-24 tokens of 4-, 2- and
// 16-bit weights a warp takes two 16-row tiles, each B fragment feeding two A
// fragments: pairs_row_tiles). Lane (g = lane/4, c = lane%4) owns
// rows g and g+8 and, in each "macro step" of 4*CB bytes of a row, the
// CB-byte chunk c: one 16-byte (or 8-byte) load per row straight from the
// [E, N, K_packed] layout, no repack. The dot product does not care about the
// order of k, so mma step s of a chunk gives the lane's A slots
// {2c, 2c+1, 2c+8, 2c+9} the chunk's own k values [4s, 4s+4): the B fragment
// of (token g, c) is then the same four k of token g's activation row,
// contiguous words of one 16-byte load.
//
// Loads. A warp loads a group of 2-4 macro steps into registers (4 KB per
// warp in flight), then decodes and multiplies it ("regs"); or, with two
// buffers of half the size, issues the next group's loads before computing
// the current one ("prefetch"). On H100 (2026-11-27, same run) prefetch
// streams 16-bit weights 5-15% faster and ties on quantized weights, which
// keep regs (fewer registers). A cp.async ring in shared memory measured
// 10-30% slower than both on every row and was removed.
//
// Scales. When a group spans whole macro steps ("post"), the tensor cores
// take the integer (or fp8) values minus the zero point, exact in 16 bits,
// and the fp32 partial sum of each macro step is multiplied by the row's
// scale: exact operands, one fp32 multiply per macro step. Otherwise ("pre")
// each chunk's pairs are multiplied by their scale in 16-bit (one rounding,
// as the dequantized weight would have) before the mma.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <type_traits>

#include "core/env.h"
#include "core/routing.h"
#include "cuda/common.cuh"
#include "cuda/decode.h"
#include "cuda/dequant.cuh"
#include "cuda/kernels.h"

namespace qmoe::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxSlotsY = 65535;

enum class ScaleMode { none, post, pre };
// How a warp streams its weights (see "Loads" above).
enum class Pipe { regs = 1, prefetch = 2 };

struct DecodeArgs {
  const uint8_t* w;
  const uint16_t* act;
  const uint16_t* scales;
  const uint16_t* zeros;
  const int32_t* counts;
  uint16_t* out;
  int64_t T;
  int E, N, K;
  int64_t rb;     // bytes of one packed weight row
  int groups;     // K / group_size
  int pg_shift;   // log2 of the macro steps (post) or chunks (pre) per group
  int nmacro;     // macro steps per row: ceil(rb / (4 * CB))
  int wk, wn;     // warps of a block along K and along N (wk * wn == kWarps)
  int wk_shift, wn_shift;  // their log2 (powers of two: shifts, not divisions, before the first load)
  // Fused-layer options (DecodeFusion): activation row r is act_rows[r] when
  // act_rows is set; glu = I > 0: rows n and I + n are the gate and up rows
  // of output column n, out is [T, I] = SiLU(gate) * up.
  const int32_t* act_rows;
  int glu;
  int out_cols;   // N, or glu
  // The counts were written before the previous kernel of the stream (an
  // early launch may read them, and load weights, before wait_prior_grid).
  int counts_early;
};

// ------------------------------------------------------------------ loads
template <int CB>
struct Raw;
template <>
struct alignas(16) Raw<16> {
  uint32_t v[4];
};
template <>
struct alignas(8) Raw<8> {
  uint32_t v[2];
};

// Weights are read once: skip L1, and let L2 fetch whole 256-byte lines.
// (volatile: a load under a condition must not be speculated.)
__device__ __forceinline__ void load_stream(Raw<16>& r, const uint8_t* p) {
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(r.v[0]), "=r"(r.v[1]), "=r"(r.v[2]), "=r"(r.v[3])
      : "l"(p));
}
__device__ __forceinline__ void load_stream(Raw<8>& r, const uint8_t* p) {
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0,%1}, [%2];"
      : "=r"(r.v[0]), "=r"(r.v[1])
      : "l"(p));
}

// Activations are re-read by every row tile: keep them in L1. A plain load,
// not __ldg: in an early launch (common.cuh) they are the previous kernel's
// output, and a read-only load is an invariant load to the compiler, which
// may hoist it above wait_prior_grid (seen on H200: the fused layer's down
// product read rows of SiLU·mul before the gate/up product wrote them).
__device__ __forceinline__ void load_act(uint32_t* w, const uint16_t* p) {
  const uint4 x = *reinterpret_cast<const uint4*>(p);
  w[0] = x.x;
  w[1] = x.y;
  w[2] = x.z;
  w[3] = x.w;
}

// ------------------------------------------------------------------ mma
template <class Act>
__device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                    uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<Act, ActF16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// ------------------------------------------------------------------ schedule
// The j-th expert (in expert order) whose token range, clamped as in
// expert_range, is not empty. Called by whole warps; the result is uniform.
// The counts come from an earlier kernel of the stream: they are read through
// L2 (ld.global.cg, not an invariant __ldg that could be hoisted above
// wait_prior_grid or served from lines cached before that kernel wrote them).
struct Slot {
  int e;
  int64_t t0, t1;
};

__device__ __forceinline__ bool find_active_expert(const int32_t* __restrict__ counts, int E, int64_t T,
                                                   int j, Slot& s) {
  const int lane = threadIdx.x & 31;
  int64_t base = 0;  // clamped token offset of expert i0
  for (int i0 = 0; i0 < E && base < T; i0 += 32) {
    const int i = i0 + lane;
    const int64_t cnt = i < E ? max(__ldcg(counts + i), 0) : 0;
    int64_t incl = cnt;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    const int64_t b = min(base + incl - cnt, T), en = min(base + incl, T);
    const bool active = en > b;
    const unsigned mask = __ballot_sync(0xffffffffu, active);
    const int n = __popc(mask);
    if (j < n) {
      const bool me = active && __popc(mask & ((1u << lane) - 1u)) == j;
      const int src = __ffs(__ballot_sync(0xffffffffu, me)) - 1;
      s.e = i0 + src;
      s.t0 = __shfl_sync(0xffffffffu, b, src);
      s.t1 = __shfl_sync(0xffffffffu, en, src);
      return true;
    }
    j -= n;
    base = min(base + __shfl_sync(0xffffffffu, incl, 31), T);
  }
  return false;
}

// Rows [0, covered) belong to some expert; the rest are written as zeros.
__device__ __forceinline__ int64_t covered_by_counts(const int32_t* __restrict__ counts, int E, int64_t T) {
  const int lane = threadIdx.x & 31;
  int64_t base = 0;
  for (int i0 = 0; i0 < E && base < T; i0 += 32) {
    int64_t cnt = i0 + lane < E ? max(__ldcg(counts + i0 + lane), 0) : 0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) cnt += __shfl_xor_sync(0xffffffffu, cnt, o);
    base = min(base + cnt, T);
  }
  return base;
}

// ------------------------------------------------------------------ kernel
// Whether passes of 9+ tokens take two row tiles a warp (decode_tile's RT).
// Measured on H200 (Mixtral b64: 8 experts, up to 19 tokens each): int4 and int2 1.5x
// faster, bf16 1.2-1.4x, int8 3-9% slower (its 16-bit scaling costs more than
// the L1 traffic it saves, the activations being a smaller share of its
// bytes). Not in the prefetch pipeline of quantized weights (a tuning
// option): two tiles' buffers spill there.
template <class Enc, ScaleMode SM, Pipe P>
constexpr bool pairs_row_tiles() {
  if constexpr (SM == ScaleMode::none) return true;
  else return P == Pipe::regs && Enc::kBits <= 4;
}

// RT row tiles a warp: with RT = 2 (passes of 9-24 tokens) each B fragment
// of activations feeds two A fragments, half the activation traffic through
// L1 a weight byte (with three B fragments an A fragment, L1 throughput, not
// DRAM, bounded these passes: 96% of it, ncu, Mixtral b64 int4 on H200). The
// block's wn row tiles then go in pairs, and its K in twice the pieces.
template <class Act, class Enc, int CB, ScaleMode SM, Pipe P, int NC, int RT>
__device__ __forceinline__ void decode_tile(const DecodeArgs& a, const Slot& s, float (*red)[16][32]) {
  using D = Dequant<Act, Enc>;
  using H = Half<Act>;
  constexpr int kBits = Enc::kBits;
  constexpr int kMacro = 4 * CB;             // bytes of a row per macro step
  constexpr int kWords = CB / 4;             // 32-bit words per chunk
  constexpr int kK = CB * 8 / kBits;         // k values per chunk
  constexpr int kSteps = kK / 4;             // mma steps per chunk
  constexpr int kActVec = kK * 2 / 16;       // 16-byte activation loads per chunk
  // Macro steps per group (the unit of loading and of computing): 4 KB of
  // weights per warp in flight for NC = 1, less where the activation
  // fragments (kK per chunk and token pass) and zero points take registers;
  // half a group per buffer for the two buffers of the prefetch pipeline.
  constexpr int kURegs = std::max(1, (NC == 1 ? 64 : 32) / CB / (kK >= 32 && kBits < 4 ? 2 : 1) /
                                         (kK > 32 ? 2 : 1) / (NC >= 3 ? 2 : 1) /
                                         (SM == ScaleMode::pre || (Enc::kAsym && CB == 8) ? 2 : 1) / RT);
  constexpr int kU = P == Pipe::prefetch ? std::max(1, kURegs / 2) : kURegs;
  constexpr int kMacroK = kMacro * 8 / kBits;  // k values per macro step
  static_assert(kWords * D::kWordPairs == 2 * kSteps, "a chunk feeds whole mma steps");
  static_assert(kActVec >= 1, "activation chunk of at least 16 bytes");
  // Where the scale is applied: in fp32 after the mma ("post", also for
  // passes of 24 tokens: their partial sums fit 128 registers without spills)
  // or to the A operand in 16-bit ("pre"). Two row tiles (RT = 2) scale in
  // 16-bit whatever the group: fp32 partial sums of both tiles spill with
  // three B fragments, and measured no faster with two (H200, 12:50 UTC).
  constexpr bool kPost = SM == ScaleMode::post && RT == 1;
  constexpr bool kPre = SM == ScaleMode::pre || (SM == ScaleMode::post && RT == 2);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c = lane & 3;
  // The warp grid: wn / RT warps along N (RT tiles each), wk * RT along K
  // (the launcher keeps wn >= 2 wherever an expert may have 9+ tokens).
  const int wn_shift = a.wn_shift - (RT - 1), wk_shift = a.wk_shift + (RT - 1);
  const int wn = warp & ((1 << wn_shift) - 1), kw = warp >> wn_shift;
  // A tile is 16 rows, or (glu) 8 gate rows with their 8 up rows as rows 8-15
  // of the mma, so a lane holds gate and up of the same outputs.
  const int tile_rows = a.glu ? 8 : 16;
  const int n_first = (int(blockIdx.x) * a.wn + RT * wn) * tile_rows;
  const int rows = a.glu ? a.glu : a.N;
  const bool tile_ok = n_first < rows;  // (a second tile past the end computes row rows - 1 unstored)
  int64_t row0[RT], row1[RT];
  const uint8_t *w0[RT], *w1[RT];
#pragma unroll
  for (int rt = 0; rt < RT; ++rt) {
    const int n0 = n_first + rt * tile_rows;
    row0[rt] = int64_t(s.e) * a.N + min(n0 + g, rows - 1);
    row1[rt] = a.glu ? row0[rt] + a.glu : int64_t(s.e) * a.N + min(n0 + g + 8, a.N - 1);
    w0[rt] = a.w + row0[rt] * a.rb + c * CB;
    w1[rt] = a.w + row1[rt] * a.rb + c * CB;
  }
  const int m_begin = int((int64_t(kw) * a.nmacro) >> wk_shift);
  const int m_end = int((int64_t(kw + 1) * a.nmacro) >> wk_shift);

  for (int64_t tb = s.t0; tb < s.t1; tb += 8 * NC) {
    float acc[RT][NC][4];
#pragma unroll
    for (int rt = 0; rt < RT; ++rt)
#pragma unroll
      for (int ch = 0; ch < NC; ++ch)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[rt][ch][i] = 0.0f;

    // Row start of this lane's B token (tokens past the expert's end read the
    // expert's last row: their columns of the product are never stored).
    const uint16_t* arow[NC];  // the row of this lane's B token in each pass chunk
#pragma unroll
    for (int ch = 0; ch < NC; ++ch) {
      const int64_t r = min(tb + 8 * ch + g, s.t1 - 1);
      arow[ch] = a.act + (a.act_rows ? int64_t(__ldcg(a.act_rows + r)) : r) * a.K;
    }
    // Scales (and zeros) of rows g and g+8: offsets from the tensors' bases,
    // which stay kernel parameters (few registers held across the loop).
    int64_t so0[RT];
    int d01[RT];
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
      so0[rt] = row0[rt] * a.groups;
      d01[rt] = int((row1[rt] - row0[rt]) * a.groups);
    }

    // Loads of the kU macro steps from m (those before m_end); chunks past
    // the row's end (pre / none modes) read as zero codes, which decode to
    // finite values that the zero scale (pre) or value (none) nulls.
    const auto chunk_ok = [&](int mm) {
      return SM == ScaleMode::post || int64_t(mm) * kMacro + c * CB < a.rb;
    };
    // full: the whole group is before m_end, so no per-step bounds checks
    // (a constant where inlined: branch-free steps that the compiler can
    // interleave).
    // raw[u][2 * rt + h]: macro step m + u of row g + 8h of tile rt.
    const auto load_group = [&](const bool full, Raw<CB>(&raw)[kU][2 * RT], const int m) {
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int mm = m + u;
        if (!full && mm >= m_end) break;
#pragma unroll
        for (int rt = 0; rt < RT; ++rt) {
          if (chunk_ok(mm)) {
            load_stream(raw[u][2 * rt], w0[rt] + int64_t(mm) * kMacro);
            load_stream(raw[u][2 * rt + 1], w1[rt] + int64_t(mm) * kMacro);
          } else {
#pragma unroll
            for (int i = 0; i < kWords; ++i) raw[u][2 * rt].v[i] = raw[u][2 * rt + 1].v[i] = 0u;
          }
        }
      }
    };
    const auto compute_group = [&](const bool full, const Raw<CB>(&raw)[kU][2 * RT], const int m) {
      const uint16_t* ab[NC];  // this lane's chunk of macro step m, per pass chunk
#pragma unroll
      for (int ch = 0; ch < NC; ++ch) ab[ch] = arow[ch] + (c * kK + m * kMacroK);
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int mm = m + u;
        if (!full && mm >= m_end) break;
        const bool cok = chunk_ok(mm);

        // Scale and zero of rows g and g+8 of each tile for this macro step
        // (post) or chunk (pre).
        typename D::Zero z0[RT]{}, z1[RT]{};
        [[maybe_unused]] float s0[RT], s1[RT];
        [[maybe_unused]] uint32_t sp0[RT], sp1[RT];
#pragma unroll
        for (int rt = 0; rt < RT; ++rt) {
          s0[rt] = s1[rt] = 1.0f;
          sp0[rt] = sp1[rt] = 0u;
          if constexpr (SM != ScaleMode::none) {
            const int idx = SM == ScaleMode::post ? mm : 4 * mm + c;
            const int grp = min(idx >> a.pg_shift, a.groups - 1);  // chunks past the row's end
            const uint16_t* sc = a.scales + so0[rt] + grp;
            const uint16_t sb0 = __ldg(sc), sb1 = __ldg(sc + d01[rt]);
            if constexpr (Enc::kAsym) {
              const uint16_t* zr = a.zeros + so0[rt] + grp;
              z0[rt] = D::zero(H::to_float(__ldg(zr)));
              z1[rt] = D::zero(H::to_float(__ldg(zr + d01[rt])));
            } else {
              z0[rt] = z1[rt] = D::zero(0.0f);
            }
            if constexpr (kPost) {
              s0[rt] = H::to_float(sb0) * D::kPostScale;
              s1[rt] = H::to_float(sb1) * D::kPostScale;
            } else {
              sp0[rt] = cok ? uint32_t(sb0) * 0x10001u : 0u;
              sp1[rt] = cok ? uint32_t(sb1) * 0x10001u : 0u;
            }
          }
        }

        // Per 16-byte activation vector v (8 k = 2 mma steps): B fragments of
        // token 8ch + g, the weight words whose pairs start there decoded to
        // A fragments (rows g and g+8), then the mma steps. Written in this
        // order to keep few fragments alive at once.
        float part[RT][NC][4];  // (post only)
#pragma unroll
        for (int rt = 0; rt < RT; ++rt)
#pragma unroll
          for (int ch = 0; ch < NC; ++ch)
#pragma unroll
            for (int i = 0; i < 4; ++i) part[rt][ch][i] = 0.0f;
        float(*dst)[NC][4] = kPost ? part : acc;
        uint32_t pa[RT][2 * kSteps], pb[RT][2 * kSteps];
#pragma unroll
        for (int v = 0; v < kActVec; ++v) {
          uint32_t bw[NC][4];
#pragma unroll
          for (int ch = 0; ch < NC; ++ch) load_act(bw[ch], cok ? ab[ch] + (u * kMacroK + 8 * v) : arow[ch]);
#pragma unroll
          for (int rt = 0; rt < RT; ++rt) {
#pragma unroll
            for (int i = 0; i < kWords; ++i) {
              if ((i * D::kWordPairs) / 4 != v) continue;
              D::word(raw[u][2 * rt].v[i], z0[rt], pa[rt] + i * D::kWordPairs);
              D::word(raw[u][2 * rt + 1].v[i], z1[rt], pb[rt] + i * D::kWordPairs);
              if constexpr (kPre) {
#pragma unroll
                for (int q = i * D::kWordPairs; q < (i + 1) * D::kWordPairs; ++q) {
                  pa[rt][q] = H::mul(D::exact(pa[rt][q]), sp0[rt]);
                  pb[rt][q] = H::mul(D::exact(pb[rt][q]), sp1[rt]);
                }
              }
            }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int st = 2 * v + h;
#pragma unroll
              for (int ch = 0; ch < NC; ++ch)
                mma<Act>(dst[rt][ch], pa[rt][2 * st], pb[rt][2 * st], pa[rt][2 * st + 1],
                         pb[rt][2 * st + 1], bw[ch][2 * h], bw[ch][2 * h + 1]);
            }
          }
        }
        if constexpr (kPost) {
#pragma unroll
          for (int rt = 0; rt < RT; ++rt)
#pragma unroll
            for (int ch = 0; ch < NC; ++ch) {
              acc[rt][ch][0] = fmaf(s0[rt], part[rt][ch][0], acc[rt][ch][0]);
              acc[rt][ch][1] = fmaf(s0[rt], part[rt][ch][1], acc[rt][ch][1]);
              acc[rt][ch][2] = fmaf(s1[rt], part[rt][ch][2], acc[rt][ch][2]);
              acc[rt][ch][3] = fmaf(s1[rt], part[rt][ch][3], acc[rt][ch][3]);
            }
        }
      }
    };

    if (tile_ok && m_begin < m_end) {
      if constexpr (P == Pipe::prefetch) {
        // Two buffers: group m + kU is in flight while group m is computed.
        Raw<CB> ra[kU][2 * RT], rb[kU][2 * RT];
        wait_prior_grid();  // (weights first only in the regs pipeline: here it would spill)
        allow_next_grid();
        constexpr bool kChecked = false;
        load_group(kChecked, ra, m_begin);
        for (int m = m_begin; m < m_end; m += 2 * kU) {
          load_group(kChecked, rb, m + kU);  // loads nothing past m_end
          compute_group(kChecked, ra, m);
          if (m + kU >= m_end) break;
          load_group(kChecked, ra, m + 2 * kU);
          compute_group(kChecked, rb, m + kU);
        }
      } else {
        const auto step = [&](const bool full, const int m) {
          Raw<CB> raw[kU][2 * RT];
          load_group(full, raw, m);
          if (m == m_begin) {  // the weights are in flight; activations come from the previous kernel
            wait_prior_grid();
            allow_next_grid();
          }
          compute_group(full, raw, m);
        };
        for (int m = m_begin; m < m_end; m += kU) {
          if (m + kU <= m_end)  // two calls: each inlined copy sees a constant
            step(true, m);
          else
            step(false, m);
        }
      }
    }

    // Sum the partial tiles of the warps along K; warp kw == 0 writes. One
    // tile at a time: `red` holds 16 values a lane.
    const int nwk = 1 << wk_shift;
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
      if (nwk > 1) {
        const int slot0 = wn - (1 << wn_shift);  // slot of (kw, wn): (kw - 1) * warps along N + wn
        if (kw > 0) {
#pragma unroll
          for (int ch = 0; ch < NC; ++ch)
#pragma unroll
            for (int i = 0; i < 4; ++i) red[slot0 + (kw << wn_shift)][ch * 4 + i][lane] = acc[rt][ch][i];
        }
        __syncthreads();
        if (kw == 0) {
          for (int j = 1; j < nwk; ++j)
#pragma unroll
            for (int ch = 0; ch < NC; ++ch)
#pragma unroll
              for (int i = 0; i < 4; ++i) acc[rt][ch][i] += red[slot0 + (j << wn_shift)][ch * 4 + i][lane];
        }
        __syncthreads();  // `red` is reused by the next tile and pass
      }
    }
    if (kw == 0 && tile_ok) {
      // acc[rt][ch][2h + j]: row n0 + g + 8h of tile rt, token tb + 8ch + 2c + j.
#pragma unroll
      for (int rt = 0; rt < RT; ++rt) {
        const int n0 = n_first + rt * tile_rows;
#pragma unroll
        for (int ch = 0; ch < NC; ++ch)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int64_t t = tb + 8 * ch + 2 * c + j;
            if (t >= s.t1) continue;
            if (a.glu) {  // SiLU(gate) * up of the 16-bit products, as the unfused layer
              const int n = n0 + g;
              const float gate = H::to_float(H::from_float(acc[rt][ch][j]));
              const float up = H::to_float(H::from_float(acc[rt][ch][2 + j]));
              if (n < a.glu) a.out[t * a.glu + n] = H::from_float(silu(gate) * up);
              continue;
            }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int n = n0 + g + 8 * h;
              if (n < a.N) a.out[t * a.N + n] = H::from_float(acc[rt][ch][2 * h + j]);
            }
          }
      }
    }
  }
}

template <class Act, class Enc, int CB, ScaleMode SM, Pipe P>
__global__ void __launch_bounds__(kThreads, 2) decode_kernel(const DecodeArgs a) {
  __shared__ float red[kWarps - 1][16][32];

  // Early launch (common.cuh): without counts_early the counts come from the
  // previous kernel, so wait at once; otherwise decode_tile waits after its
  // first weight loads.
  if (!a.counts_early) {
    wait_prior_grid();
    allow_next_grid();
  }

  Slot s;
  if (find_active_expert(a.counts, a.E, a.T, int(blockIdx.y), s)) {
    // Tokens of the expert in passes of 8, 16 or 24 (one pass reads the
    // expert's weights once; more than 24 tokens take several passes). Small
    // groups (16-bit scaling) keep passes of at most 16 tokens: their extra
    // operands leave no registers for a third B fragment; nor do chunks of 64
    // codes (int2, 16-byte chunks). Passes of 9+ tokens take two row tiles a
    // warp.
    constexpr bool kThree = SM != ScaleMode::pre && CB * 8 / Enc::kBits <= 32;
    constexpr int kRT = pairs_row_tiles<Enc, SM, P>() ? 2 : 1;
    const int64_t nt = s.t1 - s.t0;
    if (nt <= 8)
      decode_tile<Act, Enc, CB, SM, P, 1, 1>(a, s, red);
    else if (nt <= 16 || !kThree)
      decode_tile<Act, Enc, CB, SM, P, 2, kRT>(a, s, red);
    else
      decode_tile<Act, Enc, CB, SM, P, kThree ? 3 : 2, kRT>(a, s, red);
  }

  // Rows that no expert covers (counts summing to less than T) are zeros
  // (after the products: an early launch writes only after its wait).
  if (blockIdx.y == 0) {
    wait_prior_grid();
    const int64_t covered = covered_by_counts(a.counts, a.E, a.T);
    const int64_t total = a.T * a.out_cols;
    for (int64_t i = covered * a.out_cols + int64_t(blockIdx.x) * kThreads + threadIdx.x; i < total;
         i += int64_t(gridDim.x) * kThreads)
      a.out[i] = 0;
  }
}

// ------------------------------------------------------------------ host
DecodeTuning tuning_from_env() {
  DecodeTuning t;
  t.chunk_bytes = env_int("QMOE_DECODE_CB", t.chunk_bytes);
  t.k_warps = env_int("QMOE_DECODE_WK", t.k_warps);
  t.pipeline = env_int("QMOE_DECODE_PIPE", t.pipeline);
  return t;
}

DecodeTuning& tuning() {
  static DecodeTuning t = tuning_from_env();
  return t;
}

int sm_count() {
  static int cached[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return 132;
  }
  if (dev >= 0 && dev < 64 && cached[dev] > 0) return cached[dev];
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) {
    cudaGetLastError();
    sms = 132;
  }
  if (dev >= 0 && dev < 64) cached[dev] = sms;
  return sms;
}

template <class Act, class Enc, int CB, ScaleMode SM, Pipe P>
Status launch_pipe(const MoeGemmParams& p, const DecodeFusion& f, cudaStream_t stream, int64_t rb,
                   int per_group) {
  constexpr int kMacro = 4 * CB;
  DecodeArgs a;
  a.w = static_cast<const uint8_t*>(p.weights);
  a.act = static_cast<const uint16_t*>(p.activations);
  a.scales = static_cast<const uint16_t*>(p.scales);
  a.zeros = static_cast<const uint16_t*>(p.zeros);
  a.counts = p.tokens_per_expert;
  a.out = static_cast<uint16_t*>(p.out);
  a.T = p.total_tokens;
  a.E = int(p.num_experts);
  a.N = int(p.n);
  a.K = int(p.k);
  a.rb = rb;
  a.act_rows = f.act_rows;
  a.glu = f.swiglu ? int(p.n / 2) : 0;
  a.out_cols = f.swiglu ? a.glu : a.N;
  a.groups = Enc::kScaled ? int(p.k / p.group_size) : 1;
  a.pg_shift = __builtin_ctz(unsigned(per_group));  // a power of two (launch_typed)
  a.nmacro = int((rb + kMacro - 1) / kMacro);

  // Enough warps to keep every SM's loads in flight even with 1-2 active
  // experts: split K among the warps of a block while the grid has fewer
  // than ~10 warps per SM and each warp keeps at least two macro steps
  // (measured on H100: more splitting than that costs more than it hides).
  const int64_t tiles = f.swiglu ? (p.n / 2 + 7) / 8 : (p.n + 15) / 16;
  const int64_t slots = std::min(p.num_experts, p.total_tokens);
  const int64_t target = int64_t(sm_count()) * 10;
  // Where an expert may have 9+ tokens and the kernel pairs row tiles, at
  // least two warps along N.
  const int max_wk = pairs_row_tiles<Enc, SM, P>() && p.total_tokens > 8 ? kWarps / 2 : kWarps;
  int wk = 1;
  if (tuning().k_warps > 0) {
    while (wk * 2 <= tuning().k_warps && wk < max_wk && a.nmacro >= 2 * wk) wk *= 2;
  } else {
    while (wk < max_wk && tiles * slots * wk < target && a.nmacro >= 4 * wk) wk *= 2;
  }
  a.wk = wk;
  a.wn = kWarps / wk;
  a.wk_shift = __builtin_ctz(unsigned(a.wk));
  a.wn_shift = __builtin_ctz(unsigned(a.wn));
  const dim3 grid(unsigned((tiles + a.wn - 1) / a.wn), unsigned(slots));
  // Early launch only for a grid of one wave (2 blocks an SM): on H100 it
  // took 3-12% off the batch-1 rows of ARK's decode product, while grids of
  // several waves measured up to 8% slower with it (int8 Mixtral rows).
  const bool early = f.early && int64_t(grid.x) * grid.y <= 2 * int64_t(sm_count());
  a.counts_early = early && f.counts_early;
  launch_kernel(decode_kernel<Act, Enc, CB, SM, P>, grid, dim3(kThreads), 0, stream, early, a);
  return launch_status("decode MoE kernel launch");
}

// Which load pipeline (QMOE_DECODE_PIPE / DecodeTuning::pipeline: 1 regs,
// 2 prefetch); by default prefetch for 16-bit weights, regs for the others
// (see "Loads" at the top).
template <class Act, class Enc, int CB, ScaleMode SM>
Status launch_one(const MoeGemmParams& p, const DecodeFusion& f, cudaStream_t stream, int64_t rb,
                  int per_group) {
  int pipe = tuning().pipeline;
  if (pipe != 1 && pipe != 2) pipe = SM == ScaleMode::none ? 2 : 1;
  if (pipe == 2) return launch_pipe<Act, Enc, CB, SM, Pipe::prefetch>(p, f, stream, rb, per_group);
  return launch_pipe<Act, Enc, CB, SM, Pipe::regs>(p, f, stream, rb, per_group);
}

template <class Act, class Enc>
bool launch_typed(const MoeGemmParams& p, const DecodeFusion& f, cudaStream_t stream, Status* status) {
  const int64_t rb = row_bytes<Enc>(p.k);
  const auto aligned = [](const void* ptr, int n) { return reinterpret_cast<uintptr_t>(ptr) % n == 0; };
  const int want = tuning().chunk_bytes;
  const auto allow = [&](int cb) { return (want != 8 && want != 16) || want == cb; };

  if constexpr (!Enc::kScaled) {
    if (rb % 16 != 0 || !aligned(p.weights, 16)) return false;
    *status = launch_one<Act, Enc, 16, ScaleMode::none>(p, f, stream, rb, 1);
    return true;
  } else {
    constexpr int kBits = Enc::kBits;
    const int64_t gs = p.group_size;
    if ((gs * kBits) % 8 != 0) return false;
    const int64_t gb = gs * kBits / 8;  // bytes of a group along a row
    const auto fits = [&](int cb) { return allow(cb) && rb % cb == 0 && aligned(p.weights, cb); };
    const auto pow2 = [](int64_t x) { return x > 0 && (x & (x - 1)) == 0 && x <= (int64_t(1) << 30); };
    // In order of preference: scale in fp32 per 4-lane macro step of 64 or
    // 32 bytes; else scale in 16-bit per lane chunk of 16 or 8 bytes (int2
    // only with 8-byte chunks: 64 codes a chunk leave no registers for the
    // 16-bit scaling).
    if (fits(16) && gb % 64 == 0 && pow2(gb / 64)) {
      *status = launch_one<Act, Enc, 16, ScaleMode::post>(p, f, stream, rb, int(gb / 64));
      return true;
    }
    if (fits(8) && gb % 32 == 0 && pow2(gb / 32)) {
      *status = launch_one<Act, Enc, 8, ScaleMode::post>(p, f, stream, rb, int(gb / 32));
      return true;
    }
    if constexpr (kBits >= 4) {
      if (fits(16) && gs % (16 * 8 / kBits) == 0 && pow2(gs / (16 * 8 / kBits))) {
        *status = launch_one<Act, Enc, 16, ScaleMode::pre>(p, f, stream, rb, int(gs / (16 * 8 / kBits)));
        return true;
      }
    }
    if (fits(8) && gs % (8 * 8 / kBits) == 0 && pow2(gs / (8 * 8 / kBits))) {
      *status = launch_one<Act, Enc, 8, ScaleMode::pre>(p, f, stream, rb, int(gs / (8 * 8 / kBits)));
      return true;
    }
    return false;
  }
}

}  // namespace

void set_decode_tuning(const DecodeTuning& t) { tuning() = t; }
DecodeTuning decode_tuning() { return tuning(); }

// Shapes handled: [E, N, K_packed] weights; K % 8 == 0 and activations
// 16-byte aligned (16-byte activation loads); rows of a multiple of 8 or 16
// bytes, weights aligned to that; a group size that covers whole 4-lane macro
// steps (scale applied in fp32) or whole per-lane chunks (scale applied in
// 16-bit). Any N, any token counts, any E up to 65535 active slots.
bool launch_decode(const MoeGemmParams& p, cudaStream_t stream, Status* status, const DecodeFusion& fusion) {
  if (p.layout != WeightLayout::ENK || p.total_tokens <= 0) return false;
  if (fusion.swiglu && p.n % 2 != 0) return false;
  if (p.k % 8 != 0 || p.k > INT_MAX || p.n > INT_MAX || p.num_experts > INT_MAX) return false;
  if (std::min(p.num_experts, p.total_tokens) > kMaxSlotsY) return false;
  if ((p.n + 15) / 16 > int64_t(UINT_MAX)) return false;
  if (reinterpret_cast<uintptr_t>(p.activations) % 16 != 0) return false;
  bool launched = false;
  visit_encoding(p.act_type, p.weight_type, p.asym, [&](auto act, auto enc) {
    launched = launch_typed<decltype(act), decltype(enc)>(p, fusion, stream, status);
  });
  return launched;
}

}  // namespace qmoe::cuda
