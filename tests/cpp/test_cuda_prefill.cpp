// The CUDA prefill fast path (src/cuda/prefill*.cu): every encoding x
// f16/bf16 against the float64 reference with poisoned outputs; uneven and
// empty experts, partial token tiles of every size, K not a multiple of 128,
// N not a multiple of 16 (nor of 8), T from 1 to 8192, counts inconsistent
// with T, CUDA-graph capture with new data and new splits, and the shapes the
// fast path must leave to the fallback kernels.
//
// The fast path is called directly (launch_prefill must take the shape, so a
// silent fallback cannot hide a broken kernel) and through the public API.
// Both kernels of the fast path are checked: the mma.sync kernel everywhere
// and, on sm_90 devices, the Hopper wgmma kernel (prefill_wgmma.cuh), each
// forced in turn, with the path that ran checked after every launch.
#include <gtest/gtest.h>

#include <numeric>

#include "cuda/kernels.h"
#include "cuda/prefill_schedule.h"
#include "harness_cuda.h"

// Switches of the fast path (src/cuda/prefill.cu): scale loads (0 cp.async
// where the layout allows, 1 plain loads) and weight-tile rows (0 auto, 1
// only 256, 2 only 128); -1 restores the environment's choice.
namespace qmoe::cuda::prefill {
void set_overrides(int scales, int tiles);
void set_wgmma_override(int on);  // 0 off, 1 on (where it applies), -1 environment
void set_item_set_override(int set);  // the wgmma kernel's item set (ItemSet), -1 automatic
void set_split_override(int on);      // the wgmma kernel's split tail: -1 automatic, 0 never, 1 wherever it applies
void set_grid_override(int ctas);     // at most this many CTAs (0: no cap)
bool last_pair_launch();             // the last wgmma launch ran in CTA pairs (the split tail possible)
int last_path();                  // 1 mma.sync, 2 wgmma, 3 the decode kernel
}  // namespace qmoe::cuda::prefill

namespace qmoe::test {
namespace {

Device cuda_device(cudaStream_t s = nullptr) { return Device{DeviceType::cuda, 0, s}; }

// Forces the fast path's scale and tile choices for one scope.
struct Overrides {
  Overrides(int scales, int tiles) { cuda::prefill::set_overrides(scales, tiles); }
  ~Overrides() { cuda::prefill::set_overrides(-1, -1); }
};

// Which kernel of the fast path runs.
enum class Path { mma, wgmma };
std::string path_name(Path p) { return p == Path::mma ? "mma.sync" : "wgmma"; }

bool is_hopper() {
  int major = 0;
  return cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0) == cudaSuccess && major == 9;
}
// The paths this device runs: the wgmma kernel only on sm_90.
std::vector<Path> paths() {
  if (is_hopper()) return {Path::mma, Path::wgmma};
  return {Path::mma};
}

// Forces one kernel for a scope.
struct PathScope {
  explicit PathScope(Path p) { cuda::prefill::set_wgmma_override(p == Path::wgmma ? 1 : 0); }
  ~PathScope() { cuda::prefill::set_wgmma_override(-1); }
};

// After a launch that took the fast path: the forced kernel ran.
void expect_path(Path p) { EXPECT_EQ(cuda::prefill::last_path(), p == Path::wgmma ? 2 : 1) << path_name(p); }

struct Shape {
  const char* label;
  int64_t n, k, group_size;
  std::vector<int32_t> counts;
};

// Runs the fast path on a fresh random problem and compares with float64.
void check_fast_path(ActType at, Encoding enc, const Shape& s, bool expect_fast = true, Path path = Path::mma) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(std::string(s.label) + " " + name(at, enc) + " " + path_name(path) + " seed=" + std::to_string(seed));
  PathScope scope(path);
  Problem pr = Problem::random(at, enc, s.n, s.k, s.group_size, s.counts, seed);
  DeviceProblem dp(pr);
  dp.poison();
  Status st;
  const bool fast = cuda::launch_prefill(dp.params, nullptr, &st);
  ASSERT_EQ(fast, expect_fast);
  if (!fast) return;
  expect_path(path);
  ASSERT_TRUE(st.ok()) << st.message;
  QMOE_CUDA_OK(cudaDeviceSynchronize());
  const Comparison c = compare(pr, dp.out.download(), pr.reference());
  EXPECT_EQ(c.unwritten, 0);
  EXPECT_LT(c.rel_error, tolerance(at));
}

