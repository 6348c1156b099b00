// One test harness for every backend: random problems in the layouts of
// DESIGN.md §2, a float64 reference product, poisoned outputs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/encoding.h"
#include "qmoe/qmoe.h"

namespace qmoe::test {

// A fresh seed each run; tests print it (SCOPED_TRACE) so a failure can be replayed.
inline uint64_t fresh_seed() {
  if (const char* env = std::getenv("QMOE_TEST_SEED")) return std::strtoull(env, nullptr, 10);
  std::random_device rd;
  return (uint64_t(rd()) << 32) ^ rd();
}

// 0x7fff is NaN in both f16 and bf16: an element left unwritten shows up.
constexpr uint16_t kPoison = 0x7fff;

struct Encoding {
  WeightType type;
  bool asym;
};

inline std::vector<Encoding> all_encodings() {
  return {{WeightType::native16, false}, {WeightType::int8, false}, {WeightType::int8, true},
          {WeightType::int4, false},     {WeightType::int4, true},  {WeightType::int2, false},
          {WeightType::int2, true},      {WeightType::fp8_e4m3, false},
          {WeightType::fp8_e5m2, false}};
}

inline std::string name(ActType a, Encoding e) {
  return std::string(to_string(a)) + "_" + to_string(e.type) + (e.asym ? "_asym" : "");
}

inline double tolerance(ActType a) { return a == ActType::f16 ? 2e-3 : 1e-2; }

// Host buffers of one grouped product; `params` points into them.
struct Problem {
  MoeGemmParams params;
  std::vector<uint16_t> act, scales, zeros, out;
  std::vector<uint8_t> weights;
  std::vector<int32_t> counts;
  uint64_t seed = 0;

  static Problem random(ActType at, Encoding enc, int64_t N, int64_t K, int64_t group_size,
                        std::vector<int32_t> counts, uint64_t seed,
                        WeightLayout layout = WeightLayout::ENK, bool column_scales = false) {
    Problem pr;
    pr.seed = seed;
    pr.counts = std::move(counts);
    MoeGemmParams& p = pr.params;
    p.act_type = at;
    p.weight_type = enc.type;
    p.asym = enc.asym;
    p.layout = layout;
    p.num_experts = int64_t(pr.counts.size());
    p.n = N;
    p.k = K;
    p.group_size = enc.type == WeightType::native16 ? 0 : group_size;
    int64_t T = 0;
    for (int32_t c : pr.counts) T += c;
    p.total_tokens = T;

    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
    const auto to_act = [&](float v) {
      return at == ActType::f16 ? float_to_f16(v) : float_to_bf16(v);
    };
    pr.act.resize(size_t(T * K));
    for (auto& v : pr.act) v = to_act(unit(rng));

    const int64_t E = p.num_experts;
    if (enc.type == WeightType::native16) {
      pr.weights.resize(size_t(E * N * K * 2));
      auto* w16 = reinterpret_cast<uint16_t*>(pr.weights.data());
      for (int64_t i = 0; i < E * N * K; ++i) w16[i] = to_act(unit(rng) * 0.1f);
      if (column_scales) {
        pr.scales.resize(size_t(E * N));
        for (auto& s : pr.scales) s = to_act(0.5f + 0.5f * std::fabs(unit(rng)));
      }
    } else {
      const int64_t groups = K / group_size;
      pr.weights.resize(size_t(E * N * packed_k(enc.type, K)));
      for (auto& b : pr.weights) {
        b = uint8_t(rng());
        if (enc.type == WeightType::fp8_e4m3 && (b & 0x7f) == 0x7f) b ^= 0x01;  // no NaN
        if (enc.type == WeightType::fp8_e5m2 && (b & 0x7c) == 0x7c) b &= 0xbb;  // no inf/NaN
      }
      pr.scales.resize(size_t(E * N * groups));
      // fp8 codes reach 448 / 57344: smaller scales keep products in range.
      const float base = enc.type == WeightType::fp8_e4m3   ? 1e-3f
                         : enc.type == WeightType::fp8_e5m2 ? 1e-5f
                                                            : 1e-2f;
      for (auto& s : pr.scales) s = to_act(base * (0.5f + std::fabs(unit(rng))));
      if (enc.asym) {
        pr.zeros.resize(size_t(E * N * groups));
        const int levels = (1 << weight_bits(enc.type)) - 1;
        std::uniform_int_distribution<int> zd(0, levels);
        for (auto& z : pr.zeros) z = to_act(float(zd(rng)));
      }
    }
    pr.out.assign(size_t(T * N), kPoison);
    pr.bind();
    return pr;
  }

  // Re-points params at this object's buffers (after a copy or move).
  void bind() {
    params.activations = act.empty() ? nullptr : act.data();
    params.weights = weights.data();
    params.scales = scales.empty() ? nullptr : scales.data();
    params.zeros = zeros.empty() ? nullptr : zeros.data();
    params.tokens_per_expert = counts.data();
    params.out = out.empty() ? nullptr : out.data();
  }

