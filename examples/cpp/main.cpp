// The README's C++ example: quantize two experts to int4 and run a decode
// product on the CPU (the code between the markers is shown in README.md).
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include <qmoe/qmoe.h>
#include <qmoe/quantize.h>

int main() {
  // [readme-begin]
  const int64_t E = 2, N = 64, K = 256, group = 128;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 0.05f);

  // Float weights [E, N, K] -> int4 sym, ARK layout: [E, N, K/2] bytes + bf16 scales.
  std::vector<float> w(E * N * K);
  for (float& v : w) v = normal(rng);
  const qmoe::QuantSpec spec{qmoe::WeightType::int4, /*asym=*/false, qmoe::ActType::bf16, group};
  std::vector<uint8_t> qweights(E * N * K / 2);
  std::vector<uint16_t> scales(E * N * (K / group));  // bf16 bits
  if (auto s = qmoe::quantize(spec, E, N, K, w.data(), qweights.data(), scales.data(), nullptr); !s.ok()) {
    std::fprintf(stderr, "quantize: %s\n", s.message.c_str());
    return 1;
  }

  // Three tokens sorted by expert: one for expert 0, two for expert 1.
  std::vector<int32_t> tokens_per_expert = {1, 2};
  const int64_t T = 3;
  std::vector<uint16_t> act(T * K), out(T * N);
  for (auto& a : act) a = qmoe::float_to_bf16_bits(normal(rng) * 10);

  qmoe::MoeGemmParams p;
  p.act_type = qmoe::ActType::bf16;
  p.weight_type = qmoe::WeightType::int4;
  p.num_experts = E;
  p.n = N;
  p.k = K;
  p.total_tokens = T;
  p.group_size = group;
  p.activations = act.data();
  p.weights = qweights.data();
  p.scales = scales.data();
  p.tokens_per_expert = tokens_per_expert.data();
  p.out = out.data();
  if (auto s = qmoe::moe_gemm_decode(p); !s.ok()) {  // Device{} = CPU
    std::fprintf(stderr, "moe_gemm_decode: %s\n", s.message.c_str());
    return 1;
  }
  std::printf("out[0][0] = %f\n", qmoe::bf16_bits_to_float(out[0]));
  // [readme-end]
  return std::isfinite(qmoe::bf16_bits_to_float(out[0])) ? 0 : 1;
}