std::vector<Shape> shapes() {
  return {
      // Token tiles of 64 with partial tiles of 1..4 m16 fragments, an empty expert.
      {"uneven_empty", 256, 256, 64, {70, 0, 3, 129, 40, 20}},
      // N not a multiple of 8 (scalar stores), K = 192 (not a multiple of 128).
      {"odd_n", 37, 192, 32, {1, 17, 0, 64}},
      // N a multiple of 8 but not of 16 and past one 256-row tile; K = 320.
      {"n_tail", 264, 320, 64, {33, 100}},
      // K = group_size.
      {"k_eq_group", 64, 128, 128, {16, 48}},
      // One token.
      {"t1", 128, 256, 128, {0, 1, 0}},
      // group_size 96: the two k chunks of a tile straddle a group boundary
      // (groups 2j, 2j + 1 of one scale word); 4 groups, async scales.
      {"gs96", 136, 384, 96, {90, 7, 33}},
      // group_size 160, K = 960 (15 k tiles): not a multiple of 64, so the
      // wgmma producer loads both chunks' groups every tile (its Two path),
      // over tiles that repeat the tile before's groups and tiles that
      // straddle a group boundary. (Groups of 64k, whose tiles after a
      // group's first reuse its kept words, are the other shapes' 64 / 128.)
      {"gs160", 72, 960, 160, {40, 0, 90}},
      // Token tiles of 128 + 2 and of every token width (32, 64, 96, 128,
      // and 256 with wide items) at its edges; N past one 256-row tile;
      // group 64.
      {"tok_widths", 300, 192, 64, {130, 0, 32, 33, 64, 65, 96, 97, 256, 257, 129, 520}},
  };
}

using Param = std::tuple<ActType, Encoding>;
class CudaPrefill : public ::testing::TestWithParam<Param> {};

// The wgmma kernel's item sets for quantized weights (prefill_schedule.h).
using cuda::prefill::ItemSet;
constexpr ItemSet kItemSets[] = {ItemSet::narrow, ItemSet::wide, ItemSet::mid};
std::string set_name(ItemSet s) {
  return s == ItemSet::wide ? "wide items" : s == ItemSet::mid ? "widths 64/96/128" : "widths 32/96/128";
}

// One item set for one scope.
struct ItemSetScope {
  explicit ItemSetScope(ItemSet s) { cuda::prefill::set_item_set_override(int(s)); }
  ~ItemSetScope() { cuda::prefill::set_item_set_override(-1); }
};

// The wgmma kernel's split tail (prefill_schedule.h, unit_of_round) for a
// scope: at most `grid` CTAs, so that small shapes run several rounds, and
// the split forced on (from 2 k tiles), so that the items of a last round of
// at most grid / 2 run as CTA pairs, the helper of each handing its partial
// sums to the owner through distributed shared memory. grid 0: the defaults.
struct SplitScope {
  explicit SplitScope(int grid) {
    cuda::prefill::set_split_override(grid > 0 ? 1 : -1);
    cuda::prefill::set_grid_override(grid);
  }
  ~SplitScope() {
    cuda::prefill::set_split_override(-1);
    cuda::prefill::set_grid_override(0);
  }
};
std::string split_name(int grid) { return grid > 0 ? "split tail, " + std::to_string(grid) + " CTAs" : "default grid"; }

TEST_P(CudaPrefill, MatchesFloat64Reference) {
  QMOE_SKIP_WITHOUT_CUDA();
  const auto [at, enc] = GetParam();
  for (const Path path : paths())
    for (const ItemSet set : kItemSets) {  // (wgmma, quantized weights: every item set)
      if (set != ItemSet::narrow && (path != Path::wgmma || enc.type == WeightType::native16)) continue;
      SCOPED_TRACE(set_name(set));
      ItemSetScope scope(set);
      for (const Shape& s : shapes()) check_fast_path(at, enc, s, true, path);
      // K = 96: the last k tile is half full (int2 needs K % 64 == 0: fallback).
      check_fast_path(at, enc, {"k_half_tile", 40, 96, 32, {5, 9}}, enc.type != WeightType::int2, path);
      // K = 800, group 160: the half tile at the end repeats the last group.
      check_fast_path(at, enc, {"gs160_half_tile", 72, 800, 160, {40, 0, 90}}, enc.type != WeightType::int2, path);
    }
}

