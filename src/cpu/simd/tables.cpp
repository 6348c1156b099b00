#include "cpu/simd/tables.h"

#include <chrono>

#include "core/encoding.h"

namespace qmoe::cpu::simd {

int code_values(ActType act, WeightType w, bool asym, float* values) {
  int n = 0;
  visit_encoding(act, w, asym, [&](auto, auto enc) {
    using Enc = decltype(enc);
    if constexpr (Enc::kBits < 16) {
      n = 1 << Enc::kBits;
      for (int c = 0; c < n; ++c) values[c] = Enc::value(uint32_t(c));
    }
  });
  return n;
}

}  // namespace qmoe::cpu::simd

namespace qmoe::cpu::simd {
int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
}  // namespace qmoe::cpu::simd