  void poison() { std::fill(out.begin(), out.end(), kPoison); }

  double act_value(int64_t i) const {
    return params.act_type == ActType::f16 ? f16_to_float(act[i]) : bf16_to_float(act[i]);
  }
  double half_value(uint16_t h) const {
    return params.act_type == ActType::f16 ? f16_to_float(h) : bf16_to_float(h);
  }

  // Dequantized weight (n, k) of expert e, in float64.
  double weight(int64_t e, int64_t n, int64_t k) const {
    const MoeGemmParams& p = params;
    double v = 0;
    visit_encoding(p.act_type, p.weight_type, p.asym, [&](auto, auto enc) {
      using Enc = decltype(enc);
      if (p.layout == WeightLayout::EKN) {
        v = Enc::value(Enc::code(weights.data() + e * p.k * p.n * 2, k * p.n + n));
        return;
      }
      const uint8_t* row = weights.data() + (e * p.n + n) * row_bytes<Enc>(p.k);
      v = Enc::value(Enc::code(row, k));
      if constexpr (Enc::kScaled) {
        const int64_t g = (e * p.n + n) * (p.k / p.group_size) + k / p.group_size;
        if constexpr (Enc::kAsym) v -= half_value(zeros[g]);
        v *= half_value(scales[g]);
      }
    });
    return v;
  }

  // float64 reference [T, N].
  std::vector<double> reference() const {
    const MoeGemmParams& p = params;
    std::vector<double> ref(size_t(p.total_tokens * p.n), 0.0);
    std::vector<double> w(size_t(p.k));
    int64_t t0 = 0;
    for (int64_t e = 0; e < p.num_experts; ++e) {
      const int64_t t1 = t0 + counts[e];
      if (t1 > t0)
        for (int64_t n = 0; n < p.n; ++n) {
          for (int64_t k = 0; k < p.k; ++k) w[k] = weight(e, n, k);
          const double cs = (p.layout == WeightLayout::EKN && !scales.empty())
                                ? half_value(scales[e * p.n + n])
                                : 1.0;
          for (int64_t t = t0; t < t1; ++t) {
            double acc = 0;
            for (int64_t k = 0; k < p.k; ++k) acc += act_value(t * p.k + k) * w[k];
            ref[t * p.n + n] = acc * cs;
          }
        }
      t0 = t1;
    }
    return ref;
  }
};

struct Comparison {
  double rel_error = 0;
  int64_t unwritten = 0;  // NaN or inf in the output
};

// Below the output type's normal range (f16: 2^-14; bf16: 2^-126) values
// have a fixed step (f16: 2^-24), which near zero is more than the
// tolerance: 0.35% of a single f16 output near 1.7e-5 (the "n1" shape of
// the CPU SIMD tests, seed 15714580051863480195). One step of such an
// output's error is not counted (an fp32 sum in another order may round to
// the neighbour); outputs in the normal range are counted in full.
inline double subnormal_step(ActType at, double v) {
  const int bits = at == ActType::f16 ? 11 : 8;
  const int emin = at == ActType::f16 ? -14 : -126;
  return std::abs(v) < std::ldexp(1.0, emin) ? std::ldexp(1.0, emin - (bits - 1)) : 0.0;
}

// ‖out − ref‖ / ‖ref‖ over outputs stored as 16-bit act values (see subnormal_step).
inline Comparison compare(const Problem& pr, const std::vector<uint16_t>& out,
                          const std::vector<double>& ref) {
  Comparison c;
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double o = pr.half_value(out[i]);
    if (!std::isfinite(o)) {
      ++c.unwritten;
      continue;
    }
    const double e = std::max(0.0, std::abs(o - ref[i]) - subnormal_step(pr.params.act_type, ref[i]));
    num += e * e;
    den += ref[i] * ref[i];
  }
  c.rel_error = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return c;
}

// Every output written, and within the dtype's tolerance of float64.
inline void expect_matches_reference(const Problem& pr, const std::vector<uint16_t>& out) {
  const Comparison c = compare(pr, out, pr.reference());
  EXPECT_EQ(c.unwritten, 0);
  EXPECT_LT(c.rel_error, tolerance(pr.params.act_type));
}

// A problem shape for table-driven tests.
struct Shape {
  const char* label;
  int64_t n, k, group_size;
  std::vector<int32_t> counts;
};

// For each shape: a fresh random problem, `run(problem)` returns its output,
// checked against the float64 reference (the seed is printed on failure).
template <class Run>
void check_shapes(ActType at, Encoding enc, const std::vector<Shape>& shapes, Run run) {
  for (const Shape& s : shapes) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE(std::string(s.label) + " seed=" + std::to_string(seed));
    Problem pr = Problem::random(at, enc, s.n, s.k, s.group_size, s.counts, seed);
    const std::vector<uint16_t> out = run(pr);
    if (::testing::Test::HasFatalFailure()) return;
    expect_matches_reference(pr, out);
  }
}

}  // namespace qmoe::test