// The split tail on every shape above and three more, with every item set:
// caps of 2 and 6 CTAs give last rounds of 1..3 items (split where they are
// at most half the CTAs) on shapes of 1..17 items, odd k-tile counts split
// unevenly; split items 128 wide (split_w128) and 256 wide (split_w256, wide
// items: the largest exchange), and a split in the snake order's odd round
// (split_odd_round at 2 CTAs). Every launch must run in CTA pairs.
TEST_P(CudaPrefill, SplitTailOnWgmma) {
  QMOE_SKIP_WITHOUT_CUDA();
  if (!is_hopper()) GTEST_SKIP() << "the split tail is the sm_90 wgmma kernel's";
  const auto [at, enc] = GetParam();
  std::vector<Shape> all = shapes();
  all.push_back({"split_w128", 256, 512, 128, {128, 120, 97}});
  all.push_back({"split_w256", 128, 512, 128, {256, 200, 230}});
  all.push_back({"split_odd_round", 256, 512, 128, {300}});
  for (const ItemSet set : kItemSets) {
    if (set != ItemSet::narrow && enc.type == WeightType::native16) continue;
    ItemSetScope set_scope(set);
    for (const int grid : {2, 6}) {
      SCOPED_TRACE(set_name(set) + ", " + split_name(grid));
      SplitScope split(grid);
      for (const Shape& s : all) {
        check_fast_path(at, enc, s, true, Path::wgmma);
        EXPECT_TRUE(cuda::prefill::last_pair_launch()) << s.label;
      }
    }
  }
}

// Every schedule (256-row tiles, 128-row tiles) with both scale paths
// (cp.async words, plain loads), whatever the automatic choice would be. The
// shapes above take the 128-row tiles by themselves (few items), and the
// async scales where the group count is even; with odd counts (n_tail,
// k_eq_group, k_half_tile) the plain loads.
TEST_P(CudaPrefill, EverySchedule) {
  QMOE_SKIP_WITHOUT_CUDA();
  const auto [at, enc] = GetParam();
  for (const auto& [scales, tiles] : {std::pair{0, 1}, std::pair{1, 1}, std::pair{1, 2}, std::pair{0, 2}}) {
    SCOPED_TRACE("scales=" + std::to_string(scales) + " tiles=" + std::to_string(tiles));
    Overrides o(scales, tiles);
    for (const Shape& s : shapes()) check_fast_path(at, enc, s, true, Path::mma);
  }
}

// Many experts, random counts with zeros, through the public API as well
// (each kernel of the fast path).
TEST_P(CudaPrefill, ManyExpertsPublicApi) {
  QMOE_SKIP_WITHOUT_CUDA();
  const auto [at, enc] = GetParam();
  for (const Path path : paths()) {
    PathScope scope(path);
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE(name(at, enc) + " " + path_name(path) + " seed=" + std::to_string(seed));
    std::mt19937_64 rng(seed);
    std::vector<int32_t> counts(40);
    for (auto& c : counts) c = (rng() % 3 == 0) ? 0 : int32_t(rng() % 90);
    Problem pr = Problem::random(at, enc, 72, 256, 128, counts, seed);
    DeviceProblem dp(pr);
    dp.poison();
    const Status st = moe_gemm_prefill(dp.params, cuda_device());
    ASSERT_TRUE(st.ok()) << st.message;
    expect_path(path);
    QMOE_CUDA_OK(cudaDeviceSynchronize());
    const Comparison c = compare(pr, dp.out.download(), pr.reference());
    EXPECT_EQ(c.unwritten, 0);
    EXPECT_LT(c.rel_error, tolerance(at));
  }
}

