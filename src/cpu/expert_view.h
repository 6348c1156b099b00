// Typed, bounds-free views of one call's tensors for the CPU kernels.
#pragma once

#include <algorithm>
#include <cstdint>

#include "core/encoding.h"

namespace qmoe::cpu {

// Expert offsets from the (already checked) host-side counts.
inline void expert_offsets(const MoeGemmParams& p, int64_t* offsets /* E + 1 */) {
  offsets[0] = 0;
  for (int64_t e = 0; e < p.num_experts; ++e) offsets[e + 1] = offsets[e] + p.tokens_per_expert[e];
}

// Dequantized weights of one call, element by element, through the trait.
template <class Act, class Enc>
struct WeightView {
  const uint8_t* w;
  const uint16_t* scales;
  const uint16_t* zeros;
  int64_t n, k, groups, group_size, row_bytes;
  bool kn;  // EKN layout (16-bit moe_gemm)

  explicit WeightView(const MoeGemmParams& p)
      : w(static_cast<const uint8_t*>(p.weights)),
        scales(static_cast<const uint16_t*>(p.scales)),
        zeros(static_cast<const uint16_t*>(p.zeros)),
        n(p.n),
        k(p.k),
        groups(Enc::kScaled ? p.k / p.group_size : 1),
        group_size(Enc::kScaled ? p.group_size : p.k),
        row_bytes(row_bytes_of(p)),
        kn(p.layout == WeightLayout::EKN) {}

  static int64_t row_bytes_of(const MoeGemmParams& p) { return qmoe::row_bytes<Enc>(p.k); }

  // Packed row n of expert e (ENK layout).
  const uint8_t* row(int64_t e, int64_t r) const { return w + (e * n + r) * row_bytes; }

  // Scale and zero of group g of row r of expert e.
  float scale(int64_t e, int64_t r, int64_t g) const {
    return Act::to_float(scales[(e * n + r) * groups + g]);
  }
  float zero(int64_t e, int64_t r, int64_t g) const {
    if constexpr (Enc::kAsym) return Act::to_float(zeros[(e * n + r) * groups + g]);
    return 0.0f;
  }

  // Dequantize row r of expert e, elements [k0, k0 + len), into dst.
  void dequant_row(int64_t e, int64_t r, int64_t k0, int64_t len, float* dst) const {
    if (kn) {  // [E, K, N]: element (k, r) at k * n + r
      const uint8_t* base = w + e * k * n * 2;
      for (int64_t i = 0; i < len; ++i) dst[i] = Enc::value(Enc::code(base, (k0 + i) * n + r));
      return;
    }
    const uint8_t* rp = row(e, r);
    if constexpr (!Enc::kScaled) {
      for (int64_t i = 0; i < len; ++i) dst[i] = Enc::value(Enc::code(rp, k0 + i));
    } else {
      int64_t i = 0;
      while (i < len) {
        const int64_t kk = k0 + i;
        const int64_t g = kk / group_size;
        const int64_t stop = std::min<int64_t>(len, (g + 1) * group_size - k0);
        const float s = scale(e, r, g);
        const float z = zero(e, r, g);
        for (; i < stop; ++i) dst[i] = (Enc::value(Enc::code(rp, k0 + i)) - z) * s;
      }
    }
  }

  // Optional per-output-column scale of the EKN layout.
  float column_scale(int64_t e, int64_t r) const {
    return (kn && scales) ? Act::to_float(scales[e * n + r]) : 1.0f;
  }
};

}  // namespace qmoe::cpu
