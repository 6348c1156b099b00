// The fused MoE layer: routing against an independent float64 routing, the
// whole layer against a float64 layer built from dequantized weights, shared
// experts, precomputed top-k, validation; on the CPU and (where present) CUDA.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>

#include "harness.h"
#include "qmoe/fused_moe.h"
#if QMOE_TEST_CUDA
#include "harness_cuda.h"
#endif

namespace qmoe::test {
namespace {

// Routing in float64, written from the model definitions (Qwen/Mixtral
// softmax top-k; DeepSeek-V2 group-limited greedy; DeepSeek-V3 sigmoid with
// correction bias and top-2-sum group scores).
void route_ref(const std::vector<float>& logits, int64_t T, int E, int k, const RoutingParams& r,
               const std::vector<float>& bias, std::vector<int32_t>& ids, std::vector<double>& w) {
  ids.assign(size_t(T * k), 0);
  w.assign(size_t(T * k), 0);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> score(E), choice(E);
    const float* x = &logits[size_t(t * E)];
    if (r.scoring == Scoring::softmax) {
      const double mx = *std::max_element(x, x + E);
      double sum = 0;
      for (int e = 0; e < E; ++e) sum += score[e] = std::exp(double(x[e]) - mx);
      for (double& s : score) s /= sum;
    } else {
      for (int e = 0; e < E; ++e) score[e] = 1 / (1 + std::exp(-double(x[e])));
    }
    for (int e = 0; e < E; ++e) choice[e] = score[e] + (bias.empty() ? 0 : bias[e]);
    const int G = int(r.num_groups), per = E / G;
    if (G > 1) {
      std::vector<std::pair<double, int>> gs;
      for (int g = 0; g < G; ++g) {
        std::vector<double> c(choice.begin() + g * per, choice.begin() + (g + 1) * per);
        std::sort(c.rbegin(), c.rend());
        gs.push_back({r.group_score == GroupScore::top2_sum ? c[0] + c[1] : c[0], -g});
      }
      std::sort(gs.rbegin(), gs.rend());
      std::vector<bool> keep(G, false);
      for (int i = 0; i < r.topk_groups; ++i) keep[size_t(-gs[size_t(i)].second)] = true;
      for (int e = 0; e < E; ++e)
        if (!keep[size_t(e / per)]) choice[e] = -1e300;
    }
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return choice[a] > choice[b]; });
    double total = 0;
    for (int j = 0; j < k; ++j) total += score[size_t(order[size_t(j)])];
    for (int j = 0; j < k; ++j) {
      ids[size_t(t * k + j)] = order[size_t(j)];
      w[size_t(t * k + j)] = score[size_t(order[size_t(j)])] * (r.renormalize ? 1 / total : 1) * r.scaling_factor;
    }
  }
}

// One layer's weights and inputs, and its float64 reference.
struct Layer {
  FusedMoeParams p;
  Problem gate_up, down, shared_gate_up, shared_down;  // weight holders
  std::vector<uint16_t> x, shared_gate, out;
  std::vector<float> logits, bias;
  std::vector<int32_t> ids;
  std::vector<float> weights;

  static Layer make(ActType at, Encoding enc, int64_t T, int64_t H, int64_t I, int E, int k,
                    RoutingParams routing, int64_t shared_I, bool gate, uint64_t seed, int64_t gs = 16) {
    Layer L;
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const std::vector<int32_t> none(size_t(E), 0);
    L.gate_up = Problem::random(at, enc, 2 * I, H, gs, none, seed + 1);
    L.down = Problem::random(at, enc, H, I, gs, none, seed + 2);
    if (shared_I > 0) {
      L.shared_gate_up = Problem::random(at, enc, 2 * shared_I, H, gs, {0}, seed + 3);
      L.shared_down = Problem::random(at, enc, H, shared_I, gs, {0}, seed + 4);
    }
    const auto to_act = [&](float v) { return at == ActType::f16 ? float_to_f16(v) : float_to_bf16(v); };
    L.x.resize(size_t(T * H));
    for (auto& v : L.x) v = to_act(normal(rng));
    L.logits.resize(size_t(T * E));
    for (auto& v : L.logits) v = normal(rng) * 2;
    if (routing.scoring == Scoring::sigmoid) {
      L.bias.resize(size_t(E));
      for (auto& b : L.bias) b = normal(rng) * 0.1f;
    }
    if (gate) {
      L.shared_gate.resize(size_t(H));
      for (auto& g : L.shared_gate) g = to_act(normal(rng) * 0.1f);
    }
    L.out.assign(size_t(T * H), kPoison);
    FusedMoeParams& p = L.p;
    p.act_type = at;
    p.num_tokens = T;
    p.hidden = H;
    p.intermediate = I;
    p.num_experts = E;
    p.top_k = k;
    p.routing = routing;
    p.shared_intermediate = shared_I;
    L.bind();
    return L;
  }