// No kernel forced: moe_gemm_prefill takes the decode kernel for quantized
// weights with at most 16 tokens an expert on average (and for 16-bit weights
// never), a prefill kernel above; both against float64, uneven counts with an
// empty expert and one expert past a decode pass (24 tokens).
TEST_P(CudaPrefill, PublicApiPicksDecodeForFewTokens) {
  QMOE_SKIP_WITHOUT_CUDA();
  const auto [at, enc] = GetParam();
  const bool quantized = enc.type != WeightType::native16;
  for (const auto& [counts, decode] : {std::pair{std::vector<int32_t>{30, 0, 9, 25, 16, 0, 3, 45}, quantized},
                                       std::pair{std::vector<int32_t>{70, 10, 0, 60}, false}}) {
    const uint64_t seed = fresh_seed();
    const int64_t T = std::accumulate(counts.begin(), counts.end(), int64_t(0));
    SCOPED_TRACE(name(at, enc) + " T=" + std::to_string(T) + " seed=" + std::to_string(seed));
    Problem pr = Problem::random(at, enc, 136, 256, 64, counts, seed);
    DeviceProblem dp(pr);
    dp.poison();
    const Status st = moe_gemm_prefill(dp.params, cuda_device());
    ASSERT_TRUE(st.ok()) << st.message;
    if (decode)
      EXPECT_EQ(cuda::prefill::last_path(), 3);
    else
      EXPECT_NE(cuda::prefill::last_path(), 3);
    QMOE_CUDA_OK(cudaDeviceSynchronize());
    const Comparison c = compare(pr, dp.out.download(), pr.reference());
    EXPECT_EQ(c.unwritten, 0);
    EXPECT_LT(c.rel_error, tolerance(at));
  }
}

INSTANTIATE_TEST_SUITE_P(AllEncodings, CudaPrefill,
                         ::testing::Combine(::testing::Values(ActType::f16, ActType::bf16),
                                            ::testing::ValuesIn(all_encodings())),
                         [](const auto& info) { return name(std::get<0>(info.param), std::get<1>(info.param)); });

// T from 1 to 8192 (one expert, then eight uneven ones), a few encodings.
TEST(CudaPrefillSizes, TokensFrom1To8192) {
  QMOE_SKIP_WITHOUT_CUDA();
  for (const Path path : paths()) {
    for (int32_t t : {1, 2, 15, 16, 17, 31, 32, 33, 48, 63, 64, 65, 127, 128, 129, 257, 1000})
      check_fast_path(ActType::bf16, {WeightType::int4, false}, {"one_expert", 96, 256, 128, {t}}, true, path);
    const std::vector<int32_t> big{3000, 0, 1, 2047, 1024, 100, 1900, 120};  // 8192 tokens
    ASSERT_EQ(std::accumulate(big.begin(), big.end(), 0), 8192);
    check_fast_path(ActType::bf16, {WeightType::int4, false}, {"t8192", 128, 512, 128, big}, true, path);
    check_fast_path(ActType::f16, {WeightType::native16, false}, {"t8192", 128, 512, 0, big}, true, path);
    check_fast_path(ActType::bf16, {WeightType::fp8_e4m3, false}, {"t8192", 128, 512, 128, big}, true, path);
    check_fast_path(ActType::f16, {WeightType::int8, true}, {"t8192", 128, 512, 128, big}, true, path);
    check_fast_path(ActType::bf16, {WeightType::int2, true}, {"t8192", 320, 512, 64, big}, true, path);
  }
}

