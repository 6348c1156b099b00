// Round-to-nearest quantizers and exact dequantizers (see qmoe/quantize.h).
#include "qmoe/quantize.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "core/encoding.h"
#include "cpu/thread_pool.h"

namespace qmoe {
namespace {

// The layout rules of the kernels, plus the buffers `who` needs: a and b are
// the float and packed weights, then the scales and zeros the encoding has.
Status check_spec(const char* who, const QuantSpec& s, int64_t E, int64_t N, int64_t K, const void* a,
                  const void* b, const void* scales, const void* zeros) {
  MoeGemmParams p;  // reuse the kernel argument rules for the layout
  p.act_type = s.act_type;
  p.weight_type = s.weight_type;
  p.asym = s.asym;
  p.num_experts = E;
  p.n = N;
  p.k = K;
  p.group_size = s.group_size;
  p.weights = a ? a : b;
  p.tokens_per_expert = reinterpret_cast<const int32_t*>(&p);  // not read
  const bool scaled = s.weight_type != WeightType::native16;
  p.scales = scaled ? &p : nullptr;
  p.zeros = s.asym ? &p : nullptr;
  if (!a || !b) return Status::invalid(std::string(who) + ": null weights pointer");
  if (Status st = validate(p, Device{}); !st.ok()) return st;
  if (scaled && !scales) return Status::invalid(std::string(who) + ": scales are required");
  if (s.asym && !zeros) return Status::invalid(std::string(who) + ": zeros are required for asym");
  return Status::success();
}

// Rounds a scale to what the activation dtype stores.
template <class Act>
float stored(float v) { return Act::to_float(Act::from_float(v)); }

}  // namespace

Status quantize(const QuantSpec& spec, int64_t E, int64_t N, int64_t K, const float* w,
                void* qweights, void* scales, void* zeros) {
  if (Status st = check_spec("quantize", spec, E, N, K, w, qweights, scales, zeros); !st.ok()) return st;

  visit_encoding(spec.act_type, spec.weight_type, spec.asym, [&](auto act, auto enc) {
    using Act = decltype(act);
    using Enc = decltype(enc);
    const int64_t rb = row_bytes<Enc>(K);
    const int64_t gs = Enc::kScaled ? spec.group_size : K;
    const int64_t groups = K / gs;
    auto* q = static_cast<uint8_t*>(qweights);
    auto* sc = static_cast<uint16_t*>(scales);
    auto* zp = static_cast<uint16_t*>(zeros);
    cpu::parallel_for(E * N, [&](int64_t row) {
      const float* src = w + row * K;
      uint8_t* dst = q + row * rb;
      std::fill(dst, dst + rb, uint8_t(0));
      for (int64_t g = 0; g < groups; ++g) {
        const float* x = src + g * gs;
        if constexpr (!Enc::kScaled) {
          for (int64_t i = 0; i < gs; ++i) Enc::put(dst, g * gs + i, Enc::encode(x[i]));
          continue;
        } else {
          float lo = x[0], hi = x[0];
          for (int64_t i = 1; i < gs; ++i) {
            lo = std::min(lo, x[i]);
            hi = std::max(hi, x[i]);
          }
          float s, z = 0.0f;
          if constexpr (Enc::kAsym) {
            // The range always contains 0 (as AutoRound's RTN does): a group of
            // one sign is then representable and the zero point stays in range.
            const float levels = float(Enc::kQmax);
            lo = std::min(lo, 0.0f);
            hi = std::max(hi, 0.0f);
            s = hi > lo ? (hi - lo) / levels : 1.0f;  // all-zero group: any scale works
            s = stored<Act>(s);
            z = s > 0.0f ? std::clamp(std::nearbyint(-lo / s), 0.0f, levels) : 0.0f;
            for (int64_t i = 0; i < gs; ++i)
              Enc::put(dst, g * gs + i, Enc::encode(s > 0.0f ? std::nearbyint(x[i] / s) + z : z));
            zp[row * groups + g] = Act::from_float(z);
          } else {
            const float absmax = std::max(std::fabs(lo), std::fabs(hi));
            float qmax;
            if constexpr (Enc::kType == WeightType::fp8_e4m3 || Enc::kType == WeightType::fp8_e5m2)
              qmax = Enc::kMax;
            else
              qmax = float(Enc::kQmax);
            s = stored<Act>(absmax / qmax);
            for (int64_t i = 0; i < gs; ++i)
              Enc::put(dst, g * gs + i, Enc::encode(s > 0.0f ? x[i] / s : 0.0f));
          }
          sc[row * groups + g] = Act::from_float(s);
        }
      }
    });
  });
  return Status::success();
}

Status dequantize(const QuantSpec& spec, int64_t E, int64_t N, int64_t K, const void* qweights,
                  const void* scales, const void* zeros, float* w) {
  if (Status st = check_spec("dequantize", spec, E, N, K, qweights, w, scales, zeros); !st.ok()) return st;

  visit_encoding(spec.act_type, spec.weight_type, spec.asym, [&](auto act, auto enc) {
    using Act = decltype(act);
    using Enc = decltype(enc);
    const int64_t rb = row_bytes<Enc>(K);
    const int64_t gs = Enc::kScaled ? spec.group_size : K;
    const int64_t groups = K / gs;
    const auto* q = static_cast<const uint8_t*>(qweights);
    const auto* sc = static_cast<const uint16_t*>(scales);
    const auto* zp = static_cast<const uint16_t*>(zeros);
    cpu::parallel_for(E * N, [&](int64_t row) {
      const uint8_t* src = q + row * rb;
      float* dst = w + row * K;
      for (int64_t k = 0; k < K; ++k) {
        float v = Enc::value(Enc::code(src, k));
        if constexpr (Enc::kScaled) {
          const int64_t g = row * groups + k / gs;
          if constexpr (Enc::kAsym) v -= Act::to_float(zp[g]);
          v *= Act::to_float(sc[g]);
        }
        dst[k] = v;
      }
    });
  });
  return Status::success();
}

}  // namespace qmoe
