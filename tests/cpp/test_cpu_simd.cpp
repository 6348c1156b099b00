// Every SIMD level of the CPU backend against the exact reference kernel
// (qmoe::moe_gemm_reference) and the float64 product of harness.h: every
// encoding x activation dtype x decode/prefill, on every level this machine
// has, each forced through QMOE_CPU_ISA; odd shapes (N tails, K tails,
// group sizes 32/64/128 and the smallest allowed), poisoned outputs.
#include <gtest/gtest.h>

#include <cstdlib>

#include "cpu/isa.h"
#include "harness.h"

namespace qmoe::test {
namespace {

using cpu::Isa;

// Forces a level through the environment for one scope.
struct ForceIsa {
  explicit ForceIsa(Isa isa) { setenv("QMOE_CPU_ISA", cpu::to_string(isa), 1); }
  ~ForceIsa() { unsetenv("QMOE_CPU_ISA"); }
};

// Whether a fast level takes a quantized call (mirrors the levels' rules):
// avx512 decodes units of `unit` weights spread over `vecs` vectors and
// needs each unit in one group or each group on whole fp32 lanes (a
// partial last unit is masked); avx2 needs whole units (16 weights, 32 for int2) per group.
bool takes(Isa isa, const MoeGemmParams& p) {
  if (p.weight_type == WeightType::native16) return true;
  const int64_t gs = p.group_size;
  if (isa == Isa::avx512) {
    int64_t unit = 32, vecs = 1;
    if (p.weight_type == WeightType::int4) unit = 128, vecs = 4;
    if (p.weight_type == WeightType::int2) unit = 256, vecs = 8;
    if (p.weight_type == WeightType::fp8_e4m3 || p.weight_type == WeightType::fp8_e5m2)
      unit = 64, vecs = 2;
    return gs % unit == 0 || (unit % gs == 0 && gs % (2 * vecs) == 0);
  }
  return gs % (p.weight_type == WeightType::int2 ? 32 : 16) == 0;
}

// A level that cannot take a call hands it down: avx512 -> avx2 -> portable.
Isa expected_level(Isa forced, const MoeGemmParams& p) {
  for (int level = int(forced); level > 0; --level)
    if (takes(Isa(level), p)) return Isa(level);
  return Isa::portable;
}

int64_t min_group(WeightType w) {
  return w == WeightType::int4 ? 2 : w == WeightType::int2 ? 4 : 1;
}

struct Shape {
  std::string label;
  int64_t n, k, group_size;
  std::vector<int32_t> counts;
};

std::vector<Shape> shapes(WeightType w, bool prefill) {
  // Decode: 1-8 tokens per expert (an expert with 0 too); prefill: more.
  const std::vector<int32_t> dec = {1, 0, 3, 8, 2, 5};
  const std::vector<int32_t> pre = {9, 0, 17, 40};
  const auto& c = prefill ? pre : dec;
  std::vector<Shape> s;
  if (w == WeightType::native16) {
    s.push_back({"n_tail_k_tail", 37, 72, 0, c});
    s.push_back({"k_lt_vector", 21, 24, 0, c});
    s.push_back({"k_aligned", 16, 256, 0, c});
  } else {
    for (int64_t gs : {32, 64, 128}) s.push_back({"gs" + std::to_string(gs), 35, 256, gs, c});
    s.push_back({"k_eq_group", 19, 128, 128, c});
    s.push_back({"k_384_gs128", 17, 384, 128, c});
    const int64_t g = min_group(w);
    s.push_back({"min_group", 13, 8 * g, g, c});
    s.push_back({"odd_group", 11, 24 * g, 3 * g, c});
    // K not a whole number of avx512 units (int2: 256, int4: 128 weights).
    s.push_back({"k_1408_gs128", 23, 1408, 128, c});
    s.push_back({"k_96_gs32", 9, 96, 32, c});
    // A partial last unit for every avx512 decoder (int8: 16 of 32 weights,
    // fp8: 48 of 64, int4: 48 of 128, int2: 176 of 256), groups of 16.
    s.push_back({"k_176_gs16", 21, 176, 16, c});
  }
  if (!prefill)  // more rows than one result buffer (256), a row tail per step
    s.push_back({"long_rows", 517, w == WeightType::native16 ? 1000 : 1024,
                 w == WeightType::native16 ? 0 : 128, {1, 8, 2, 3, 6, 7, 4}});
  if (!prefill && w == WeightType::native16)  // 8 tokens: K in chunks that fit L1, a K tail in the last
    s.push_back({"k_chunks", 19, 4136, 0, {8, 0, 7, 1}});
  if (prefill && w != WeightType::native16)  // K over two panel chunks (fp16 activations)
    s.push_back({"long_k", 40, 4608, 256, c});
  if (prefill)  // enough rows for prefill items of several panels, a partial last panel
    s.push_back({"many_panels", 2000, 128, w == WeightType::native16 ? 0 : 64, c});
  s.push_back({"n1", 1, w == WeightType::native16 ? 64 : 128, w == WeightType::native16 ? 0 : 128,
               prefill ? std::vector<int32_t>{12} : std::vector<int32_t>{1}});
  s.push_back({"t0", 24, 128, w == WeightType::native16 ? 0 : 64, {0, 0}});
  return s;
}

std::vector<Isa> levels() {
  std::vector<Isa> v;
  for (Isa isa : {Isa::portable, Isa::avx2, Isa::avx512})
    if (cpu::isa_supported(isa)) v.push_back(isa);
  return v;
}

// As compare(): one step of an output below the normal range is not
// counted (subnormal_step).
double rel_diff(const Problem& pr, const std::vector<uint16_t>& a, const std::vector<uint16_t>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double x = pr.half_value(a[i]), y = pr.half_value(b[i]);
    const double e = std::max(0.0, std::abs(x - y) - subnormal_step(pr.params.act_type, y));
    num += e * e;
    den += y * y;
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

using Param = std::tuple<Isa, ActType, Encoding, bool /*prefill*/>;
class CpuSimd : public ::testing::TestWithParam<Param> {};

TEST_P(CpuSimd, MatchesReferenceKernels) {
  const auto [isa, at, enc, prefill] = GetParam();
  ForceIsa force(isa);
  for (const Shape& s : shapes(enc.type, prefill)) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE(s.label + " seed=" + std::to_string(seed));
    Problem pr = Problem::random(at, enc, s.n, s.k, s.group_size, s.counts, seed);
    const Status st = prefill ? moe_gemm_prefill(pr.params) : moe_gemm_decode(pr.params);
    ASSERT_TRUE(st.ok()) << st.message;
    EXPECT_EQ(cpu::last_isa(), expected_level(isa, pr.params))
        << "ran on " << cpu::to_string(cpu::last_isa());
    const std::vector<uint16_t> fast = pr.out;

    pr.poison();
    ASSERT_TRUE(moe_gemm_reference(pr.params).ok());
    const std::vector<uint16_t> exact = pr.out;

    const std::vector<double> ref = pr.reference();
    const Comparison c = compare(pr, fast, ref);
    EXPECT_EQ(c.unwritten, 0);
    EXPECT_LT(c.rel_error, tolerance(at));
    EXPECT_LT(rel_diff(pr, fast, exact), tolerance(at));
  }
}

INSTANTIATE_TEST_SUITE_P(
    AllLevels, CpuSimd,
    ::testing::Combine(::testing::ValuesIn(levels()), ::testing::Values(ActType::f16, ActType::bf16),
                       ::testing::ValuesIn(all_encodings()), ::testing::Bool()),
    [](const auto& info) {
      return std::string(cpu::to_string(std::get<0>(info.param))) + "_" +
             name(std::get<1>(info.param), std::get<2>(info.param)) +
             (std::get<3>(info.param) ? "_prefill" : "_decode");
    });

// The integer decode (QMOE_CPU_DOT=i16: integer codes as int16 words
// against two int16 words an activation; on its own only where vpdpwssd is
// much faster, for some token counts) on every decode shape: group sizes
// below and above a unit, partial last units, a one-row product.
TEST(CpuSimd, IntegerDecodeEveryShape) {
  if (!cpu::isa_supported(Isa::avx512)) GTEST_SKIP() << "no avx512 level here";
  ForceIsa force(Isa::avx512);
  setenv("QMOE_CPU_DOT", "i16", 1);
  for (ActType at : {ActType::f16, ActType::bf16})
    for (Encoding enc : all_encodings()) {
      if (enc.type != WeightType::int8 && enc.type != WeightType::int4 && enc.type != WeightType::int2) continue;
      for (const Shape& s : shapes(enc.type, false)) {
        const uint64_t seed = fresh_seed();
        SCOPED_TRACE(name(at, enc) + " " + s.label + " seed=" + std::to_string(seed));
        Problem pr = Problem::random(at, enc, s.n, s.k, s.group_size, s.counts, seed);
        ASSERT_TRUE(moe_gemm_decode(pr.params).ok());
        const std::vector<uint16_t> fast = pr.out;
        const Comparison c = compare(pr, fast, pr.reference());
        EXPECT_EQ(c.unwritten, 0);
        EXPECT_LT(c.rel_error, tolerance(at));
      }
    }
  unsetenv("QMOE_CPU_DOT");
}

// Decode keeps fp32 accuracy on every level (exact bf16 codes, fp16
// activations split into two bf16 halves): it must agree with the exact
// kernel far below the tolerance on a long K.
TEST(CpuSimd, DecodeIsNearlyExact) {
  for (Isa isa : levels()) {
    ForceIsa force(isa);
    for (ActType at : {ActType::f16, ActType::bf16})
      for (Encoding enc : all_encodings()) {
        const uint64_t seed = fresh_seed();
        SCOPED_TRACE(std::string(cpu::to_string(isa)) + " " + name(at, enc) + " seed=" +
                     std::to_string(seed));
        Problem pr = Problem::random(at, enc, 64, 2048, 128, {1, 4, 8}, seed);
        ASSERT_TRUE(moe_gemm_decode(pr.params).ok());
        const std::vector<double> ref = pr.reference();
        // Output rounding to the 16-bit dtype alone gives about 2^-12 (fp16)
        // or 2^-9 (bf16) relative.
        EXPECT_LT(compare(pr, pr.out, ref).rel_error, at == ActType::f16 ? 5e-4 : 4e-3);
      }
  }
}

// Every code of every quantized encoding through every level's register
// decode: row n holds code n (mod the code count) at every k, the
// activation is one-hot, so each output is one dequantized weight and must
// equal the exact kernel's bit for bit (NaN codes of fp8 give NaN in both).
TEST(CpuSimd, EveryCodeDecodesExactly) {
  for (Isa isa : levels())
    for (bool prefill : {false, true})
      for (Encoding enc : all_encodings()) {
        if (enc.type == WeightType::native16) continue;
        ForceIsa force(isa);
        SCOPED_TRACE(std::string(cpu::to_string(isa)) + " " + name(ActType::bf16, enc) +
                     (prefill ? " prefill" : " decode"));
        const int bits = weight_bits(enc.type);
        const int64_t N = 256, K = 256, gs = 128;
        Problem pr = Problem::random(ActType::bf16, enc, N, K, gs,
                                     prefill ? std::vector<int32_t>{12} : std::vector<int32_t>{1}, 1);
        const int64_t kp = packed_k(enc.type, K);
        for (int64_t n = 0; n < N; ++n) {
          const uint32_t c = uint32_t(n) & ((1u << bits) - 1);
          uint8_t byte = 0;
          for (int f = 0; f < 8 / bits; ++f) byte = uint8_t(byte | (c << (f * bits)));
          for (int64_t i = 0; i < kp; ++i) pr.weights[n * kp + i] = byte;
        }
        for (auto& sc : pr.scales) sc = float_to_bf16(1.0f);
        for (auto& z : pr.zeros) z = float_to_bf16(3.0f);
        for (int64_t t = 0; t < pr.params.total_tokens; ++t)
          for (int64_t k = 0; k < K; ++k) pr.act[t * K + k] = float_to_bf16(k == 5 ? 1.0f : 0.0f);
        ASSERT_TRUE((prefill ? moe_gemm_prefill(pr.params) : moe_gemm_decode(pr.params)).ok());
        EXPECT_EQ(cpu::last_isa(), expected_level(isa, pr.params));
        const std::vector<uint16_t> fast = pr.out;
        pr.poison();
        ASSERT_TRUE(moe_gemm_reference(pr.params).ok());
        for (size_t i = 0; i < fast.size(); ++i) {
          const float a = bf16_to_float(fast[i]), b = bf16_to_float(pr.out[i]);
          if (std::isnan(b)) {
            EXPECT_TRUE(std::isnan(a)) << "row " << i % N;
          } else {
            EXPECT_EQ(a, b) << "row " << i % N;
          }
        }
      }
}

// The AVX-512 level computes with vdpbf16ps or with fp32 FMA, whichever
// this CPU runs faster, its int4 / int2 decode with vpdpwssd on int16
// activations where that runs faster still (QMOE_CPU_DOT forces one of
// bf16, fma, i16), and its prefill on the AMX
// tile unit where the CPU and OS offer it (QMOE_CPU_AMX=0 turns it off):
// every mode, decode and prefill, against the float64 product and the exact
// kernel.
TEST(CpuSimd, BothComputeModes) {
  if (!cpu::isa_supported(Isa::avx512)) GTEST_SKIP() << "no avx512 level here";
  ForceIsa force(Isa::avx512);
  for (const char* amx : {"0", "1"})
  for (const char* mode : {"bf16", "fma", "i16"})
    for (ActType at : {ActType::bf16, ActType::f16})
      for (bool prefill : {false, true}) {
    if (amx[0] == '1' && !prefill) continue;  // (AMX: the prefill)
    setenv("QMOE_CPU_AMX", amx, 1);
    setenv("QMOE_CPU_DOT", mode, 1);
    for (Encoding enc : all_encodings())
      for (int shape = 0; shape < (amx[0] == '1' ? 2 : 1); ++shape) {
      const uint64_t seed = fresh_seed();
      SCOPED_TRACE(std::string(mode) + (amx[0] == '1' ? " amx" : "") + " " + name(at, enc) +
                   (prefill ? " prefill" : " decode") + " shape " + std::to_string(shape) +
                   " seed=" + std::to_string(seed));
      // (16-bit weights, decode: K over several L1 chunks of 8 tokens' activations, with a tail)
      const bool chunks = !prefill && enc.type == WeightType::native16;
      // (AMX: K over two panel chunks of 2048 K pairs, the second short, 13 and
      // 21 tokens; then 1040 tokens an expert, 65 tiles of 16, the last of one)
      const int64_t K = amx[0] == '1' ? (shape == 0 ? 4224 : 256) : chunks ? 2088 : 512;
      const std::vector<int32_t> counts = !prefill ? std::vector<int32_t>{1, 0, 3, 8}
                                          : shape == 0 ? std::vector<int32_t>{13, 0, 21}
                                                       : std::vector<int32_t>{1040};
      Problem pr = Problem::random(at, enc, 53, K, enc.type == WeightType::native16 ? 0 : 128, counts, seed);
      ASSERT_TRUE((prefill ? moe_gemm_prefill(pr.params) : moe_gemm_decode(pr.params)).ok());
      EXPECT_EQ(cpu::last_isa(), Isa::avx512);
      const std::vector<uint16_t> fast = pr.out;
      const Comparison c = compare(pr, fast, pr.reference());
      EXPECT_EQ(c.unwritten, 0);
      EXPECT_LT(c.rel_error, prefill ? tolerance(at) : (at == ActType::f16 ? 5e-4 : 4e-3));
      pr.poison();
      ASSERT_TRUE(moe_gemm_reference(pr.params).ok());
      EXPECT_LT(rel_diff(pr, fast, pr.out), tolerance(at));
    }
      }
  unsetenv("QMOE_CPU_DOT");
  unsetenv("QMOE_CPU_AMX");
}

TEST(CpuSimd, LevelSelection) {
  EXPECT_TRUE(cpu::isa_supported(Isa::portable));
  for (Isa isa : levels()) {
    ForceIsa force(isa);
    EXPECT_EQ(cpu::selected_isa(), isa);
  }
  {
    ForceIsa force(Isa::portable);
    cpu::set_isa_override(int(cpu::best_isa()));  // the override wins
    EXPECT_EQ(cpu::selected_isa(), cpu::best_isa());
    cpu::set_isa_override(-1);
    EXPECT_EQ(cpu::selected_isa(), Isa::portable);
  }
  setenv("QMOE_CPU_ISA", "no-such-level", 1);  // ignored, with a message
  EXPECT_EQ(cpu::selected_isa(), cpu::best_isa());
  unsetenv("QMOE_CPU_ISA");
  EXPECT_EQ(cpu::selected_isa(), cpu::best_isa());
}

// Threads split experts x rows: the result must not depend on the count.
TEST(CpuSimd, ThreadCountDoesNotChangeBits) {
  for (bool prefill : {false, true}) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE(seed);
    Problem pr = Problem::random(ActType::bf16, {WeightType::int4, true}, 100, 512, 128,
                                 prefill ? std::vector<int32_t>{30, 50} : std::vector<int32_t>{3, 8},
                                 seed);
    set_num_threads(1);
    ASSERT_TRUE(moe(pr.params).ok());
    const std::vector<uint16_t> one = pr.out;
    set_num_threads(3);
    pr.poison();
    ASSERT_TRUE(moe(pr.params).ok());
    set_num_threads(0);
    EXPECT_EQ(one, pr.out);
  }
}

}  // namespace
}  // namespace qmoe::test