// More work items than CTAs (each CTA runs several items, the pipeline
// wraps around its stages across items), random token widths per expert;
// one expert of two token tiles, so that the wgmma kernel takes quantized
// weights' items by width class, in snake order over its rounds.
TEST(CudaPrefillSizes, ManyItemsPerCta) {
  QMOE_SKIP_WITHOUT_CUDA();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("counts seed=" + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::vector<int32_t> counts(64);
  for (auto& c : counts) c = rng() % 5 == 0 ? 0 : int32_t(1 + rng() % 130);
  counts[5] = 200;
  for (const Path path : paths()) {
    check_fast_path(ActType::bf16, {WeightType::int4, true}, {"many_items", 2048, 256, 128, counts}, true, path);
    check_fast_path(ActType::f16, {WeightType::native16, false}, {"many_items", 2048, 256, 0, counts}, true, path);
  }
}

// The automatic tile choice at both ends: an uneven 610-token split over
// N = 1024 (few 256-row items: 128-row tiles) and 2640 tokens over N = 4096
// (over two waves of 256-row items on a 132-SM card: 256-row tiles).
TEST(CudaPrefillSizes, AutomaticTileChoice) {
  QMOE_SKIP_WITHOUT_CUDA();
  Overrides o(-1, 0);
  PathScope scope(Path::mma);  // (the mma.sync kernel's schedule)
  const std::vector<int32_t> uneven{300, 0, 9, 121, 64, 1, 100, 15};  // 610 tokens
  check_fast_path(ActType::bf16, {WeightType::int4, false}, {"uneven610", 1024, 256, 128, uneven});
  check_fast_path(ActType::f16, {WeightType::int8, true}, {"uneven610", 1024, 256, 128, uneven});
  check_fast_path(ActType::bf16, {WeightType::native16, false}, {"uneven610", 1024, 256, 0, uneven});
  const std::vector<int32_t> big(8, 330);
  check_fast_path(ActType::bf16, {WeightType::int4, true}, {"big", 4096, 128, 64, big});
}

// Counts that disagree with T: nothing is read or written out of bounds
// (compute-sanitizer checks the accesses), the covered rows are right and
// rows no expert covers are zero.
TEST(CudaPrefillSizes, InconsistentCounts) {
  QMOE_SKIP_WITHOUT_CUDA();
  for (const Path path : paths())
    for (const ItemSet set : kItemSets)  // (wgmma: every item set, with and without the split tail)
      for (const int grid : {0, 2}) {
        if ((set != ItemSet::narrow || grid > 0) && path != Path::wgmma) continue;
        PathScope scope(path);
        ItemSetScope set_scope(set);
        SplitScope split(grid);
        const uint64_t seed = fresh_seed();
        SCOPED_TRACE(path_name(path) + " " + set_name(set) + " " + split_name(grid) + " seed=" + std::to_string(seed));
        Problem pr = Problem::random(ActType::bf16, {WeightType::int4, true}, 64, 256, 64, {40, 30}, seed);
        const struct {
          std::vector<int32_t> bad, effective;
        } cases[] = {{{50, 50}, {50, 20}},
                     {{-4, 10}, {0, 10}},
                     {{1000000, 1}, {70, 0}},
                     {{0, 0}, {0, 0}},
                     {{2147483647, 2147483647}, {70, 0}}};
        for (const auto& cs : cases) {
          DeviceProblem dp(pr);
          dp.counts.upload(cs.bad);
          dp.poison();
          Status st;
          ASSERT_TRUE(cuda::launch_prefill(dp.params, nullptr, &st));
          ASSERT_TRUE(st.ok()) << st.message;
          expect_path(path);
          QMOE_CUDA_OK(cudaDeviceSynchronize());
          Problem eff = pr;
          eff.counts = cs.effective;
          eff.bind();
          const Comparison c = compare(eff, dp.out.download(), eff.reference());
          EXPECT_EQ(c.unwritten, 0);
          EXPECT_LT(c.rel_error, tolerance(ActType::bf16));
        }
      }
}

// Capture once, replay with new activations, weights, scales, zeros and
// splits (empty experts, everything in one expert) in the same buffers.
TEST(CudaPrefillSizes, GraphCaptureReplaysWithNewData) {
  QMOE_SKIP_WITHOUT_CUDA();
  for (const Path path : paths())
    for (const ItemSet set : kItemSets)  // (wgmma: every item set, with and without the split tail)
      for (const int grid : {0, 4}) {
        if ((set != ItemSet::narrow || grid > 0) && path != Path::wgmma) continue;
        SCOPED_TRACE(path_name(path) + " " + set_name(set) + " " + split_name(grid));
        PathScope scope(path);
        ItemSetScope set_scope(set);
        SplitScope split(grid);
        const int64_t N = 200, K = 256;
        const int32_t T = 300;
        const Encoding enc{WeightType::int4, true};
        Problem pr = Problem::random(ActType::bf16, enc, N, K, 128, {T / 2, 0, T / 2, 0}, fresh_seed());
        DeviceProblem dp(pr);
        cudaStream_t stream;
        QMOE_CUDA_OK(cudaStreamCreate(&stream));
        cudaGraph_t graph;
        cudaGraphExec_t exec;
        QMOE_CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
        Status st;
        const bool fast = cuda::launch_prefill(dp.params, stream, &st);
        QMOE_CUDA_OK(cudaStreamEndCapture(stream, &graph));
        ASSERT_TRUE(fast);
        ASSERT_TRUE(st.ok()) << st.message;
        expect_path(path);
        QMOE_CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
        const std::vector<std::vector<int32_t>> splits{
            {0, T, 0, 0}, {1, 2, 3, T - 6}, {T - 1, 0, 0, 1}, {100, 100, 0, 100}};
        for (const auto& counts : splits) {
          const uint64_t seed = fresh_seed();
          SCOPED_TRACE(seed);
          Problem next = Problem::random(ActType::bf16, enc, N, K, 128, counts, seed);
          dp.act.upload(next.act);
          dp.weights.upload(next.weights);
          dp.scales.upload(next.scales);
          dp.zeros.upload(next.zeros);
          dp.counts.upload(next.counts);
          dp.poison();
          QMOE_CUDA_OK(cudaGraphLaunch(exec, stream));
          QMOE_CUDA_OK(cudaStreamSynchronize(stream));
          const Comparison c = compare(next, dp.out.download(), next.reference());
          EXPECT_EQ(c.unwritten, 0);
          EXPECT_LT(c.rel_error, tolerance(ActType::bf16));
        }
        cudaGraphExecDestroy(exec);
        cudaGraphDestroy(graph);
        cudaStreamDestroy(stream);
      }
}

// Shapes outside the fast path's rules launch nothing there, and the public
// API still answers them correctly through the fallback kernels.
TEST(CudaPrefillSizes, OutsideRulesFallBack) {
  QMOE_SKIP_WITHOUT_CUDA();
  const struct {
    const char* label;
    Encoding enc;
    int64_t n, k, gs;
  } cases[] = {{"k48", {WeightType::int4, false}, 64, 48, 16},
               {"group16", {WeightType::int8, true}, 64, 256, 16},
               {"int2_k96", {WeightType::int2, false}, 64, 96, 32},
               {"native16_k40", {WeightType::native16, false}, 64, 40, 0}};
  for (const auto& cs : cases) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE(std::string(cs.label) + " seed=" + std::to_string(seed));
    Problem pr = Problem::random(ActType::f16, cs.enc, cs.n, cs.k, cs.gs, {20, 0, 45}, seed);
    DeviceProblem dp(pr);
    dp.poison();
    Status st;
    EXPECT_FALSE(cuda::launch_prefill(dp.params, nullptr, &st));
    ASSERT_TRUE(moe_gemm_prefill(dp.params, cuda_device()).ok());
    QMOE_CUDA_OK(cudaDeviceSynchronize());
    const Comparison c = compare(pr, dp.out.download(), pr.reference());
    EXPECT_EQ(c.unwritten, 0);
    EXPECT_LT(c.rel_error, tolerance(ActType::f16));
  }
  // Misaligned activations (2 bytes off): fallback.
  Problem pr = Problem::random(ActType::bf16, {WeightType::int4, false}, 64, 256, 128, {3, 5}, fresh_seed());
  DeviceProblem dp(pr);
  MoeGemmParams p = dp.params;
  p.activations = static_cast<const uint16_t*>(p.activations) + 1;
  p.total_tokens = 7;
  Status st;
  EXPECT_FALSE(cuda::launch_prefill(p, nullptr, &st));
  // The [E, K, N] layout of moe_gemm (16-bit weights): both kernels take it
  // with N % 8 == 0 (MoeGemmEKNOn*); N % 8 != 0 neither.
  Problem ekn = Problem::random(ActType::bf16, {WeightType::native16, false}, 60, 64, 0, {4, 4}, fresh_seed(),
                                WeightLayout::EKN);
  DeviceProblem dekn(ekn);
  for (const Path path : paths()) {
    PathScope scope(path);
    EXPECT_FALSE(cuda::launch_prefill(dekn.params, nullptr, &st)) << path_name(path);
  }
}

