// Tiling and threading shared by every SIMD level and every encoding.
//
// Everything here is in an anonymous namespace on purpose: each level's file
// includes it and gets its own copy compiled with that level's flags, so no
// inline function compiled with -mavx512* can be picked by the linker for
// code that runs on a CPU without it.
//
// The plan of one call:
//   * experts with <= kDecodeMaxTokens tokens are "decode" experts: work items
//     are (expert, block of output rows); a row's packed weights are streamed
//     once and decoded in registers for all the expert's tokens;
//   * the others are "prefill" experts: work items are (expert, block of NB
//     rows); the block is decoded once into a panel in cache, then every
//     token of the expert is multiplied against it in MR x NR register tiles.
//   * activations are prepared once per call (converted, permuted into the
//     order the encoding's register decode produces, zero-padded to Kp).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "core/encoding.h"
#include "cpu/simd/simd.h"
#include "cpu/thread_pool.h"

namespace qmoe::cpu::simd {
namespace {

// Aligned heap buffer (no std::vector in the SIMD files: see above).
struct Buf {
  void* p = nullptr;
  Buf() = default;
  explicit Buf(size_t bytes) { alloc(bytes); }
  void alloc(size_t bytes) {
    std::free(p);
    p = bytes ? std::aligned_alloc(64, (bytes + 63) / 64 * 64) : nullptr;
  }
  ~Buf() { std::free(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

// A call's large scratch (the packed activations of prefill experts, the
// per-worker panels), kept by the calling thread for its next call: fresh
// pages cost a page fault and the kernel's zeroing each (1-3% of a 40 ms
// prefill call measured). Grow-only up to kCacheMax bytes a slot; a larger
// request gets a buffer of its own, freed with the call.
template <int Slot>
struct CachedBuf {
  static constexpr size_t kCacheMax = size_t(64) << 20;
  Buf own;
  void* p = nullptr;
  void alloc(size_t bytes) {
    static thread_local Buf cache;
    static thread_local size_t cap = 0;
    if (bytes > kCacheMax) {
      own.alloc(bytes);
      p = own.p;
      return;
    }
    if (cap < bytes) {
      cache.alloc(bytes);
      cap = bytes;
    }
    p = cache.p;
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(p);
  }
};

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// parallel_for_raw with a lambda f(item, worker).
template <class F>
void parallel(int64_t n, F& f) {
  parallel_for_raw(
      n, [](void* c, int64_t i, int w) { (*static_cast<F*>(c))(i, w); }, &f);
}

// Whether a level with register-decode unit `unit` (weights per decode step)
// takes this call: ENK layout, and every group made of whole units (16-bit
// weights have no groups; their K tail is masked).
inline bool can_run(const MoeGemmParams& p, int64_t unit) {
  if (p.layout != WeightLayout::ENK) return false;
  if (p.weight_type == WeightType::native16) return true;
  return p.group_size % unit == 0;
}

struct Item {
  int64_t expert, r0, r1;
  bool decode;
};

// The decomposition of one call into work items.
struct Plan {
  int64_t E = 0, N = 0, K = 0, T = 0;
  Buf offsets_buf, items_buf;
  int64_t* offsets = nullptr;  // [E + 1]
  Item* items = nullptr;
  int64_t n_items = 0;
  int64_t decode_tokens = 0, prefill_tokens = 0;
  int64_t prefill_experts = 0;  // experts of more than kDecodeMaxTokens tokens

  // decode_rows_cap: most rows per decode item; nb: rows per prefill item.
  // nb_floor: a level whose prefill items hold several panels first halves
  // nb (down to nb_floor) while there are fewer than 16 items a thread.
  Plan(const MoeGemmParams& p, int64_t row_bytes, int64_t nb, int threads, int64_t nb_floor = 0)
      : E(p.num_experts), N(p.n), K(p.k), T(p.total_tokens), offsets_buf(8 * (E + 1)) {
    offsets = offsets_buf.as<int64_t>();
    offsets[0] = 0;
    int64_t dec_experts = 0;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t c = p.tokens_per_expert[e];
      offsets[e + 1] = offsets[e] + c;
      if (c == 0) continue;
      if (c <= kDecodeMaxTokens) {
        ++dec_experts;
        decode_tokens += c;
      } else {
        ++prefill_experts;
        prefill_tokens += c;
      }
    }
    // Decode: long contiguous runs of rows (each thread streams its run
    // with the hardware prefetchers up to speed), about 4 items a thread
    // for balance, at least 64 KB each.
    const int64_t dec_rows_total = dec_experts * N;
    int64_t rb = max64(1, ceil_div(dec_rows_total, 4 * threads));
    rb = max64(rb, ceil_div(64 << 10, max64(1, row_bytes)));
    // Prefill: shrink the panel while there are fewer than 2 items a thread.
    while (nb > nb_floor && nb_floor > 0 && prefill_experts * ceil_div(N, nb) < 16 * threads) nb /= 2;
    while (nb > 8 && prefill_experts * ceil_div(N, nb) < 2 * threads) nb /= 2;
    const int64_t max_items = dec_experts * ceil_div(N, rb) + prefill_experts * ceil_div(N, nb);
    items_buf.alloc(sizeof(Item) * max64(1, max_items));
    items = items_buf.as<Item>();
    // Prefill items first (they are longer), then decode.
    for (int64_t e = 0; e < E; ++e) {
      const int64_t c = offsets[e + 1] - offsets[e];
      if (c > kDecodeMaxTokens)
        for (int64_t r = 0; r < N; r += nb) items[n_items++] = {e, r, min64(N, r + nb), false};
    }
    for (int64_t e = 0; e < E; ++e) {
      const int64_t c = offsets[e + 1] - offsets[e];
      if (c > 0 && c <= kDecodeMaxTokens)
        for (int64_t r = 0; r < N; r += rb) items[n_items++] = {e, r, min64(N, r + rb), true};
    }
    prefill_nb = nb;
  }
  int64_t prefill_nb = 0;
  int64_t tokens(int64_t e) const { return offsets[e + 1] - offsets[e]; }
  bool is_decode_expert(int64_t e) const {
    const int64_t c = tokens(e);
    return c > 0 && c <= kDecodeMaxTokens;
  }
};

// Per-expert dispatch of the decode row kernel on the (padded) token count.
// fn<NT>(...) is chosen among NT = 1, 2, 4, 8.
inline int padded_tokens(int64_t nt) { return nt <= 1 ? 1 : nt <= 2 ? 2 : nt <= 4 ? 4 : 8; }

}  // namespace
}  // namespace qmoe::cpu::simd
