// The Hopper prefill kernel's item schedule (src/cuda/prefill_schedule.h),
// checked on the CPU: for random, uneven, empty and inconsistent counts,
// every (expert, n tile, token tile) is one item exactly, inside its expert's
// tokens; with the order the token widths never grow along the list; the
// snake rounds give every item to one CTA. The arrays are built here as each
// CTA builds them (a sequential prefix for its block scans).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <set>
#include <tuple>
#include <vector>

#include "cuda/prefill_schedule.h"
#include "harness.h"

namespace qmoe::test {
namespace {

using cuda::prefill::class_tiles;
using cuda::prefill::Item;
using cuda::prefill::kClasses;
using cuda::prefill::Role;
using cuda::prefill::runs_split_half;
using cuda::prefill::Schedule;
using cuda::prefill::Unit;
using cuda::prefill::unit_of_round;
using cuda::prefill::schedule_item;
using cuda::prefill::schedule_meta;
using cuda::prefill::tok_width;

struct Built {
  std::vector<int> tok, cls, meta;
};

// build_class_schedule's arrays, from counts clamped to T.
template <int BM>
Built build(const std::vector<int32_t>& counts, int64_t T, int n_tiles, bool ordered, int grid = 1,
            bool split = false) {
  const int E = int(counts.size());
  Built b;
  b.tok.assign(size_t(E) + 1, 0);
  int64_t off = 0;
  bool multi = false;
  for (int e = 0; e < E; ++e) {
    b.tok[size_t(e)] = int(std::min(off, T));
    off += std::max(counts[size_t(e)], 0);
  }
  b.tok[size_t(E)] = int(std::min(off, T));
  for (int e = 0; e < E; ++e) multi |= b.tok[size_t(e) + 1] - b.tok[size_t(e)] > BM;
  ordered = ordered && multi;
  b.cls.assign(size_t(kClasses) * (E + 1), 0);
  for (int c = 0; c < kClasses; ++c) {
    int o = 0;
    for (int e = 0; e < E; ++e) {
      b.cls[size_t(c) * (E + 1) + e] = o;
      o += class_tiles<BM>(b.tok[size_t(e) + 1] - b.tok[size_t(e)], c, ordered);
    }
    b.cls[size_t(c) * (E + 1) + E] = o;
  }
  b.meta.assign(size_t(cuda::prefill::kMetaInts), 0);
  schedule_meta(E, n_tiles, 128, ordered, b.cls.data(), b.meta.data(), grid, split);
  return b;
}

template <int BM>
void check(const std::vector<int32_t>& counts, int64_t T, int n_tiles, bool ordered, int grid) {
  const int E = int(counts.size());
  const Built b = build<BM>(counts, T, n_tiles, ordered);
  const Schedule sc(b.tok.data(), b.cls.data(), b.meta.data(), E);
  int64_t want = 0;
  for (int e = 0; e < E; ++e) want += (b.tok[size_t(e) + 1] - b.tok[size_t(e)] + BM - 1) / BM;
  want *= n_tiles;
  ASSERT_EQ(sc.total(), want);
  std::set<std::tuple<int, int, int>> seen;
  int last_width = 1 << 30;
  for (int i = 0; i < sc.total(); ++i) {
    const Item it = schedule_item<BM>(sc, i);
    ASSERT_GE(it.e, 0);
    ASSERT_LT(it.e, E);
    const int tb = b.tok[size_t(it.e)], te = b.tok[size_t(it.e) + 1];
    ASSERT_GT(it.rows, 0) << "item " << i;
    ASSERT_LE(it.rows, BM);
    ASSERT_GE(it.tok0, tb);
    ASSERT_EQ((it.tok0 - tb) % BM, 0);
    ASSERT_EQ(it.rows, std::min(BM, te - it.tok0));
    ASSERT_EQ(it.n0 % 128, 0);
    ASSERT_LT(it.n0 / 128, n_tiles);
    EXPECT_TRUE(seen.insert({it.e, it.n0, it.tok0}).second) << "item " << i << " repeats";
    if (sc.ordered) {
      const int w = std::min(tok_width(it.rows), BM);
      EXPECT_LE(w, last_width) << "item " << i << ": a wider token tile after a narrower one";
      last_width = w;
    }
  }
  // The rounds of every CTA: each item once.
  std::vector<int> taken(size_t(sc.total()), 0);
  for (int cta = 0; cta < grid; ++cta)
    for (int r = 0;; ++r) {
      const int i = sc.item_of_round(r, grid, cta);
      if (i >= sc.total()) break;
      ++taken[size_t(i)];
    }
  EXPECT_TRUE(std::all_of(taken.begin(), taken.end(), [](int n) { return n == 1; }));
  // The units of an even grid, with and without the split tail: every k tile
  // of every item in one unit; a split item's halves on the CTA pair (b, b + 1)
  // of one cluster, in the last round only; nothing after a CTA's first empty
  // round (the kernel stops there).
  if (grid % 2 != 0) return;
  for (const int k_tiles : {2, 3, 8, 17})
    for (const bool split : {false, true}) {
      SCOPED_TRACE("k_tiles " + std::to_string(k_tiles) + (split ? " split" : ""));
      const Built bs = build<BM>(counts, T, n_tiles, ordered, grid, split);
      const Schedule ss(bs.tok.data(), bs.cls.data(), bs.meta.data(), E);
      std::vector<int> covered(size_t(ss.total()) * size_t(k_tiles), 0);
      const int full = ss.total() / grid, rem = ss.total() % grid;
      const bool split_round = split && rem > 0 && 2 * rem <= grid;
      EXPECT_EQ(ss.split_first() < ss.total(), split_round);
      for (int cta = 0; cta < grid; ++cta) {
        int r = 0;
        bool half = false;
        for (;; ++r) {
          const Unit u = unit_of_round(ss, r, grid, cta, k_tiles);
          if (u.item >= ss.total()) break;
          ASSERT_LT(u.k0, u.k1);
          ASSERT_GE(u.k0, 0);
          ASSERT_LE(u.k1, k_tiles);
          for (int k = u.k0; k < u.k1; ++k) ++covered[size_t(u.item) * size_t(k_tiles) + size_t(k)];
          if (u.role == Role::whole) {
            EXPECT_TRUE(u.k0 == 0 && u.k1 == k_tiles);
            continue;
          }
          EXPECT_TRUE(split_round && r == full);
          half = true;
          const Unit p = unit_of_round(ss, r, grid, cta ^ 1, k_tiles);
          EXPECT_EQ(p.item, u.item);
          EXPECT_EQ(u.role, cta % 2 ? Role::helper : Role::owner);
          EXPECT_EQ(p.role, cta % 2 ? Role::owner : Role::helper);
          EXPECT_EQ(cta % 2 ? u.k0 : u.k1, cta % 2 ? p.k1 : p.k0);
        }
        EXPECT_EQ(runs_split_half(ss, grid, cta), half);
        for (int after = r + 1; after < r + 3; ++after)
          EXPECT_GE(unit_of_round(ss, after, grid, cta, k_tiles).item, ss.total());
      }
      EXPECT_TRUE(std::all_of(covered.begin(), covered.end(), [](int n) { return n == 1; }));
    }
}

TEST(PrefillSchedule, EveryItemOnceInTheOrder) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE("seed=" + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int32_t picks[] = {0, 1, 5, 31, 32, 33, 64, 65, 96, 97, 127, 128, 129, 200, 256, 257, 300, 600};
  for (int trial = 0; trial < 400; ++trial) {
    std::vector<int32_t> counts(1 + rng() % 24);
    int64_t sum = 0;
    for (auto& c : counts) {
      c = rng() % 4 ? picks[rng() % std::size(picks)] : int32_t(rng() % 700) - 3;  // some negative
      sum += std::max(c, 0);
    }
    const int64_t T = int64_t(rng() % (sum + 6));  // counts beyond T are clamped
    const int n_tiles = 1 + int(rng() % 5), grid = 1 + int(rng() % 40);
    for (const bool ordered : {true, false}) {
      SCOPED_TRACE("trial " + std::to_string(trial) + (ordered ? " ordered" : " expert-major"));
      check<128>(counts, T, n_tiles, ordered, grid);
      check<256>(counts, T, n_tiles, ordered, grid);
    }
  }
}

// ARK's uneven 610-token row: the full tiles come first, then the remainders.
TEST(PrefillSchedule, HeavyTilesFirst) {
  const std::vector<int32_t> counts{3, 154, 143, 158, 5, 131, 0, 16};
  const Built b = build<128>(counts, 610, 16, true);
  const Schedule sc(b.tok.data(), b.cls.data(), b.meta.data(), int(counts.size()));
  ASSERT_TRUE(sc.ordered);
  ASSERT_EQ(sc.total(), 11 * 16);
  for (int i = 0; i < sc.total(); ++i) EXPECT_EQ(schedule_item<128>(sc, i).rows == 128, i < 4 * 16) << i;
  // Every expert one tile: expert-major, as without the order.
  const Built one = build<128>({30, 70, 0, 128}, 228, 2, true);
  EXPECT_EQ(one.meta[3 + kClasses], 0);
}

}  // namespace
}  // namespace qmoe::test