// moe_gemm's 16-bit [E, K, N] layout on the wgmma kernel (transposed
// fragments from k-major tiles): uneven and empty experts, a token tile of
// more than 128, N and K tails (k past K read as zero, not as the next
// expert's rows), with and without per-column scales; with a cap of 4 CTAs
// (several rounds) the split forced on does not apply to this layout (its
// launches are never in CTA pairs).
TEST(CudaPrefillSizes, MoeGemmEKNOnWgmma) {
  QMOE_SKIP_WITHOUT_CUDA();
  if (!is_hopper()) GTEST_SKIP() << "the [E, K, N] fast path is the sm_90 wgmma kernel";
  PathScope scope(Path::wgmma);
  const struct {
    int64_t n, k;
    std::vector<int32_t> counts;
  } cases[] = {{264, 288, {70, 0, 129, 1, 300}}, {512, 256, {33}}, {72, 1056, {5, 64, 2}}};
  for (ActType at : {ActType::f16, ActType::bf16})
    for (bool column_scales : {false, true})
      for (const auto& cs : cases)
        for (const int grid : {0, 4}) {
          SplitScope split(grid);
          const uint64_t seed = fresh_seed();
          SCOPED_TRACE("N=" + std::to_string(cs.n) + " K=" + std::to_string(cs.k) + " " + split_name(grid) +
                       " seed=" + std::to_string(seed));
          Problem pr = Problem::random(at, {WeightType::native16, false}, cs.n, cs.k, 0, cs.counts, seed,
                                       WeightLayout::EKN, column_scales);
          DeviceProblem dp(pr);
          dp.poison();
          ASSERT_TRUE(moe_gemm(dp.params, cuda_device()).ok());
          QMOE_CUDA_OK(cudaDeviceSynchronize());
          expect_path(Path::wgmma);
          EXPECT_FALSE(cuda::prefill::last_pair_launch());
          const Comparison c = compare(pr, dp.out.download(), pr.reference());
          EXPECT_EQ(c.unwritten, 0);
          EXPECT_LT(c.rel_error, tolerance(at));
        }
}

