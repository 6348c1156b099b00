// The tensor-core decode kernel (src/cuda/decode.cu) on the shapes that take
// its fast path and on their edges: every encoding x f16/bf16, 1..8 and more
// tokens per expert, N tails, partial macro steps, K = 10944 with group 64,
// many experts with few active, group sizes 32..256, every chunk width and
// K split, rows no expert covers, graph replay with a moving set of active
// experts. Each case calls the launcher directly (so a shape that silently
// fell back to the generic kernel would fail) and compares with the float64
// reference of harness.h on poisoned outputs.
#include <gtest/gtest.h>

#include <string>
#include <tuple>
#include <vector>

#include "cuda/decode.h"
#include "cuda/kernels.h"
#include "harness_cuda.h"

namespace qmoe::test {
namespace {

struct Case {
  std::string label;
  int64_t n, k, group_size;
  std::vector<int32_t> counts;
};

// Restores the launcher's own choices when a test ends.
struct TuningScope {
  explicit TuningScope(cuda::DecodeTuning t) : saved(cuda::decode_tuning()) { cuda::set_decode_tuning(t); }
  ~TuningScope() { cuda::set_decode_tuning(saved); }
  cuda::DecodeTuning saved;
};

std::vector<int32_t> sparse_counts(int E, std::vector<std::pair<int, int32_t>> active) {
  std::vector<int32_t> c(size_t(E), 0);
  for (auto [e, n] : active) c[size_t(e)] = n;
  return c;
}

enum class Path { fast, generic, any };

// Runs the decode launcher on a fresh random problem (the generic kernel
// through the public API where the launcher declines); `path` says which
// kernel must take it.
void run_case(ActType at, Encoding enc, const Case& cs, Path path = Path::fast) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(cs.label + " " + name(at, enc) + " N=" + std::to_string(cs.n) + " K=" + std::to_string(cs.k) +
               " g=" + std::to_string(cs.group_size) + " seed=" + std::to_string(seed));
  Problem pr = Problem::random(at, enc, cs.n, cs.k, cs.group_size, cs.counts, seed);
  DeviceProblem dp(pr);
  dp.poison();
  Status st;
  const bool launched = cuda::launch_decode(dp.params, nullptr, &st);
  if (path != Path::any)
    ASSERT_EQ(launched, path == Path::fast) << "fast path " << (launched ? "taken unexpectedly" : "not taken");
  if (!launched) st = moe_gemm_decode(dp.params, Device{DeviceType::cuda, 0, nullptr});
  ASSERT_TRUE(st.ok()) << st.message;
  QMOE_CUDA_OK(cudaDeviceSynchronize());
  const Comparison c = compare(pr, dp.out.download(), pr.reference());
  EXPECT_EQ(c.unwritten, 0);
  EXPECT_LT(c.rel_error, tolerance(at));
}

std::vector<Case> fast_cases() {
  std::vector<Case> cases = {
      {"tokens_1_to_8", 48, 256, 128, {1, 2, 3, 4, 5, 6, 7, 8}},
      {"more_than_8", 40, 512, 64, {9, 0, 16, 17, 3}},
      {"one_expert_40_tokens", 32, 256, 128, {40}},  // passes of 24 and 16 tokens
      {"small_groups_30_tokens", 24, 512, 32, {30, 1, 0, 17}},
      {"n1", 1, 256, 64, {2, 1}},
      {"n17", 17, 384, 128, {3}},
      {"n100", 100, 256, 32, {1, 0, 4}},
      {"k10944_g64", 24, 10944, 64, {1, 3}},
      {"k_eq_group", 33, 128, 128, {5, 2}},
      {"partial_macro", 21, 96, 32, {2, 6}},  // rows of 96 k: the last 4-lane step is partial
      {"many_experts_few_active", 32, 256, 128, sparse_counts(64, {{3, 1}, {40, 2}, {63, 1}})},
      {"e300_sparse", 16, 128, 64, sparse_counts(300, {{0, 1}, {31, 2}, {32, 1}, {200, 3}, {299, 1}})},
  };
  for (int64_t g : {32, 64, 128, 256}) cases.push_back({"group" + std::to_string(g), 35, 1024, g, {1, 4, 0, 2}});
  return cases;
}

using Typed = std::tuple<ActType, Encoding>;
class CudaDecode : public ::testing::TestWithParam<Typed> {};

TEST_P(CudaDecode, FastPathMatchesFloat64Reference) {
  QMOE_SKIP_WITHOUT_CUDA();
  const auto [at, enc] = GetParam();
  for (const Case& cs : fast_cases()) run_case(at, enc, cs);
}

// Every load pipeline, chunk width and K split on the same shapes (the
// launcher would pick only one of them for each; a forced width that the
// encoding cannot use falls back to the generic kernel).
TEST_P(CudaDecode, EveryVariant) {
  QMOE_SKIP_WITHOUT_CUDA();
  const auto [at, enc] = GetParam();
  const std::vector<Case> cases = {
      {"variant_g128", 40, 2048, 128, {1, 0, 7, 12}},
      {"variant_g64_partial", 19, 1088, 64, {3, 1}},
  };
  for (int pipe : {1, 2})
    for (int cb : {8, 16})
      for (int wk : {1, 2, 4, 8}) {
        TuningScope scope({cb, wk, pipe});
        for (const Case& cs : cases) {
          SCOPED_TRACE("pipeline=" + std::to_string(pipe) + " chunk_bytes=" + std::to_string(cb) +
                       " k_warps=" + std::to_string(wk));
          run_case(at, enc, cs, Path::any);
        }
      }
}

INSTANTIATE_TEST_SUITE_P(AllEncodings, CudaDecode,
                         ::testing::Combine(::testing::Values(ActType::f16, ActType::bf16),
                                            ::testing::ValuesIn(all_encodings())),
                         [](const auto& info) { return name(std::get<0>(info.param), std::get<1>(info.param)); });

// Shapes outside the fast path's rules go to the generic kernel (and are right).
TEST(CudaDecodeEdges, FallsBackOutsideItsRules) {
  QMOE_SKIP_WITHOUT_CUDA();
  run_case(ActType::bf16, {WeightType::int8, false}, {"k_not_multiple_of_8", 20, 36, 4, {2, 1}}, Path::generic);
  run_case(ActType::f16, {WeightType::int4, true}, {"group_not_power_of_two", 20, 288, 96, {2, 1}}, Path::generic);
  run_case(ActType::bf16, {WeightType::int2, false}, {"int2_group_16", 20, 256, 16, {1, 1}}, Path::generic);
  run_case(ActType::f16, {WeightType::native16, false}, {"native_k12", 20, 12, 0, {3}}, Path::generic);
}

// Counts summing to less than T: the rows no expert covers are exactly zero.
TEST(CudaDecodeEdges, UncoveredRowsAreZero) {
  QMOE_SKIP_WITHOUT_CUDA();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed);
  Problem pr = Problem::random(ActType::bf16, {WeightType::int4, false}, 50, 256, 128, {2, 3, 1}, seed);
  DeviceProblem dp(pr);
  dp.counts.upload({2, 1, 0});  // covers rows 0..2 of T = 6
  dp.poison();
  Status st;
  ASSERT_TRUE(cuda::launch_decode(dp.params, nullptr, &st));
  ASSERT_TRUE(st.ok()) << st.message;
  QMOE_CUDA_OK(cudaDeviceSynchronize());
  const std::vector<uint16_t> out = dp.out.download();
  Problem covered = pr;
  covered.counts = {2, 1, 0};
  covered.params.total_tokens = 3;
  covered.out.resize(size_t(3 * pr.params.n));
  covered.bind();
  const std::vector<double> ref = covered.reference();
  std::vector<uint16_t> head(out.begin(), out.begin() + 3 * pr.params.n);
  const Comparison c = compare(covered, head, ref);
  EXPECT_EQ(c.unwritten, 0);
  EXPECT_LT(c.rel_error, tolerance(ActType::bf16));
  for (size_t i = size_t(3 * pr.params.n); i < out.size(); ++i) ASSERT_EQ(out[i], 0) << "element " << i;
}

