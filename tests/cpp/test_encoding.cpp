// The encoding traits and the quantizers: exact conversions, packing, and
// dequantize(quantize(w)) within half a quantization step.
#include <gtest/gtest.h>

#include <cmath>

#include "harness.h"
#include "qmoe/quantize.h"

namespace qmoe::test {
namespace {

TEST(Conversions, Float16KnownValues) {
  EXPECT_EQ(float_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(float_to_f16(-2.0f), 0xc000);
  EXPECT_EQ(float_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(float_to_f16(65520.0f), 0x7c00);          // rounds to inf
  EXPECT_EQ(float_to_f16(5.9604645e-8f), 0x0001);     // smallest subnormal
  EXPECT_EQ(float_to_f16(1.0f + 1.0f / 2048), 0x3c00);  // tie to even (down)
  EXPECT_EQ(float_to_f16(1.0f + 3.0f / 2048), 0x3c02);  // tie to even (up)
  EXPECT_TRUE(std::isnan(f16_to_float(float_to_f16(NAN))));
  for (uint32_t h = 0; h < 0x10000; ++h) {  // every finite f16 survives the round trip
    if ((h & 0x7c00) == 0x7c00) continue;
    ASSERT_EQ(float_to_f16(f16_to_float(uint16_t(h))), h) << h;
  }
}

TEST(Conversions, BFloat16RoundsToNearestEven) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(float_to_bf16(bits_to_float(0x3f808000u)), 0x3f80);  // tie, even stays
  EXPECT_EQ(float_to_bf16(bits_to_float(0x3f818000u)), 0x3f82);  // tie, odd rounds up
  EXPECT_EQ(float_to_bf16(bits_to_float(0x3f808001u)), 0x3f81);
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if ((h & 0x7f80) == 0x7f80) continue;
    ASSERT_EQ(float_to_bf16(bf16_to_float(uint16_t(h))), h);
  }
}

TEST(Conversions, Fp8KnownValuesAndRoundTrip) {
  EXPECT_EQ(Fp8E4M3::to_float(0x7e), 448.0f);
  EXPECT_EQ(Fp8E4M3::to_float(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(Fp8E4M3::to_float(0x38), 1.0f);
  EXPECT_TRUE(std::isnan(Fp8E4M3::to_float(0x7f)));
  EXPECT_EQ(Fp8E5M2::to_float(0x7b), 57344.0f);
  EXPECT_EQ(Fp8E5M2::to_float(0x3c), 1.0f);
  EXPECT_TRUE(std::isinf(Fp8E5M2::to_float(0x7c)));
  EXPECT_EQ(Fp8E4M3::from_float(1000.0f), 0x7eu);   // saturates
  EXPECT_EQ(Fp8E4M3::from_float(-1000.0f), 0xfeu);
  EXPECT_EQ(Fp8E5M2::from_float(1e9f), 0x7bu);
  EXPECT_EQ(Fp8E4M3::from_float(1.0625f), 0x38u);    // tie between 1 and 1.125: even
  EXPECT_EQ(Fp8E4M3::from_float(1.1875f), 0x3au);    // tie between 1.125 and 1.25: even
  for (uint32_t c = 0; c < 256; ++c) {
    if (!Fp8E4M3::is_nan(c)) {
      const float v = Fp8E4M3::to_float(c);
      EXPECT_EQ(Fp8E4M3::from_float(v), v == 0 ? (c & 0x80) : c) << c;
    }
    if (!Fp8E5M2::is_nan(c) && (c & 0x7f) != 0x7c) {
      const float v = Fp8E5M2::to_float(c);
      EXPECT_EQ(Fp8E5M2::from_float(v), v == 0 ? (c & 0x80) : c) << c;
    }
  }
}

TEST(Packing, NibblesAndFieldsFollowTheLayout) {
  const uint8_t row[2] = {0x9c, 0x1b};  // int4: k0 = 0xc, k1 = 0x9, k2 = 0xb, k3 = 0x1
  EXPECT_EQ(Int4Sym::value(Int4Sym::code(row, 0)), -4.0f);
  EXPECT_EQ(Int4Sym::value(Int4Sym::code(row, 1)), -7.0f);
  EXPECT_EQ(Int4Asym::value(Int4Asym::code(row, 1)), 9.0f);
  EXPECT_EQ(Int4Sym::value(Int4Sym::code(row, 3)), 1.0f);
  // int2 of 0x9c = 0b10'01'11'00: k0 = 0, k1 = 3 (-1), k2 = 1, k3 = 2 (-2)
  EXPECT_EQ(Int2Sym::value(Int2Sym::code(row, 0)), 0.0f);
  EXPECT_EQ(Int2Sym::value(Int2Sym::code(row, 1)), -1.0f);
  EXPECT_EQ(Int2Sym::value(Int2Sym::code(row, 2)), 1.0f);
  EXPECT_EQ(Int2Sym::value(Int2Sym::code(row, 3)), -2.0f);
  EXPECT_EQ(Int2Asym::value(Int2Asym::code(row, 3)), 2.0f);
  EXPECT_EQ(Int8Sym::value(Int8Sym::code(row, 0)), -100.0f);
  EXPECT_EQ(Int8Asym::value(Int8Asym::code(row, 0)), 156.0f);
  uint8_t packed[2] = {0, 0};
  Int4Sym::put(packed, 0, Int4Sym::encode(-4));
  Int4Sym::put(packed, 1, Int4Sym::encode(-7));
  Int4Sym::put(packed, 3, Int4Sym::encode(1));
  EXPECT_EQ(packed[0], 0x9c);
  EXPECT_EQ(packed[1], 0x10);
}

class Quantizers : public ::testing::TestWithParam<std::tuple<ActType, Encoding>> {};

TEST_P(Quantizers, RoundTripWithinHalfAStep) {
  const auto [at, enc] = GetParam();
  const int64_t E = 2, N = 5, K = 128, gs = 32, groups = K / gs;
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, 0.05f);
  std::vector<float> w(size_t(E * N * K));
  for (auto& v : w) v = dist(rng);
  for (int i = 0; i < gs; ++i) w[size_t(3 * K + i)] = 0.0f;    // an all-zero group
  for (int i = 0; i < gs; ++i) w[size_t(4 * K + i)] = 0.02f;   // a constant group
  const QuantSpec spec{enc.type, enc.asym, at, enc.type == WeightType::native16 ? 0 : gs};
  std::vector<uint8_t> q(size_t(E * N * packed_k(enc.type, K)) * (enc.type == WeightType::native16 ? 2 : 1));
  std::vector<uint16_t> s(size_t(E * N * groups)), z(size_t(E * N * groups));
  const bool scaled = enc.type != WeightType::native16;
  ASSERT_TRUE(quantize(spec, E, N, K, w.data(), q.data(), scaled ? s.data() : nullptr,
                       enc.asym ? z.data() : nullptr).ok());
  std::vector<float> back(w.size());
  ASSERT_TRUE(dequantize(spec, E, N, K, q.data(), scaled ? s.data() : nullptr,
                         enc.asym ? z.data() : nullptr, back.data()).ok());
  const auto half = [&](uint16_t h) { return at == ActType::f16 ? f16_to_float(h) : bf16_to_float(h); };
  for (int64_t row = 0; row < E * N; ++row)
    for (int64_t k = 0; k < K; ++k) {
      const size_t i = size_t(row * K + k);
      const float step = scaled ? half(s[size_t(row * groups + k / gs)]) : 0.0f;
      float allowed;
      if (enc.type == WeightType::native16)
        allowed = std::fabs(w[i]) * (at == ActType::f16 ? 1.0f / 1024 : 1.0f / 128) + 3e-8f;  // + f16 subnormal step
      else if (enc.type == WeightType::fp8_e4m3 || enc.type == WeightType::fp8_e5m2)
        // relative precision of the format, plus the subnormal step near zero
        allowed = std::fabs(w[i]) * (enc.type == WeightType::fp8_e4m3 ? 1.0f / 16 : 1.0f / 8) +
                  step * (enc.type == WeightType::fp8_e4m3 ? 1.0f / 512 : 1.0f / 65536);
      else {
        // Half a step inside the range. At the ends of a group the stored
        // scale (rounded to 16 bits) can shrink the covered range by
        // levels * rounding, and asym adds up to half a step from rounding
        // the zero point.
        const float rounding = at == ActType::f16 ? 1.0f / 2048 : 1.0f / 256;
        const float levels = float((1 << weight_bits(enc.type)) - 1);
        allowed = step * (0.5f + (enc.asym ? 0.5f : 0.0f) + levels * rounding) + 1e-7f;
      }
      ASSERT_LE(std::fabs(back[i] - w[i]), allowed) << "row " << row << " k " << k;
    }
  for (int i = 0; i < gs; ++i) EXPECT_EQ(back[size_t(3 * K + i)], 0.0f);
}

INSTANTIATE_TEST_SUITE_P(AllEncodings, Quantizers,
                         ::testing::Combine(::testing::Values(ActType::f16, ActType::bf16),
                                            ::testing::ValuesIn(all_encodings())),
                         [](const auto& info) {
                           return name(std::get<0>(info.param), std::get<1>(info.param));
                         });

TEST(Quantizers, KnownCodes) {
  // int4 sym, group of 8 with absmax 7 -> scale 1, codes are the values.
  const float w[8] = {-7, -3, 0, 1, 2, 3.5f, 6.4f, 7};
  uint8_t q[4];
  uint16_t s;
  const QuantSpec spec{WeightType::int4, false, ActType::f16, 8};
  ASSERT_TRUE(quantize(spec, 1, 1, 8, w, q, &s, nullptr).ok());
  EXPECT_EQ(f16_to_float(s), 1.0f);
  EXPECT_EQ(q[0], 0xd9);  // -7 -> 9, -3 -> 0xd
  EXPECT_EQ(q[1], 0x10);  // 0, 1
  EXPECT_EQ(q[2], 0x42);  // 2, 3.5 -> 4 (half to even)
  EXPECT_EQ(q[3], 0x76);  // 6.4 -> 6, 7
  // int2 asym on [-1, 2]: scale 1, zero 1.
  const float w2[4] = {-1, 0, 1, 2};
  uint16_t z;
  ASSERT_TRUE(quantize({WeightType::int2, true, ActType::bf16, 4}, 1, 1, 4, w2, q, &s, &z).ok());
  EXPECT_EQ(bf16_to_float(s), 1.0f);
  EXPECT_EQ(bf16_to_float(z), 1.0f);
  EXPECT_EQ(q[0], 0b11100100);
}

TEST(Quantizers, RejectBadSpecs) {
  float w[8] = {};
  uint8_t q[8];
  uint16_t s[8];
  EXPECT_EQ(quantize({WeightType::int4, false, ActType::f16, 3}, 1, 1, 8, w, q, s, nullptr).code,
            StatusCode::invalid_argument);
  EXPECT_EQ(quantize({WeightType::fp8_e4m3, true, ActType::f16, 8}, 1, 1, 8, w, q, s, s).code,
            StatusCode::invalid_argument);
  EXPECT_EQ(quantize({WeightType::int8, false, ActType::f16, 8}, 1, 1, 8, w, q, nullptr, nullptr).code,
            StatusCode::invalid_argument);
  EXPECT_EQ(quantize({WeightType::int8, false, ActType::f16, 8}, 1, 1, 8, nullptr, q, s, nullptr).code,
            StatusCode::invalid_argument);
}

}  // namespace
}  // namespace qmoe::test
