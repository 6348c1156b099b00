// Top-k routing of one token, shared by the CPU and CUDA fused MoE layers
// (plain C++ that nvcc also compiles for the device: one thread a token).
#pragma once

#include <cmath>
#include <cstdint>

#include "core/encoding.h"
#include "qmoe/fused_moe.h"

namespace qmoe {

constexpr int kMaxRoutedExperts = 512;  // per-token score scratch
constexpr int kMaxTopK = 32;

// Scores of token t from its logits row; picks top_k experts (ties to the
// lower index) honouring group-limited routing; writes ids and weights.
// `logit(e)` returns the float logit of expert e.
template <class Logit>
QMOE_HD void route_token(Logit logit, const RoutingParams& r, int E, int top_k, int32_t* ids,
                         float* weights) {
  float score[kMaxRoutedExperts];   // the weight an expert would get
  float choice[kMaxRoutedExperts];  // what the choice ranks (score + bias)
  if (r.scoring == Scoring::softmax) {
    float mx = -INFINITY;
    for (int e = 0; e < E; ++e) mx = fmaxf(mx, logit(e));
    float sum = 0.0f;
    for (int e = 0; e < E; ++e) sum += (score[e] = expf(logit(e) - mx));
    const float inv = 1.0f / sum;
    for (int e = 0; e < E; ++e) score[e] *= inv;
  } else {
    for (int e = 0; e < E; ++e) score[e] = 1.0f / (1.0f + expf(-logit(e)));
  }
  for (int e = 0; e < E; ++e) choice[e] = score[e] + (r.correction_bias ? r.correction_bias[e] : 0.0f);

  // Group-limited routing: keep the best topk_groups groups, mask the rest.
  const int groups = int(r.num_groups > 1 ? r.num_groups : 1);
  if (groups > 1) {
    const int per = E / groups;
    uint64_t kept = 0;  // bit g: group g kept (groups <= 64)
    for (int pick = 0; pick < int(r.topk_groups); ++pick) {
      int best = -1;
      float best_score = -INFINITY;
      for (int g = 0; g < groups; ++g) {
        if (kept >> g & 1u) continue;
        float a = -INFINITY, b = -INFINITY;  // two largest in the group
        for (int e = g * per; e < (g + 1) * per; ++e) {
          const float c = choice[e];
          if (c > a) { b = a; a = c; } else if (c > b) { b = c; }
        }
        const float gs = r.group_score == GroupScore::top2_sum ? a + b : a;
        if (best < 0 || gs > best_score) { best = g; best_score = gs; }
      }
      kept |= uint64_t(1) << best;
    }
    for (int e = 0; e < E; ++e)
      if (!(kept >> (e / per) & 1u)) choice[e] = -INFINITY;
  }

  float total = 0.0f;
  for (int j = 0; j < top_k; ++j) {
    int best = -1;
    for (int e = 0; e < E; ++e) {
      bool taken = false;
      for (int i = 0; i < j; ++i) taken |= ids[i] == e;
      if (!taken && (best < 0 || choice[e] > choice[best])) best = e;
    }
    ids[j] = best;
    weights[j] = score[best];
    total += score[best];
  }
  const float norm = (r.renormalize && total > 0.0f) ? r.scaling_factor / total : r.scaling_factor;
  for (int j = 0; j < top_k; ++j) weights[j] *= norm;
}

QMOE_HD float silu(float x) { return x / (1.0f + expf(-x)); }

}  // namespace qmoe