  static ExpertWeights weights_of(const Problem& pr) {
    return {pr.params.weight_type, pr.params.asym, pr.params.group_size, pr.params.weights,
            pr.params.scales, pr.params.zeros};
  }
  void bind() {
    p.hidden_states = x.data();
    p.router_logits = logits.data();
    p.routing.correction_bias = bias.empty() ? nullptr : bias.data();
    p.gate_up = weights_of(gate_up);
    p.down = weights_of(down);
    if (p.shared_intermediate > 0) {
      p.shared_gate_up = weights_of(shared_gate_up);
      p.shared_down = weights_of(shared_down);
    }
    p.shared_gate = shared_gate.empty() ? nullptr : shared_gate.data();
    p.out = out.data();
  }

  double act(uint16_t h) const { return gate_up.half_value(h); }

  // y = down(silu(gate(x)) * up(x)) for one expert of `w1`/`w2`, float64.
  std::vector<double> expert(const Problem& w1, const Problem& w2, int64_t e, int64_t t, int64_t inter) const {
    const int64_t H = p.hidden;
    std::vector<double> h(static_cast<size_t>(inter)), y(static_cast<size_t>(H));
    for (int64_t i = 0; i < inter; ++i) {
      double g = 0, u = 0;
      for (int64_t c = 0; c < H; ++c) {
        const double xv = act(x[size_t(t * H + c)]);
        g += xv * w1.weight(e, i, c);
        u += xv * w1.weight(e, inter + i, c);
      }
      h[size_t(i)] = g / (1 + std::exp(-g)) * u;
    }
    for (int64_t c = 0; c < H; ++c) {
      double acc = 0;
      for (int64_t i = 0; i < inter; ++i) acc += h[size_t(i)] * w2.weight(e, c, i);
      y[size_t(c)] = acc;
    }
    return y;
  }

  std::vector<double> reference() const {
    const int64_t T = p.num_tokens, H = p.hidden, k = p.top_k;
    std::vector<int32_t> rids;
    std::vector<double> rw;
    if (!ids.empty()) {
      rids = ids;
      rw.assign(weights.begin(), weights.end());
    } else {
      route_ref(logits, T, int(p.num_experts), int(k), p.routing, bias, rids, rw);
    }
    std::vector<double> ref(static_cast<size_t>(T * H), 0.0);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t j = 0; j < k; ++j) {
        const auto y = expert(gate_up, down, rids[size_t(t * k + j)], t, p.intermediate);
        for (int64_t c = 0; c < H; ++c) ref[size_t(t * H + c)] += rw[size_t(t * k + j)] * y[size_t(c)];
      }
      if (p.shared_intermediate > 0) {
        double scale = 1;
        if (!shared_gate.empty()) {
          double d = 0;
          for (int64_t c = 0; c < H; ++c) d += act(x[size_t(t * H + c)]) * act(shared_gate[size_t(c)]);
          scale = 1 / (1 + std::exp(-d));
        }
        const auto y = expert(shared_gate_up, shared_down, 0, t, p.shared_intermediate);
        for (int64_t c = 0; c < H; ++c) ref[size_t(t * H + c)] += scale * y[size_t(c)];
      }
    }
    return ref;
  }

  Comparison compare_out(const std::vector<uint16_t>& o) const { return compare(gate_up, o, reference()); }
};

