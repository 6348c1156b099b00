// Every argument rule: a clear invalid_argument status naming the argument,
// and nothing written to `out`.
#include <gtest/gtest.h>

#include <functional>

#include "harness.h"

namespace qmoe::test {
namespace {

struct Case {
  const char* label;
  Encoding enc;
  std::function<void(MoeGemmParams&)> breaks;
  const char* message_mentions;
};

std::vector<Case> cases() {
  const Encoding i4{WeightType::int4, false}, i4a{WeightType::int4, true};
  const Encoding i2{WeightType::int2, false}, i8{WeightType::int8, false};
  const Encoding f8{WeightType::fp8_e4m3, false}, w16{WeightType::native16, false};
  static int32_t fake;
  return {
      {"bad_act_type", i4, [](auto& p) { p.act_type = ActType(7); }, "act_type"},
      {"bad_weight_type", i4, [](auto& p) { p.weight_type = WeightType(9); }, "weight_type"},
      {"zero_experts", i4, [](auto& p) { p.num_experts = 0; }, "num_experts"},
      {"zero_n", i4, [](auto& p) { p.n = 0; }, "N"},
      {"zero_k", i4, [](auto& p) { p.k = 0; }, "K"},
      {"negative_t", i4, [](auto& p) { p.total_tokens = -1; }, "total_tokens"},
      {"null_weights", i4, [](auto& p) { p.weights = nullptr; }, "weights"},
      {"null_counts", i4, [](auto& p) { p.tokens_per_expert = nullptr; }, "num_tokens_per_expert"},
      {"null_activations", i4, [](auto& p) { p.activations = nullptr; }, "activations"},
      {"null_out", i4, [](auto& p) { p.out = nullptr; }, "out"},
      {"group_zero", i4, [](auto& p) { p.group_size = 0; }, "group_size"},
      {"group_negative", i4, [](auto& p) { p.group_size = -32; }, "group_size"},
      {"group_not_dividing_k", i4, [](auto& p) { p.group_size = 48; }, "group_size"},
      {"int4_odd_group", i4, [](auto& p) { p.group_size = 1; }, "even"},
      {"int2_group_not_4", i2, [](auto& p) { p.group_size = 2; }, "multiple of 4"},
      {"missing_scales", i8, [](auto& p) { p.scales = nullptr; }, "scales"},
      {"asym_without_zeros", i4a, [](auto& p) { p.zeros = nullptr; }, "zeros"},
      {"zeros_without_asym", i4, [](auto& p) { p.zeros = &fake; }, "zeros"},
      {"fp8_asym", f8, [](auto& p) { p.asym = true; p.zeros = &fake; }, "fp8"},
      {"native16_with_scales", w16, [](auto& p) { p.scales = &fake; }, "scales"},
      {"native16_asym", w16, [](auto& p) { p.asym = true; }, "asym"},
      {"ekn_quantized", i4, [](auto& p) { p.layout = WeightLayout::EKN; }, "16-bit"},
  };
}

TEST(Validation, EveryRuleNamesItsArgument) {
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.label);
    Problem pr = Problem::random(ActType::bf16, c.enc, 32, 128, 32, {2, 1}, fresh_seed());
    MoeGemmParams p = pr.params;
    c.breaks(p);
    const Status st = p.layout == WeightLayout::EKN ? moe_gemm(p) : moe_gemm_decode(p);
    EXPECT_EQ(st.code, StatusCode::invalid_argument);
    EXPECT_NE(st.message.find(c.message_mentions), std::string::npos) << st.message;
    for (uint16_t v : pr.out) ASSERT_EQ(v, kPoison) << "output written on error";
  }
}

TEST(Validation, CountsMustSumToTAndBeNonNegative) {
  for (std::vector<int32_t> bad : {std::vector<int32_t>{2, 2}, std::vector<int32_t>{4, -1},
                                   std::vector<int32_t>{0, 0}}) {
    Problem pr = Problem::random(ActType::f16, {WeightType::int8, true}, 16, 64, 32, {2, 1}, fresh_seed());
    pr.counts = bad;
    pr.bind();
    for (const Status& st : {moe_gemm_decode(pr.params), moe_gemm_prefill(pr.params),
                             moe(pr.params), moe_gemm_reference(pr.params)}) {
      EXPECT_EQ(st.code, StatusCode::invalid_argument);
      EXPECT_NE(st.message.find("num_tokens_per_expert"), std::string::npos) << st.message;
    }
    for (uint16_t v : pr.out) ASSERT_EQ(v, kPoison);
  }
}

TEST(Validation, EntryPointsCheckTheirLayout) {
  Problem pr = Problem::random(ActType::f16, {WeightType::native16, false}, 16, 64, 0, {3}, fresh_seed());
  EXPECT_EQ(moe_gemm(pr.params).code, StatusCode::invalid_argument);  // ENK given to moe_gemm
  pr.params.layout = WeightLayout::EKN;
  EXPECT_EQ(moe_gemm_decode(pr.params).code, StatusCode::invalid_argument);
  EXPECT_EQ(moe(pr.params).code, StatusCode::invalid_argument);
  EXPECT_EQ(moe(pr.params, {}, Phase(9)).code, StatusCode::invalid_argument);
}

TEST(Validation, CudaWithoutCudaBuildIsUnsupported) {
  if (built_with_cuda()) GTEST_SKIP() << "this build has CUDA";
  Problem pr = Problem::random(ActType::f16, {WeightType::int4, false}, 16, 64, 32, {1}, fresh_seed());
  const Status st = moe_gemm_decode(pr.params, Device{DeviceType::cuda, 0, nullptr});
  EXPECT_EQ(st.code, StatusCode::unsupported);
  EXPECT_NE(st.message.find("CUDA"), std::string::npos);
}

}  // namespace
}  // namespace qmoe::test
