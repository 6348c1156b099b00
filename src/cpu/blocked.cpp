// Portable blocked CPU kernel: a work item is (expert, tile of kRows output
// rows); it dequantizes a [kRows, kChunk] weight tile once into a float
// buffer and reuses it for every token of the expert, so each weight byte is
// read and decoded once per call whatever the number of tokens.
#include <algorithm>
#include <vector>

#include "core/backend.h"
#include "cpu/blocked.h"
#include "cpu/expert_view.h"
#include "cpu/thread_pool.h"

namespace qmoe::cpu {
namespace {

constexpr int64_t kRows = 16;     // output rows per work item
constexpr int64_t kChunk = 512;   // K elements per dequantized tile (32 KB of floats)

float dot(const float* a, const float* b, int64_t n) {
  // Eight independent partial sums: lets the compiler vectorise without
  // reassociation flags.
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += a[i + j] * b[i + j];
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + tail;
}

}  // namespace

Status run_blocked(const MoeGemmParams& p) {
  std::vector<int64_t> offsets(p.num_experts + 1);
  expert_offsets(p, offsets.data());
  const int64_t T = p.total_tokens, K = p.k, N = p.n;
  if (T == 0) return Status::success();

  visit_encoding(p.act_type, p.weight_type, p.asym, [&](auto act, auto enc) {
    using Act = decltype(act);
    using Enc = decltype(enc);
    const WeightView<Act, Enc> w(p);

    // Activations to float once (the CPU path may allocate).
    std::vector<float> a(size_t(T * K));
    const auto* a16 = static_cast<const uint16_t*>(p.activations);
    parallel_for((T + 63) / 64, [&](int64_t blk) {
      const int64_t t1 = std::min(T, (blk + 1) * 64);
      for (int64_t i = blk * 64 * K; i < t1 * K; ++i) a[i] = Act::to_float(a16[i]);
    });

    // Work items: only experts with tokens.
    std::vector<int64_t> item_expert, item_tile;
    const int64_t tiles = (N + kRows - 1) / kRows;
    for (int64_t e = 0; e < p.num_experts; ++e)
      if (offsets[e + 1] > offsets[e])
        for (int64_t tile = 0; tile < tiles; ++tile) {
          item_expert.push_back(e);
          item_tile.push_back(tile);
        }

    auto* out = static_cast<uint16_t*>(p.out);
    parallel_for(int64_t(item_expert.size()), [&](int64_t item) {
      const int64_t e = item_expert[item];
      const int64_t r0 = item_tile[item] * kRows;
      const int64_t rows = std::min(kRows, N - r0);
      const int64_t t0 = offsets[e], nt = offsets[e + 1] - offsets[e];
      std::vector<float> tile(size_t(kRows * kChunk));
      std::vector<float> acc(size_t(nt * kRows), 0.0f);
      for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
        const int64_t len = std::min(kChunk, K - k0);
        for (int64_t r = 0; r < rows; ++r) w.dequant_row(e, r0 + r, k0, len, &tile[r * kChunk]);
        for (int64_t t = 0; t < nt; ++t) {
          const float* at = &a[(t0 + t) * K + k0];
          for (int64_t r = 0; r < rows; ++r) acc[t * kRows + r] += dot(at, &tile[r * kChunk], len);
        }
      }
      for (int64_t t = 0; t < nt; ++t)
        for (int64_t r = 0; r < rows; ++r)
          out[(t0 + t) * N + r0 + r] =
              Act::from_float(acc[t * kRows + r] * w.column_scale(e, r0 + r));
    });
  });
  return Status::success();
}

}  // namespace qmoe::cpu
