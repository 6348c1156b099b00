// The CUDA backend through the public API: every encoding × dtype × phase
// against the float64 reference, poisoned outputs, odd shapes, counts that
// disagree with T, CUDA-graph capture and replay with new data.
#include <gtest/gtest.h>

#include "harness_cuda.h"

namespace qmoe::test {
namespace {

Device cuda_device(cudaStream_t s = nullptr) { return Device{DeviceType::cuda, 0, s}; }

std::vector<Shape> shapes() {
  return {
      {"aligned_decode", 256, 1024, 128, {1, 2, 0, 8}},
      {"odd_n_empty", 37, 192, 32, {2, 0, 5, 1}},
      {"k_eq_group", 19, 128, 128, {1, 2}},
      {"t1", 64, 512, 64, {0, 1, 0}},
      {"t0", 24, 64, 32, {0, 0}},
      {"prefill_uneven", 160, 384, 64, {70, 3, 0, 129}},
      {"k10944_g64", 48, 10944, 64, {1, 3}},
  };
}

using Phased = std::tuple<ActType, Encoding, Phase>;
class CudaKernels : public ::testing::TestWithParam<Phased> {};

TEST_P(CudaKernels, MatchesFloat64Reference) {
  QMOE_SKIP_WITHOUT_CUDA();
  const auto [at, enc, phase] = GetParam();
  check_shapes(at, enc, shapes(), [phase = phase](Problem& pr) {
    DeviceProblem dp(pr);
    dp.poison();
    const Status st = moe(dp.params, cuda_device(), phase);
    EXPECT_TRUE(st.ok()) << st.message;
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    return dp.out.download();
  });
}

INSTANTIATE_TEST_SUITE_P(
    AllEncodings, CudaKernels,
    ::testing::Combine(::testing::Values(ActType::f16, ActType::bf16),
                       ::testing::ValuesIn(all_encodings()),
                       ::testing::Values(Phase::decode, Phase::prefill, Phase::automatic)),
    [](const auto& info) {
      const Phase ph = std::get<2>(info.param);
      return name(std::get<0>(info.param), std::get<1>(info.param)) +
             (ph == Phase::decode ? "_decode" : ph == Phase::prefill ? "_prefill" : "_auto");
    });

TEST(CudaKernels, MoeGemmEKN) {
  QMOE_SKIP_WITHOUT_CUDA();
  for (ActType at : {ActType::f16, ActType::bf16})
    for (bool column_scales : {false, true}) {
      const uint64_t seed = fresh_seed();
      SCOPED_TRACE(seed);
      Problem pr = Problem::random(at, {WeightType::native16, false}, 35, 80, 0, {4, 0, 9}, seed,
                                   WeightLayout::EKN, column_scales);
      DeviceProblem dp(pr);
      dp.poison();
      ASSERT_TRUE(moe_gemm(dp.params, cuda_device()).ok());
      QMOE_CUDA_OK(cudaDeviceSynchronize());
      const Comparison c = compare(pr, dp.out.download(), pr.reference());
      EXPECT_EQ(c.unwritten, 0);
      EXPECT_LT(c.rel_error, tolerance(at));
    }
}

// Counts that sum past T, or are negative, must not read or write out of
// bounds (compute-sanitizer checks the accesses); rows no expert covers are 0.
TEST(CudaKernels, InconsistentCountsStayInBounds) {
  QMOE_SKIP_WITHOUT_CUDA();
  const uint64_t seed = fresh_seed();
  Problem pr = Problem::random(ActType::bf16, {WeightType::int4, false}, 64, 256, 64, {2, 2}, seed);
  for (std::vector<int32_t> bad : {std::vector<int32_t>{3, 5}, std::vector<int32_t>{-4, 1},
                                   std::vector<int32_t>{1000000, 1}}) {
    DeviceProblem dp(pr);
    dp.counts.upload(bad);
    dp.poison();
    for (Phase ph : {Phase::decode, Phase::prefill})
      ASSERT_TRUE(moe(dp.params, cuda_device(), ph).ok());
    QMOE_CUDA_OK(cudaDeviceSynchronize());
    for (uint16_t v : dp.out.download()) EXPECT_TRUE(std::isfinite(pr.half_value(v)));
  }
}

// Capture once, then replay with new activations, new weights in the same
// buffers and new counts: the graph must read them all from the device.
TEST(CudaKernels, GraphCaptureReplaysWithNewData) {
  QMOE_SKIP_WITHOUT_CUDA();
  for (Phase phase : {Phase::decode, Phase::prefill}) {
    const int64_t N = 128, K = 512;
    const int32_t T = phase == Phase::decode ? 8 : 96;
    const std::vector<int32_t> first{T / 2, 0, T / 2, 0};
    Problem pr = Problem::random(ActType::f16, {WeightType::int4, true}, N, K, 128, first, fresh_seed());
    DeviceProblem dp(pr);
    CapturedGraph g;
    const Status st = g.capture([&](cudaStream_t stream) { return moe(dp.params, cuda_device(stream), phase); });
    ASSERT_TRUE(st.ok()) << st.message;
    for (int round = 0; round < 3; ++round) {
      const uint64_t seed = fresh_seed();
      SCOPED_TRACE(seed);
      std::vector<int32_t> counts = {round, T - 2 * round, 0, round};  // same T, new split
      Problem next = Problem::random(ActType::f16, {WeightType::int4, true}, N, K, 128, counts, seed);
      dp.load(next);
      QMOE_CUDA_OK(g.replay());
      const Comparison c = compare(next, dp.out.download(), next.reference());
      EXPECT_EQ(c.unwritten, 0);
      EXPECT_LT(c.rel_error, tolerance(ActType::f16));
    }
  }
}

TEST(CudaKernels, RejectsHostPointers) {
  QMOE_SKIP_WITHOUT_CUDA();
  Problem pr = Problem::random(ActType::bf16, {WeightType::int8, false}, 16, 64, 32, {1}, fresh_seed());
  const Status st = moe_gemm_decode(pr.params, cuda_device());
  EXPECT_EQ(st.code, StatusCode::invalid_argument);
  EXPECT_NE(st.message.find("activations"), std::string::npos) << st.message;
}

}  // namespace
}  // namespace qmoe::test