// Negative counts and counts past T stay in bounds (compute-sanitizer checks
// the accesses) and every output element is written.
TEST(CudaDecodeEdges, InconsistentCounts) {
  QMOE_SKIP_WITHOUT_CUDA();
  Problem pr = Problem::random(ActType::f16, {WeightType::fp8_e4m3, false}, 70, 512, 128, {3, 4, 2}, fresh_seed());
  for (std::vector<int32_t> bad : {std::vector<int32_t>{5, 9, 9}, std::vector<int32_t>{-7, 2, 100},
                                   std::vector<int32_t>{0, 2147483647, 2147483647}, std::vector<int32_t>{-1, -1, -1}}) {
    DeviceProblem dp(pr);
    dp.counts.upload(bad);
    dp.poison();
    Status st;
    ASSERT_TRUE(cuda::launch_decode(dp.params, nullptr, &st));
    ASSERT_TRUE(st.ok()) << st.message;
    QMOE_CUDA_OK(cudaDeviceSynchronize());
    for (uint16_t v : dp.out.download()) ASSERT_TRUE(std::isfinite(pr.half_value(v)));
  }
}

// One capture, replays with new weights, activations and a new set of active
// experts (including more than 8 tokens on one expert).
TEST(CudaDecodeEdges, GraphReplayMovesActiveExperts) {
  QMOE_SKIP_WITHOUT_CUDA();
  const int E = 40;
  const int64_t N = 72, K = 512;
  const int32_t T = 12;
  const std::vector<std::vector<int32_t>> rounds = {
      sparse_counts(E, {{0, 12}}), sparse_counts(E, {{39, 1}, {5, 11}}),
      sparse_counts(E, {{1, 1}, {2, 1}, {3, 1}, {4, 1}, {10, 1}, {11, 1}, {12, 1}, {13, 1}, {20, 1}, {21, 1},
                        {30, 1}, {31, 1}}),
      sparse_counts(E, {{7, 9}, {8, 3}})};
  Problem pr = Problem::random(ActType::bf16, {WeightType::int8, true}, N, K, 128, rounds[0], fresh_seed());
  DeviceProblem dp(pr);
  CapturedGraph g;
  bool launched = false;
  const Status st = g.capture([&](cudaStream_t stream) {
    Status s;
    launched = cuda::launch_decode(dp.params, stream, &s);
    return s;
  });
  ASSERT_TRUE(launched);
  ASSERT_TRUE(st.ok()) << st.message;
  for (const auto& counts : rounds) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE(seed);
    Problem next = Problem::random(ActType::bf16, {WeightType::int8, true}, N, K, 128, counts, seed);
    ASSERT_EQ(next.params.total_tokens, T);
    dp.load(next);
    QMOE_CUDA_OK(g.replay());
    const Comparison c = compare(next, dp.out.download(), next.reference());
    EXPECT_EQ(c.unwritten, 0);
    EXPECT_LT(c.rel_error, tolerance(ActType::bf16));
  }
}

// A small mixed set for compute-sanitizer (memcheck, racecheck): every
// encoding once, both scale modes, both chunk widths, K split, >8 tokens,
// N tail, partial macro step.
TEST(CudaDecodeSanitize, MixedShapes) {
  QMOE_SKIP_WITHOUT_CUDA();
  for (const Encoding& enc : all_encodings())
    for (ActType at : {ActType::f16, ActType::bf16}) {
      run_case(at, enc, {"san_g128", 37, 2048, 128, {1, 0, 9}});
      run_case(at, enc, {"san_g32_partial", 21, 96, 32, {2, 17}});
      run_case(at, enc, {"san_24_tokens", 18, 256, 64, {20, 1}});
    }
  for (int pipe : {1, 2}) {
    TuningScope scope({8, 8, pipe});
    run_case(ActType::bf16, {WeightType::int4, true}, {"san_cb8_wk8", 45, 4096, 128, {3, 0, 18}});
    run_case(ActType::f16, {WeightType::fp8_e4m3, false}, {"san_cb8_wk8_fp8", 40, 1024, 64, {9, 2}});
  }
}

}  // namespace
}  // namespace qmoe::test