RoutingParams softmax(bool renorm) {
  RoutingParams r;
  r.renormalize = renorm;
  return r;
}
RoutingParams deepseek_v3() {
  RoutingParams r;
  r.scoring = Scoring::sigmoid;
  r.renormalize = true;
  r.num_groups = 4;
  r.topk_groups = 2;
  r.group_score = GroupScore::top2_sum;
  r.scaling_factor = 2.5f;
  return r;
}
RoutingParams deepseek_v2() {
  RoutingParams r;
  r.num_groups = 4;
  r.topk_groups = 3;
  r.scaling_factor = 1.5f;
  return r;
}

TEST(Routing, MatchesFloat64Routing) {
  for (const RoutingParams& r : {softmax(false), softmax(true), deepseek_v3(), deepseek_v2()}) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE(seed);
    Layer L = Layer::make(ActType::bf16, {WeightType::int4, false}, 37, 32, 16, 16, 4, r, 0, false, seed);
    std::vector<int32_t> ids(37 * 4), rids;
    std::vector<float> w(37 * 4);
    std::vector<double> rw;
    ASSERT_TRUE(moe_route(L.p, ids.data(), w.data()).ok());
    route_ref(L.logits, 37, 16, 4, r, L.bias, rids, rw);
    EXPECT_EQ(ids, rids);
    for (size_t i = 0; i < w.size(); ++i) EXPECT_NEAR(w[i], rw[i], 1e-5 * std::max(1.0, std::fabs(rw[i])));
  }
}

struct LayerCase {
  Encoding enc;
  int64_t T;
  RoutingParams routing;
  int64_t shared_I;
  bool gate;
  int64_t H = 64, I = 48;
  int64_t gs = 16;  // group size (32 and more: the CUDA prefill fast path can take it)
  int64_t E = 16, k = 4;
};

std::vector<LayerCase> layer_cases() {
  return {{{WeightType::int4, false}, 1, softmax(false), 0, false},
          {{WeightType::int4, true}, 13, softmax(true), 0, false},
          {{WeightType::int8, false}, 40, deepseek_v3(), 32, false},
          {{WeightType::fp8_e4m3, false}, 5, softmax(false), 48, true},
          {{WeightType::int2, true}, 9, deepseek_v2(), 0, false},
          {{WeightType::native16, false}, 6, softmax(true), 16, true},
          // Wider layers: the CUDA decode kernel's fused gather and SiLU·mul
          // epilogue on several tiles, and (I = 44) a partial tile.
          {{WeightType::int4, false}, 3, softmax(true), 64, true, 256, 128},
          {{WeightType::native16, false}, 2, softmax(false), 0, false, 96, 44},
          // H % 16 == 8 (a partial 16-row tile of the down product); a shared
          // expert without a gate.
          {{WeightType::native16, false}, 4, softmax(true), 32, false, 136, 64},
          // More tokens than the CUDA layer routes and groups in one kernel.
          {{WeightType::int8, true}, 100, softmax(true), 0, false},
          // 9-24 copies an expert still decoded (the CUDA layer decodes up to
          // 16 on average): the decode kernel's two row tiles a warp with the
          // SiLU·mul epilogue, scales of whole 64-byte steps (group 128) and
          // of 16-bit scaling (group 16); H = 144: nine 16-row tiles of the
          // down product, the last pair half past the end.
          {{WeightType::int4, false}, 64, softmax(true), 0, false, 256, 128, 128},
          {{WeightType::int2, true}, 60, softmax(false), 0, false, 144, 48},
          // Grouping: several steps of 32 copies per warp, shared expert in prefill.
          {{WeightType::int4, false}, 700, softmax(true), 32, true},
          // Prefill on the fast path (group 32; on sm_90 the wgmma kernel with
          // SiLU·mul as the gate/up epilogue): one and two 128-output tiles.
          {{WeightType::int4, true}, 300, softmax(true), 32, true, 128, 96, 32},
          {{WeightType::native16, false}, 200, softmax(false), 0, false, 128, 160, 32},
          // From 1024 tokens the CUDA layer forks the shared expert after grouping.
          {{WeightType::fp8_e4m3, false}, 1030, softmax(false), 32, true},
          // Top-20 of 40: from 1024 tokens the CUDA routing kernel's blocks of
          // 32 tokens count 640 copies, more than the place kernel's 512
          // threads (a second round); below, blocks of 8 tokens.
          {{WeightType::int4, false}, 1100, softmax(true), 0, false, 64, 48, 16, 40, 20},
          {{WeightType::int4, true}, 150, softmax(false), 0, false, 64, 48, 16, 40, 20}};
}