// moe_gemm's 16-bit [E, K, N] layout on the mma.sync kernel (its KN
// variant: cp.async k-major tiles, ldmatrix .trans; the sm_80 path), forced
// on every device: uneven and empty experts, token tiles of 1..130, N and K
// tails (N % 16 == 8, K % 64 == 32, N = 8, K = 32), per-column scales on and
// off, both weight-tile schedules (256- and 128-column tiles), the fast path
// called directly (it must take the shape) and through moe_gemm, and an
// output 2 bytes off 16-byte alignment (scalar stores instead of the paired
// 4-byte ones).
TEST(CudaPrefillSizes, MoeGemmEKNOnMma) {
  QMOE_SKIP_WITHOUT_CUDA();
  PathScope scope(Path::mma);
  const struct {
    int64_t n, k;
    std::vector<int32_t> counts;
  } cases[] = {{264, 288, {70, 0, 129, 1, 300}},
               {512, 256, {33}},
               {72, 1056, {5, 64, 2}},
               {8, 32, {3, 0, 17}},
               {136, 96, {0, 130, 9, 0, 64, 65}}};
  for (const int tiles : {0, 1, 2})
    for (ActType at : {ActType::f16, ActType::bf16})
      for (bool column_scales : {false, true})
        for (const auto& cs : cases)
          for (const bool api : {false, true}) {
            const uint64_t seed = fresh_seed();
            SCOPED_TRACE("N=" + std::to_string(cs.n) + " K=" + std::to_string(cs.k) + " " +
                         name(at, {WeightType::native16, false}) + " tiles=" + std::to_string(tiles) +
                         " scales=" + std::to_string(column_scales) + (api ? " moe_gemm" : " launch_prefill") +
                         " seed=" + std::to_string(seed));
            Overrides o(-1, tiles);
            Problem pr = Problem::random(at, {WeightType::native16, false}, cs.n, cs.k, 0, cs.counts, seed,
                                         WeightLayout::EKN, column_scales);
            DeviceProblem dp(pr);
            dp.poison();
            if (api) {
              ASSERT_TRUE(moe_gemm(dp.params, cuda_device()).ok());
            } else {
              Status st;
              ASSERT_TRUE(cuda::launch_prefill(dp.params, nullptr, &st));
              ASSERT_TRUE(st.ok()) << st.message;
            }
            QMOE_CUDA_OK(cudaDeviceSynchronize());
            expect_path(Path::mma);
            const Comparison c = compare(pr, dp.out.download(), pr.reference());
            EXPECT_EQ(c.unwritten, 0);
            EXPECT_LT(c.rel_error, tolerance(at));
          }
  // Output at an odd element offset (not 4-byte aligned): scalar stores.
  for (ActType at : {ActType::f16, ActType::bf16}) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE(name(at, {WeightType::native16, false}) + " misaligned out, seed=" + std::to_string(seed));
    Problem pr = Problem::random(at, {WeightType::native16, false}, 264, 288, 0, {70, 0, 129, 1}, seed,
                                 WeightLayout::EKN, true);
    DeviceProblem dp(pr);
    DeviceArray<uint16_t> out(std::vector<uint16_t>(pr.out.size() + 8, kPoison));
    dp.params.out = out.ptr + 1;
    Status st;
    ASSERT_TRUE(cuda::launch_prefill(dp.params, nullptr, &st));
    ASSERT_TRUE(st.ok()) << st.message;
    QMOE_CUDA_OK(cudaDeviceSynchronize());
    expect_path(Path::mma);
    const std::vector<uint16_t> all = out.download();
    EXPECT_EQ(all.front(), kPoison);  // nothing written outside the output
    EXPECT_TRUE(std::all_of(all.end() - 7, all.end(), [](uint16_t v) { return v == kPoison; }));
    const Comparison c = compare(pr, std::vector<uint16_t>(all.begin() + 1, all.end() - 7), pr.reference());
    EXPECT_EQ(c.unwritten, 0);
    EXPECT_LT(c.rel_error, tolerance(at));
  }
}

