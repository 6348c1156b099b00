// Every CPU kernel against the float64 reference, for every encoding, both
// activation dtypes, every phase, on fresh random data and odd shapes.
#include <gtest/gtest.h>

#include "harness.h"

namespace qmoe::test {
namespace {

enum class Entry { reference, decode, prefill, automatic };
const char* entry_name(Entry e) {
  switch (e) {
    case Entry::reference: return "reference";
    case Entry::decode: return "decode";
    case Entry::prefill: return "prefill";
    case Entry::automatic: return "auto";
  }
  return "?";
}

Status call(Entry entry, const MoeGemmParams& p) {
  switch (entry) {
    case Entry::reference: return moe_gemm_reference(p);
    case Entry::decode: return moe_gemm_decode(p);
    case Entry::prefill: return moe_gemm_prefill(p);
    case Entry::automatic: return moe(p);
  }
  return Status::invalid("entry");
}

std::vector<Shape> shapes() {
  return {
      {"basic", 48, 256, 64, {3, 1, 4}},
      {"empty_expert_odd_n", 37, 192, 32, {2, 0, 5, 1}},
      {"k_eq_group", 19, 128, 128, {1, 2}},
      {"t1", 16, 64, 32, {0, 1, 0}},
      {"t0", 24, 64, 32, {0, 0}},
      {"e1_prefill", 33, 96, 32, {40}},
      {"many_tokens", 40, 320, 64, {70, 3, 0, 25}},
  };
}

class CpuKernels : public ::testing::TestWithParam<std::tuple<ActType, Encoding, Entry>> {};

TEST_P(CpuKernels, MatchesFloat64Reference) {
  const auto [at, enc, entry] = GetParam();
  check_shapes(at, enc, shapes(), [entry = entry](Problem& pr) {
    const Status st = call(entry, pr.params);
    EXPECT_TRUE(st.ok()) << st.message;
    return pr.out;
  });
}

INSTANTIATE_TEST_SUITE_P(
    AllEncodings, CpuKernels,
    ::testing::Combine(::testing::Values(ActType::f16, ActType::bf16),
                       ::testing::ValuesIn(all_encodings()),
                       ::testing::Values(Entry::reference, Entry::decode, Entry::prefill,
                                         Entry::automatic)),
    [](const auto& info) {
      return name(std::get<0>(info.param), std::get<1>(info.param)) + "_" +
             entry_name(std::get<2>(info.param));
    });

TEST(CpuKernels, ManyExperts) {
  for (ActType at : {ActType::f16, ActType::bf16}) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE(seed);
    std::vector<int32_t> counts(256, 0);
    std::mt19937 rng{uint32_t(seed)};
    for (int i = 0; i < 300; ++i) counts[rng() % 256]++;
    Problem pr = Problem::random(at, {WeightType::int4, true}, 24, 64, 32, counts, seed);
    ASSERT_TRUE(moe(pr.params).ok());
    const Comparison c = compare(pr, pr.out, pr.reference());
    EXPECT_EQ(c.unwritten, 0);
    EXPECT_LT(c.rel_error, tolerance(at));
  }
}

TEST(CpuKernels, MoeGemmEKN) {
  for (ActType at : {ActType::f16, ActType::bf16})
    for (bool column_scales : {false, true}) {
      const uint64_t seed = fresh_seed();
      SCOPED_TRACE(seed);
      Problem pr = Problem::random(at, {WeightType::native16, false}, 35, 80, 0, {4, 0, 9}, seed,
                                   WeightLayout::EKN, column_scales);
      const Status st = moe_gemm(pr.params);
      ASSERT_TRUE(st.ok()) << st.message;
      const Comparison c = compare(pr, pr.out, pr.reference());
      EXPECT_EQ(c.unwritten, 0);
      EXPECT_LT(c.rel_error, tolerance(at));
    }
}

TEST(CpuKernels, ThreadCountDoesNotChangeBits) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed);
  Problem pr = Problem::random(ActType::bf16, {WeightType::int4, false}, 64, 256, 64, {5, 7}, seed);
  set_num_threads(1);
  ASSERT_TRUE(moe_gemm_prefill(pr.params).ok());
  const std::vector<uint16_t> one = pr.out;
  set_num_threads(3);
  EXPECT_EQ(num_threads(), 3);
  pr.poison();
  ASSERT_TRUE(moe_gemm_prefill(pr.params).ok());
  set_num_threads(0);
  EXPECT_EQ(one, pr.out);
}

TEST(CpuKernels, ChoosePhase) {
  MoeGemmParams p;
  p.num_experts = 8;
  p.total_tokens = 32;
  EXPECT_EQ(choose_phase(p, 4), Phase::decode);
  p.total_tokens = 33;
  EXPECT_EQ(choose_phase(p, 4), Phase::prefill);
}

}  // namespace
}  // namespace qmoe::test