TEST(FusedMoe, CpuMatchesFloat64Layer) {
  for (ActType at : {ActType::f16, ActType::bf16})
    for (const LayerCase& c : layer_cases()) {
      const uint64_t seed = fresh_seed();
      SCOPED_TRACE(name(at, c.enc) + " T=" + std::to_string(c.T) + " seed=" + std::to_string(seed));
      Layer L = Layer::make(at, c.enc, c.T, c.H, c.I, c.E, c.k, c.routing, c.shared_I, c.gate, seed, c.gs);
      const Status st = fused_moe(L.p);
      ASSERT_TRUE(st.ok()) << st.message;
      const Comparison cmp = L.compare_out(L.out);
      EXPECT_EQ(cmp.unwritten, 0);
      EXPECT_LT(cmp.rel_error, tolerance(at));
    }
}

TEST(FusedMoe, CpuPrecomputedTopK) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed);
  Layer L = Layer::make(ActType::bf16, {WeightType::int4, false}, 11, 64, 32, 8, 2, softmax(false), 0, false, seed);
  std::mt19937 rng{uint32_t(seed)};
  for (int64_t t = 0; t < 11; ++t) {
    L.ids.push_back(int32_t(rng() % 8));
    L.ids.push_back(int32_t((L.ids.back() + 1 + rng() % 7) % 8));
    L.weights.push_back(0.7f);
    L.weights.push_back(0.3f);
  }
  L.p.router_logits = nullptr;
  L.p.topk_ids = L.ids.data();
  L.p.topk_weights = L.weights.data();
  ASSERT_TRUE(fused_moe(L.p).ok());
  const Comparison cmp = L.compare_out(L.out);
  EXPECT_EQ(cmp.unwritten, 0);
  EXPECT_LT(cmp.rel_error, tolerance(ActType::bf16));
  L.ids[3] = 8;  // out of range
  EXPECT_EQ(fused_moe(L.p).code, StatusCode::invalid_argument);
}

TEST(FusedMoe, Validation) {
  Layer L = Layer::make(ActType::f16, {WeightType::int4, false}, 4, 64, 32, 8, 2, softmax(false), 0, false, 1);
  const auto expect_invalid = [&](auto breaks, const char* mentions) {
    FusedMoeParams p = L.p;
    breaks(p);
    const Status st = fused_moe(p);
    EXPECT_EQ(st.code, StatusCode::invalid_argument) << mentions;
    EXPECT_NE(st.message.find(mentions), std::string::npos) << st.message;
  };
  int32_t ids[8] = {};
  float w[8] = {};
  expect_invalid([](FusedMoeParams& p) { p.top_k = 0; }, "top_k");
  expect_invalid([](FusedMoeParams& p) { p.top_k = 9; }, "top_k");
  expect_invalid([](FusedMoeParams& p) { p.num_experts = 0; }, "num_experts");
  expect_invalid([&](FusedMoeParams& p) { p.topk_ids = ids; p.topk_weights = w; }, "not both");
  expect_invalid([](FusedMoeParams& p) { p.router_logits = nullptr; }, "router_logits");
  expect_invalid([](FusedMoeParams& p) { p.routing.num_groups = 3; }, "num_groups");
  expect_invalid([](FusedMoeParams& p) { p.routing.num_groups = 4; p.routing.topk_groups = 5; }, "topk_groups");
  expect_invalid([](FusedMoeParams& p) { p.gate_up.scales = nullptr; }, "gate_up: scales");
  expect_invalid([](FusedMoeParams& p) { p.down.group_size = 5; }, "down: group_size");
  expect_invalid([](FusedMoeParams& p) { p.shared_gate = &p; }, "shared_gate");
  expect_invalid([](FusedMoeParams& p) { p.hidden_states = nullptr; }, "hidden_states");
  for (uint16_t v : L.out) ASSERT_EQ(v, kPoison);
}