// The fused layer's gate/up product with SiLU·mul as the wgmma epilogue
// (glu = I): out [T, I] = SiLU(x W_gate^T) * (x W_up^T), gate rows first;
// one or several 128-output tiles with a tail (wide items: 64-output tiles),
// uneven and empty experts; quantized weights with both item shapes.
TEST(CudaPrefillSizes, SwigluEpilogueOnWgmma) {
  QMOE_SKIP_WITHOUT_CUDA();
  if (!is_hopper()) GTEST_SKIP() << "the SiLU·mul epilogue is the sm_90 wgmma kernel's";
  PathScope scope(Path::wgmma);
  const struct {
    int64_t inter, k, gs;
    std::vector<int32_t> counts;
  } cases[] = {{96, 256, 128, {70, 0, 129, 1}},
               {200, 128, 32, {300, 5}},
               {40, 192, 64, {257, 0, 31}},
               {96, 256, 128, {70, 0, 129}}};  // (3 items of 256 rows: a split at 2 CTAs)
  const Encoding encs[] = {{WeightType::int4, false}, {WeightType::int8, true}, {WeightType::fp8_e4m3, false},
                           {WeightType::native16, false}};
  for (ActType at : {ActType::f16, ActType::bf16})
    for (const Encoding& enc : encs)
      for (const auto& cs : cases)
        for (const ItemSet set : kItemSets)
          for (const int grid : {0, 2}) {
            if (set != ItemSet::narrow && enc.type == WeightType::native16) continue;
            ItemSetScope set_scope(set);
            SplitScope split(grid);
            const uint64_t seed = fresh_seed();
            const int64_t I = cs.inter;
            SCOPED_TRACE(name(at, enc) + " I=" + std::to_string(I) + " " + set_name(set) + " " + split_name(grid) +
                         " seed=" + std::to_string(seed));
            Problem pr =
                Problem::random(at, enc, 2 * I, cs.k, enc.type == WeightType::native16 ? 0 : cs.gs, cs.counts, seed);
            DeviceProblem dp(pr);
            dp.poison();
            Status st;
            ASSERT_TRUE(cuda::launch_prefill(dp.params, nullptr, &st, I));
            ASSERT_TRUE(st.ok()) << st.message;
            QMOE_CUDA_OK(cudaDeviceSynchronize());
            expect_path(Path::wgmma);
            const std::vector<uint16_t> out = dp.out.download();
            const std::vector<double> ref = pr.reference();  // [T, 2I]
            const int64_t T = pr.params.total_tokens;
            double num = 0, den = 0;
            int64_t bad = 0;
            for (int64_t t = 0; t < T; ++t)
              for (int64_t i = 0; i < I; ++i) {
                const double g = ref[size_t(t * 2 * I + i)], u = ref[size_t(t * 2 * I + I + i)];
                const double want = g / (1 + std::exp(-g)) * u;
                const double got = pr.half_value(out[size_t(t * I + i)]);
                if (!std::isfinite(got)) ++bad;
                num += (got - want) * (got - want);
                den += want * want;
              }
            EXPECT_EQ(bad, 0);
            EXPECT_LT(std::sqrt(num / std::max(den, 1e-300)), tolerance(at));
          }
}

}  // namespace
}  // namespace qmoe::test
