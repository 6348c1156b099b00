// The work items of the prefill kernels and the order the Hopper kernel
// hands them out in, as plain functions of the device counts: each CTA runs
// them on the arrays it builds in shared memory, and tests/cpp checks them
// on the CPU (test_prefill_schedule.cpp), so this header needs no CUDA.
//
// Items are (expert, n tile, token tile). Expert e covers tokens [tok[e],
// tok[e + 1]) (the device counts, clamped to T, in expert order); its token
// tiles are BM tokens wide, the last one partial. The Hopper kernel orders
// items by the width class of their token tile (tok_width: BM-wide tiles,
// then 128-, 96- and 32-wide ones), then expert, n tile and token tile; round
// r of its persistent loop gives CTA b of G item r G + b, or r G + G - 1 - b
// in odd rounds (snake order), so the CTAs that take a heavy item early take
// a light one late. Without the order (16-bit weights; or every expert one
// tile) every tile counts in class 0: expert-major, n tile major. A CTA's
// work of a round is a unit (unit_of_round): a whole item, or with the split
// tail one half of the k tiles of a last-round item (split_first_item).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define QMOE_SCHED_FN __host__ __device__ __forceinline__
#else
#define QMOE_SCHED_FN inline
#endif

namespace qmoe::cuda::prefill {

// The Hopper kernel's item sets for quantized weights (item_set in
// prefill_wgmma.cuh): 256 weight rows x token widths 32 / 96 / 128, wide
// items (128 rows x up to 256 tokens), 256 rows x widths 64 / 96 / 128.
enum class ItemSet { narrow = 0, wide = 1, mid = 2 };

struct Item {
  int e, tok0, rows, n0, bn;  // bn: rows of the weight tile, 256 or 128
};

// Token width of a Hopper item: the N of its accumulators, 32, 96, 128 or
// 256 (with the mid item set an item of up to 64 tokens runs 64 wide: see
// the consumer in prefill_wgmma.cuh; its width class stays that of 96).
QMOE_SCHED_FN int tok_width(int rows) { return rows <= 32 ? 32 : rows <= 96 ? 96 : rows <= 128 ? 128 : 256; }

// The expert e of item x in a list of E experts' items, prefix[e] * ntiles
// <= x < prefix[e + 1] * ntiles (prefix: the experts' token tiles before e).
QMOE_SCHED_FN int expert_of(const int* prefix, int E, int ntiles, int x) {
  int lo = 0, hi = E;
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (prefix[mid] * ntiles <= x)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

constexpr int kClasses = 4;  // token-tile widths 256 (BM of wide items), 128, 96, 32
constexpr int kMetaInts = 5 + kClasses;
// Shared-memory ints of a schedule of E experts: tok [E + 1], cls [kClasses][E + 1], meta.
QMOE_SCHED_FN constexpr int64_t schedule_ints(int64_t E) { return (E + 1) * (1 + kClasses) + kMetaInts; }

template <int BM>
QMOE_SCHED_FN int width_class(int rows) {
  const int tw = tok_width(rows);
  return tw >= BM ? 0 : tw == 128 ? 1 : tw == 96 ? 2 : 3;
}

// Token tiles of class c of an expert of `rows` tokens: its full tiles are
// class 0, its last partial one (if any) the class of its width; without the
// order every tile counts in class 0.
template <int BM>
QMOE_SCHED_FN int class_tiles(int rows, int c, bool ordered) {
  if (!ordered) return c == 0 ? (rows + BM - 1) / BM : 0;
  const int part = rows % BM;
  return (c == 0 ? rows / BM : 0) + (part > 0 && width_class<BM>(part) == c ? 1 : 0);
}

// The schedule's arrays (built by build_class_schedule in prefill_wgmma.cuh):
// tok [E + 1]; cls [kClasses][E + 1], cls[c][e] the tiles of class c of the
// experts before e; meta: n tiles, rows an item covers, the first item of
// each class [kClasses], the total, ordered, the first item of the split
// round (the split tail below; past the end where there is none).
struct Schedule {
  const int* tok;
  const int* cls;
  const int* meta;
  int E;
  bool ordered;  // by width class in snake order, else expert-major
  QMOE_SCHED_FN Schedule(const int* tok_, const int* cls_, const int* meta_, int E_)
      : tok(tok_), cls(cls_), meta(meta_), E(E_), ordered(meta_[3 + kClasses] != 0) {}
  QMOE_SCHED_FN int total() const { return meta[2 + kClasses]; }
  QMOE_SCHED_FN int split_first() const { return meta[4 + kClasses]; }
  // Item of round r for CTA b of g (snake order), or >= total() past the end.
  QMOE_SCHED_FN int item_of_round(int r, int g, int b) const { return r * g + (ordered && (r & 1) ? g - 1 - b : b); }
};

// The split tail. With `split` (a launch in clusters of 2 CTAs, g even),
// the items of the last round are each run by a CTA pair (b, b + 1; b even)
// of one cluster where they are at most half the CTAs: b (the owner) over
// the first half of the k tiles, b + 1 (the helper) over the second; the two
// swap half of their partial sums through distributed shared memory, and
// each writes half of the item's tokens (the owner the first, the helper the
// rest: exchange in prefill_wgmma.cuh). That round then takes about half
// an item's time instead of a whole one (ARK's t528 8x14336x4096 row: 448
// items on 132 CTAs, 3.39 rounds that took 4; t610u bf16: 176 items, 1.33
// that took 2). Two addends: the sum is the same whichever CTA is first;
// but whether an item is split depends on the item count (every expert's
// tokens) and the grid, so an output's last bits may change with the other
// tokens' routing or the card (QMOE_PREFILL_SPLIT=0 keeps them fixed). The
// caller passes split only with k_tiles >= 2 (each half non-empty).
// The first item of the split round, or INT32_MAX where none is split.
QMOE_SCHED_FN int split_first_item(int total, int g, bool split) {
  const int rem = total % g;
  return split && rem > 0 && 2 * rem <= g ? total - rem : 0x7fffffff;
}

// The meta words after cls is filled (one thread), for a grid of g CTAs.
QMOE_SCHED_FN void schedule_meta(int E, int n_tiles, int bn, bool ordered, const int* cls, int* meta, int g,
                                 bool split) {
  meta[0] = n_tiles;
  meta[1] = bn;
  int first = 0;
  for (int c = 0; c < kClasses; ++c) {
    meta[2 + c] = first;
    first += cls[c * (E + 1) + E] * n_tiles;
  }
  meta[2 + kClasses] = first;
  meta[3 + kClasses] = ordered;
  meta[4 + kClasses] = split_first_item(first, g, split);
}

// A CTA's work in one round: an item over k tiles [k0, k1), whole or one
// half of a split item (split_first_item).
enum class Role { whole = 0, owner = 1, helper = 2 };
struct Unit {
  int item, k0, k1;
  Role role;
};

// The unit of round r for CTA b of g (snake order; item >= total past the end).
QMOE_SCHED_FN Unit unit_of_round(const Schedule& sc, int r, int g, int b, int k_tiles) {
  Unit u{sc.item_of_round(r, g, b), 0, k_tiles, Role::whole};
  const int first = sc.split_first();
  if (r * g == first) {
    const int half = k_tiles / 2;
    const bool helper = (b & 1) != 0;
    // In the snake's odd rounds the pairs count from the grid's end, as the
    // items do (g - 1 - b, g even, keeps the pair (b, b + 1) together): the
    // CTAs that took the lightest items of the round before take these.
    const int pair = (sc.ordered && (r & 1) ? g - 1 - b : b) >> 1;
    u.item = pair < sc.total() - first ? first + pair : sc.total();
    u.k0 = helper ? half : 0;
    u.k1 = helper ? k_tiles : half;
    u.role = helper ? Role::helper : Role::owner;
  }
  return u;
}

// Whether CTA b of g runs half of a split item (in the split round).
QMOE_SCHED_FN bool runs_split_half(const Schedule& sc, int g, int b) {
  const int first = sc.split_first();
  return first < sc.total() && unit_of_round(sc, first / g, g, b, 2).item < sc.total();
}

// The item's expert, n tile and token tile.
template <int BM>
QMOE_SCHED_FN Item schedule_item(const Schedule& sc, int item) {
  const int ntiles = sc.meta[0];
  int c = 0;
  while (c + 1 < kClasses && sc.meta[2 + c + 1] <= item) ++c;
  const int* cls = sc.cls + c * (sc.E + 1);
  const int local = item - sc.meta[2 + c];
  const int lo = expert_of(cls, sc.E, ntiles, local);
  Item it;
  it.e = lo;
  it.bn = sc.meta[1];
  const int tb = sc.tok[lo], te = sc.tok[lo + 1];
  const int mt = cls[lo + 1] - cls[lo];  // the expert's tiles of this class
  const int le = local - cls[lo] * ntiles;
  const int nt = le / mt;
  const int m = le - nt * mt;
  // Class 0 holds the full tiles (and a BM-wide last one), in token order;
  // another class only the expert's last, partial tile.
  const int tile = (c == 0 || !sc.ordered) ? m : (te - tb) / BM;
  it.tok0 = tb + tile * BM;
  it.rows = te - it.tok0 < BM ? te - it.tok0 : BM;
  it.n0 = nt * it.bn;
  return it;
}

}  // namespace qmoe::cuda::prefill