#if QMOE_TEST_CUDA
}  // namespace
}  // namespace qmoe::test
namespace qmoe::cuda {
void set_group_blocks_override(int on);  // 1 grouping over many blocks, 0 one block, -1 environment
}  // namespace qmoe::cuda
namespace qmoe::test {
namespace {

// Grouping over many blocks for one scope.
struct GroupBlocksScope {
  explicit GroupBlocksScope(bool on) { cuda::set_group_blocks_override(on ? 1 : 0); }
  ~GroupBlocksScope() { cuda::set_group_blocks_override(-1); }
};

// The CUDA layer against the same float64 layer; bitwise identical on a
// second run (deterministic); replayable from a captured graph; the same
// bits with either grouping (one block, or many blocks). The workspace
// starts as garbage (0xff bytes): the layer must not read what it did not write.
TEST(FusedMoe, CudaMatchesFloat64LayerAndIsDeterministic) {
  QMOE_SKIP_WITHOUT_CUDA();
  for (ActType at : {ActType::f16, ActType::bf16})
    for (const LayerCase& c : layer_cases()) {
      const uint64_t seed = fresh_seed();
      SCOPED_TRACE(name(at, c.enc) + " T=" + std::to_string(c.T) + " seed=" + std::to_string(seed));
      Layer L = Layer::make(at, c.enc, c.T, c.H, c.I, c.E, c.k, c.routing, c.shared_I, c.gate, seed, c.gs);
      DeviceProblem gu(L.gate_up), dn(L.down);
      std::unique_ptr<DeviceProblem> sgu, sdn;
      DeviceArray<uint16_t> x(L.x), gate(L.shared_gate), out(L.out);
      DeviceArray<float> logits(L.logits), bias(L.bias);
      FusedMoeParams p = L.p;
      p.hidden_states = x.ptr;
      p.router_logits = logits.ptr;
      p.routing.correction_bias = L.bias.empty() ? nullptr : bias.ptr;
      p.gate_up = Layer::weights_of(L.gate_up);
      p.gate_up.weights = gu.weights.ptr, p.gate_up.scales = gu.scales.ptr, p.gate_up.zeros = gu.zeros.ptr;
      p.down.weights = dn.weights.ptr, p.down.scales = dn.scales.ptr, p.down.zeros = dn.zeros.ptr;
      if (c.shared_I > 0) {
        sgu = std::make_unique<DeviceProblem>(L.shared_gate_up);
        sdn = std::make_unique<DeviceProblem>(L.shared_down);
        p.shared_gate_up.weights = sgu->weights.ptr, p.shared_gate_up.scales = sgu->scales.ptr,
        p.shared_gate_up.zeros = sgu->zeros.ptr;
        p.shared_down.weights = sdn->weights.ptr, p.shared_down.scales = sdn->scales.ptr,
        p.shared_down.zeros = sdn->zeros.ptr;
      }
      p.shared_gate = L.shared_gate.empty() ? nullptr : gate.ptr;
      p.out = out.ptr;
      DeviceArray<uint8_t> ws(std::vector<uint8_t>(fused_moe_workspace_size(p), 0xff));
      p.workspace = ws.ptr;
      p.workspace_bytes = ws.count;
      const Device dev{DeviceType::cuda, 0, nullptr};
      Status st = fused_moe(p, dev);
      ASSERT_TRUE(st.ok()) << st.message;
      QMOE_CUDA_OK(cudaDeviceSynchronize());
      const std::vector<uint16_t> first = out.download();
      const Comparison cmp = L.compare_out(first);
      EXPECT_EQ(cmp.unwritten, 0);
      EXPECT_LT(cmp.rel_error, tolerance(at));
      cudaMemset(out.ptr, 0xff, out.count * 2);
      ASSERT_TRUE(fused_moe(p, dev).ok());
      QMOE_CUDA_OK(cudaDeviceSynchronize());
      EXPECT_EQ(first, out.download()) << "not deterministic";

      // Graph capture and replay gives the same bits.
      CapturedGraph g;
      st = g.capture([&](cudaStream_t s) { return fused_moe(p, Device{DeviceType::cuda, 0, s}); });
      ASSERT_TRUE(st.ok()) << st.message;
      cudaMemset(out.ptr, 0xff, out.count * 2);
      QMOE_CUDA_OK(g.replay());
      EXPECT_EQ(first, out.download()) << "graph replay differs";

      for (bool blocks : {false, true}) {  // (the one-kernel route+group of few tokens takes neither)
        GroupBlocksScope scope(blocks);
        cudaMemset(out.ptr, 0xff, out.count * 2);
        ASSERT_TRUE(fused_moe(p, dev).ok());
        QMOE_CUDA_OK(cudaDeviceSynchronize());
        EXPECT_EQ(first, out.download()) << "grouping over " << (blocks ? "many blocks" : "one block") << " differs";
      }
    }
}

// The GPU's warp routing in each of its experts-a-lane variants (E up to 32,
// 64, 128, 256 and 512), softmax and sigmoid with a bias, against the
// float64 routing.
TEST(Routing, CudaMatchesFloat64Routing) {
  QMOE_SKIP_WITHOUT_CUDA();
  RoutingParams sigmoid_bias;
  sigmoid_bias.scoring = Scoring::sigmoid;
  sigmoid_bias.renormalize = true;
  for (int E : {8, 32, 33, 64, 100, 128, 255, 256, 300, 512})
    for (const RoutingParams& r : {softmax(true), sigmoid_bias}) {
      const uint64_t seed = fresh_seed();
      const int k = std::min(8, E);
      const int64_t T = 5;
      SCOPED_TRACE("E=" + std::to_string(E) + " seed=" + std::to_string(seed));
      Layer L = Layer::make(ActType::bf16, {WeightType::int4, false}, T, 32, 16, E, k, r, 0, false, seed);
      DeviceArray<float> logits(L.logits), bias(L.bias), w(std::vector<float>(size_t(T * k), -1.0f));
      DeviceArray<int32_t> ids(std::vector<int32_t>(size_t(T * k), -1));
      FusedMoeParams p = L.p;
      p.router_logits = logits.ptr;
      p.routing.correction_bias = L.bias.empty() ? nullptr : bias.ptr;
      const Status st = moe_route(p, ids.ptr, w.ptr, Device{DeviceType::cuda, 0, nullptr});
      ASSERT_TRUE(st.ok()) << st.message;
      std::vector<int32_t> rids;
      std::vector<double> rw;
      route_ref(L.logits, T, E, k, r, L.bias, rids, rw);
      EXPECT_EQ(ids.download(), rids);
      const std::vector<float> got = w.download();
      for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], rw[i], 1e-5 * std::max(1.0, std::fabs(rw[i])));
    }
}

TEST(FusedMoe, CudaNeedsAWorkspace) {
  QMOE_SKIP_WITHOUT_CUDA();
  Layer L = Layer::make(ActType::f16, {WeightType::int4, false}, 4, 64, 32, 8, 2, softmax(false), 0, false, 1);
  const Status st = fused_moe(L.p, Device{DeviceType::cuda, 0, nullptr});
  EXPECT_EQ(st.code, StatusCode::invalid_argument);
  EXPECT_NE(st.message.find("workspace"), std::string::npos);
}
#endif

}  // namespace
}  // namespace qmoe::test
