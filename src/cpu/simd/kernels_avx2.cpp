// AVX2 + FMA + F16C level: fp32 FMA kernels, templated on the encoding
// trait; the per-encoding part is the register decode `Dec<Enc>` below.
//
// A unit of packed weights is decoded in registers to fp32 code values,
// dequantized with the group's scale and zero ((q - z) * s as one fmsub),
// and multiplied with fp32 activations:
//   decode (<= 8 tokens per expert): streamed once per row for all the
//   expert's tokens, one accumulator per token;
//   prefill (> 8 tokens): a block of rows is dequantized once into an fp32
//   panel in L2, then every token of the expert runs against it in 3 x 3
//   register tiles.
// Same plan and threading as the AVX-512 level (driver.h).
#include <immintrin.h>

#include <type_traits>

#include "cpu/simd/driver.h"
#include "cpu/simd/tables.h"

namespace qmoe::cpu::simd {
namespace {

using V = __m256;
using VI = __m256i;

template <class Enc>
constexpr bool is_native() {
  return Enc::kBits == 16;
}

inline VI load64(const uint8_t* p) {  // 8 bytes into the low half
  return _mm256_castsi128_si256(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline __m128i load128(const void* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// ---------------------------------------------------------------- decoders
// Dec<Enc>::values(p, v): kUnit weights (kBytes packed bytes at p) -> kVecs
// ymm of 8 fp32 code values (before scale and zero; times kFactor for fp8;
// plus kSymZero, which the zero point takes off, for symmetric codes).
// Lane i of vector v holds the weight at k = perm(8 v + i) of the unit.
template <class Enc, class = void>
struct Dec;

template <bool Asym>
struct Dec<IntEncoding<8, Asym>, void> {
  static constexpr int kUnit = 16, kBytes = 16, kVecs = 2;
  static constexpr float kFactor = 1.0f, kSymZero = 0.0f;
  static int perm(int p) { return p; }
  static void values(const uint8_t* p, V* v) {
    const __m128i b = load128(p);
    if constexpr (Asym) {  // the trait: asym codes are unsigned bytes
      v[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
      v[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
    } else {  // sym codes are two's complement
      v[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
      v[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
    }
  }
};

// int4 / int2: 8 bytes -> 8 dwords; field f of each byte is vector f.
// Symmetric (two's complement) fields are read unsigned with their top bit
// flipped, q + 2^(Bits-1), by one xor of the bytes: the 2^(Bits-1) is taken
// off with the zero point (kSymZero), in the same fmsub.
template <int Bits, bool Asym>
struct Dec<IntEncoding<Bits, Asym>, std::enable_if_t<(Bits < 8)>> {
  using Enc = IntEncoding<Bits, Asym>;
  static constexpr int kVecs = Enc::kPerByte, kUnit = 8 * kVecs, kBytes = 8;
  static constexpr float kFactor = 1.0f;
  static constexpr float kSymZero = Asym ? 0.0f : float(1 << (Bits - 1));
  static int perm(int p) { return kVecs * (p % 8) + p / 8; }
  static void values(const uint8_t* p, V* v) {
    VI b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    if constexpr (!Asym) {  // the top bit of every field of the byte
      constexpr int kTops = Bits == 4 ? 0x88 : 0xAA;
      b = _mm256_xor_si256(b, _mm256_set1_epi32(kTops));
    }
    for (int f = 0; f < kVecs; ++f)
      v[f] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(b, f * Bits), _mm256_set1_epi32(int(Enc::kMask))));
  }
};

// fp8 -> fp16 bits by a shift (fp16's 5-bit exponent field holds both
// formats' exponents, subnormals included), vcvtph2ps, and the bias
// difference folded into the scale (kFactor). E4M3's NaN code has no fp16
// image under the shift: patched.
template <class Fmt, WeightType W>
struct Dec<Fp8Encoding<Fmt, W>, void> {
  static constexpr int kUnit = 16, kBytes = 16, kVecs = 2;
  static constexpr int kShift = 10 - Fmt::kManBits;
  static constexpr float kFactor = float(1u << (15 - Fmt::kBias));  // 2^(15 - bias)
  static constexpr float kSymZero = 0.0f;
  static int perm(int p) { return p; }
  static void values(const uint8_t* p, V* v) {
    const VI w = _mm256_cvtepu8_epi16(load128(p));
    const VI mag = _mm256_and_si256(w, _mm256_set1_epi16(0x7f));
    VI h = _mm256_or_si256(_mm256_slli_epi16(mag, kShift),
                           _mm256_and_si256(_mm256_slli_epi16(w, 8), _mm256_set1_epi16(int16_t(0x8000))));
    if constexpr (!Fmt::kHasInf)
      h = _mm256_or_si256(h, _mm256_and_si256(_mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x7f)),
                                              _mm256_set1_epi16(0x7e00)));
    v[0] = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    v[1] = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
  }
};

template <class Act>
struct Dec<Native16Encoding<Act>, void> {
  static constexpr int kUnit = 16, kBytes = 32, kVecs = 2;
  static constexpr float kFactor = 1.0f, kSymZero = 0.0f;
  static int perm(int p) { return p; }
  static V cvt(__m128i h) {
    if constexpr (std::is_same_v<Act, ActF16>) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static void values(const uint8_t* p, V* v) {
    v[0] = cvt(load128(p));
    v[1] = cvt(load128(p + 16));
  }
};

// ---------------------------------------------------------------- helpers
template <class Act>
inline float half_to_float(uint16_t h) {
  if constexpr (std::is_same_v<Act, ActF16>) return _cvtsh_ss(h);
  uint32_t u = uint32_t(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

template <class Act>
inline uint16_t float_to_half(float f) {
  if constexpr (std::is_same_v<Act, ActF16>) return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);                  // nearest even
}

inline float hsum(V v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

inline float dot(const float* x, const float* y, int64_t n) {
  V acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), acc);
  float r = hsum(acc);
  for (; i < n; ++i) r += x[i] * y[i];
  return r;
}

// ---------------------------------------------------------------- one call
template <class Act, class Enc>
struct Runner {
  using D = Dec<Enc>;
  static constexpr int MR = 3, NR = 3;

  const MoeGemmParams& p;
  int64_t N, K, Kp, G, upg, units, row_bytes, gs;
  const uint8_t* w;
  const uint16_t* scales;
  const uint16_t* zeros;
  const uint16_t* act;
  uint16_t* out;
  Buf act_buf;   // fp32 activations [T, Kp], permuted like the decode
  Buf asum_buf;  // [T, G] sums of each group's activations (decode of scaled codes)

  explicit Runner(const MoeGemmParams& params)
      : p(params),
        N(p.n),
        K(p.k),
        Kp(round_up(p.k, D::kUnit)),
        G(Enc::kScaled ? p.k / p.group_size : 1),
        upg(Enc::kScaled ? p.group_size / D::kUnit : round_up(p.k, D::kUnit) / D::kUnit),
        units(round_up(p.k, D::kUnit) / D::kUnit),
        row_bytes(qmoe::row_bytes<Enc>(p.k)),
        gs(Enc::kScaled ? p.group_size : round_up(p.k, D::kUnit)),
        w(static_cast<const uint8_t*>(p.weights)),
        scales(static_cast<const uint16_t*>(p.scales)),
        zeros(static_cast<const uint16_t*>(p.zeros)),
        act(static_cast<const uint16_t*>(p.activations)),
        out(static_cast<uint16_t*>(p.out)) {}

  const float* act_row(int64_t t) const { return act_buf.as<float>() + t * Kp; }

  void prep_token(int64_t t) {
    const uint16_t* src = act + t * K;
    float* dst = act_buf.as<float>() + t * Kp;
    if (D::kVecs == 1 || D::perm(8) == 8) {  // identity order
      int64_t k = 0;
      for (; k + 8 <= K; k += 8)
        _mm256_storeu_ps(dst + k, Dec<Native16Encoding<Act>>::cvt(load128(src + k)));
      for (; k < Kp; ++k) dst[k] = k < K ? half_to_float<Act>(src[k]) : 0.0f;
      return;
    }
    for (int64_t u = 0; u < units; ++u)
      for (int q = 0; q < D::kUnit; ++q) {
        const int64_t k = u * D::kUnit + D::perm(q);
        dst[u * D::kUnit + q] = k < K ? half_to_float<Act>(src[k]) : 0.0f;
      }
  }

  // Scale (times the fp8 factor) and scale * zero of each group of a row.
  void row_scales(int64_t e, int64_t r, float* s, float* sz) const {
    if constexpr (Enc::kScaled) {
      const uint16_t* sp = scales + (e * N + r) * G;
      for (int64_t g = 0; g < G; ++g) {
        s[g] = half_to_float<Act>(sp[g]) * D::kFactor;
        sz[g] = s[g] * (Enc::kAsym ? half_to_float<Act>(zeros[(e * N + r) * G + g]) : D::kSymZero);
      }
    } else {
      s[0] = 1.0f;
      sz[0] = 0.0f;
    }
  }

  // Dequantized unit u of a row into kVecs fp32 vectors.
  void unit(const uint8_t* wr, int64_t u, const float* s, const float* sz, V* v) const {
    if constexpr (is_native<Enc>()) {
      if ((u + 1) * D::kUnit > K) {  // K tail: copy into a zero-padded unit
        alignas(32) uint16_t tmp[D::kUnit] = {};
        const uint16_t* src = reinterpret_cast<const uint16_t*>(wr) + u * D::kUnit;
        for (int64_t i = 0; i < K - u * D::kUnit; ++i) tmp[i] = src[i];
        D::values(reinterpret_cast<const uint8_t*>(tmp), v);
        return;
      }
      D::values(wr + u * D::kBytes, v);
    } else {
      D::values(wr + u * D::kBytes, v);
      const int64_t g = u / upg;
      const V sv = _mm256_set1_ps(s[g]), zv = _mm256_set1_ps(sz[g]);
      for (int j = 0; j < D::kVecs; ++j) v[j] = _mm256_fmsub_ps(v[j], sv, zv);  // (q - z) * s
    }
  }

  // Few tokens: C accumulator chains a token (one chain was bound by the
  // FMA's 4-cycle latency: one Zen 5 core, L2-resident, 1 token, int4
  // 4.5 GB/s, int2 2.4), units two at a time where the registers allow.
  // Up to 4 tokens the codes go into the dot products as they are and each
  // group's sums take the scale after (tot += s_g * sum q a), the zero point
  // once a row (- sum_g s_g z_g sum_{k in g} a_k): no fmsub a vector. With
  // 8 tokens the running sums would not fit the 16 registers: (q - z) * s
  // a vector, as in the prefill panel.
  template <int NT>
  void decode_rows(int64_t e, int64_t r0, int64_t r1, const float* const* a, const float* const* as,
                   float* s, float* sz, float* res) const {
    constexpr int C = NT == 1 ? 4 : NT == 2 ? 2 : 1;  // chains a token
    constexpr int UN = NT <= 2 ? 2 : 1;               // units a step
    constexpr bool kPost = Enc::kScaled && NT <= 4;  // scale after the dot products
    const int64_t nr = r1 - r0;
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* wr = w + (e * N + r) * row_bytes;
      row_scales(e, r, s, sz);
      V acc[C][NT], tot[NT];
      auto zero = [&] {
        for (int c = 0; c < C; ++c)
          for (int t = 0; t < NT; ++t) acc[c][t] = _mm256_setzero_ps();
      };
      auto step = [&](int64_t u, auto un_c) {
        constexpr int un = decltype(un_c)::value;
        V v[un][D::kVecs];
        for (int q = 0; q < un; ++q) {
          if constexpr (kPost) D::values(wr + (u + q) * D::kBytes, v[q]);
          else unit(wr, u + q, s, sz, v[q]);
        }
        for (int q = 0; q < un; ++q)
          for (int j = 0; j < D::kVecs; ++j)
            for (int t = 0; t < NT; ++t) {
              V& c = acc[(q * D::kVecs + j) % C][t];
              c = _mm256_fmadd_ps(v[q][j], _mm256_loadu_ps(a[t] + (u + q) * D::kUnit + 8 * j), c);
            }
      };
      auto units_of = [&](int64_t u0, int64_t u1) {
        int64_t u = u0;
        for (; u + UN <= u1; u += UN) step(u, std::integral_constant<int, UN>{});
        for (; u < u1; ++u) step(u, std::integral_constant<int, 1>{});
      };
      auto chains = [&](int t) {
        V d = acc[0][t];
        for (int c = 1; c < C; ++c) d = _mm256_add_ps(d, acc[c][t]);
        return d;
      };
      if constexpr (kPost) {
        for (int t = 0; t < NT; ++t) tot[t] = _mm256_setzero_ps();
        for (int64_t g = 0; g < G; ++g) {
          zero();
          units_of(g * upg, (g + 1) * upg);
          const V sv = _mm256_set1_ps(s[g]);
          for (int t = 0; t < NT; ++t) tot[t] = _mm256_fmadd_ps(chains(t), sv, tot[t]);
        }
        for (int t = 0; t < NT; ++t) res[t * nr + (r - r0)] = hsum(tot[t]) - dot(sz, as[t], G);
      } else {
        zero();
        units_of(0, units);
        for (int t = 0; t < NT; ++t) res[t * nr + (r - r0)] = hsum(chains(t));
      }
    }
  }

  static void micro(const float* const* A, const float* const* B, int64_t Kp, float* C) {
    V acc[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < Kp; k += 8) {
      V b[NR];
      for (int j = 0; j < NR; ++j) b[j] = _mm256_loadu_ps(B[j] + k);
      for (int i = 0; i < MR; ++i) {
        const V a = _mm256_loadu_ps(A[i] + k);
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(a, b[j], acc[i][j]);
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) C[i * NR + j] = hsum(acc[i][j]);
  }

  void prefill_item(const Plan& plan, int64_t e, int64_t r0, int64_t r1, float* panel, float* s,
                    float* sz) const {
    const float* prow[64 + NR];
    const int64_t nr = r1 - r0;
    for (int64_t r = 0; r < nr; ++r) {
      const uint8_t* wr = w + (e * N + r0 + r) * row_bytes;
      row_scales(e, r0 + r, s, sz);
      float* dst = panel + r * Kp;
      for (int64_t u = 0; u < units; ++u) {
        V v[D::kVecs];
        unit(wr, u, s, sz, v);
        for (int j = 0; j < D::kVecs; ++j) _mm256_storeu_ps(dst + u * D::kUnit + 8 * j, v[j]);
      }
      prow[r] = dst;
    }
    for (int64_t r = nr; r < nr + NR; ++r) prow[r] = prow[nr - 1];
    const int64_t t0 = plan.offsets[e], nt = plan.tokens(e);
    float C[MR * NR];
    for (int64_t m = 0; m < nt; m += MR) {
      const float* A[MR];
      for (int i = 0; i < MR; ++i) A[i] = act_row(t0 + min64(m + i, nt - 1));
      const int64_t mr = min64(MR, nt - m);
      for (int64_t j = 0; j < nr; j += NR) {
        micro(A, prow + j, Kp, C);
        for (int64_t i = 0; i < mr; ++i)
          for (int64_t c = 0; c < min64(NR, nr - j); ++c)
            out[(t0 + m + i) * N + r0 + j + c] = float_to_half<Act>(C[i * NR + c]);
      }
    }
  }

  bool run() {
    if (!can_run(p, D::kUnit)) return false;
    const int64_t T = p.total_tokens;
    if (T == 0) return true;
    const int threads = pool_size();
    const int64_t nb = max64(NR, min64(63, (256 << 10) / (Kp * 4) / NR * NR));
    Plan plan(p, row_bytes, nb, threads);

    act_buf.alloc(size_t(T * Kp * 4));
    const bool sums = Enc::kScaled && plan.decode_tokens > 0;
    if (sums) asum_buf.alloc(size_t(T * G * 4));
    auto prep = [&](int64_t b, int) {
      int64_t e = 0;
      for (int64_t t = b * 16; t < min64(T, (b + 1) * 16); ++t) {
        prep_token(t);
        while (plan.offsets[e + 1] <= t) ++e;
        if (sums && plan.is_decode_expert(e))  // (a group holds whole units: permuted within a unit, same sum)
          for (int64_t g = 0; g < G; ++g) {
            const float* x = act_row(t) + g * gs;
            V acc = _mm256_setzero_ps();
            for (int64_t k = 0; k < gs; k += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + k));
            asum_buf.as<float>()[t * G + g] = hsum(acc);
          }
      }
    };
    parallel(ceil_div(T, 16), prep);

    const int64_t chunk = 512;
    const int64_t res_elems = min64(chunk, N) * kDecodeMaxTokens;
    const int64_t panel_elems = plan.prefill_tokens > 0 ? plan.prefill_nb * Kp : 0;
    const int64_t per = round_up((2 * G + res_elems + panel_elems) * 4, 64);
    Buf scratch(size_t(per * threads));

    auto body = [&](int64_t i, int wk) {
      const Item& it = plan.items[i];
      float* s = reinterpret_cast<float*>(scratch.as<uint8_t>() + wk * per);
      float* sz = s + G;
      float* res = sz + G;
      float* panel = res + res_elems;
      const int64_t e = it.expert, t0 = plan.offsets[e], nt = plan.tokens(e);
      if (!it.decode) {
        prefill_item(plan, e, it.r0, it.r1, panel, s, sz);
        return;
      }
      const float* a[kDecodeMaxTokens];
      const float* as[kDecodeMaxTokens];
      for (int t = 0; t < kDecodeMaxTokens; ++t) {
        a[t] = act_row(t0 + min64(t, nt - 1));
        as[t] = sums ? asum_buf.as<float>() + (t0 + min64(t, nt - 1)) * G : nullptr;
      }
      const int64_t nr = it.r1 - it.r0;
      for (int64_t c0 = 0; c0 < nr; c0 += chunk) {
        const int64_t r0 = it.r0 + c0, r1 = it.r0 + min64(nr, c0 + chunk);
        switch (padded_tokens(nt)) {
          case 1: decode_rows<1>(e, r0, r1, a, as, s, sz, res); break;
          case 2: decode_rows<2>(e, r0, r1, a, as, s, sz, res); break;
          case 4: decode_rows<4>(e, r0, r1, a, as, s, sz, res); break;
          default: decode_rows<8>(e, r0, r1, a, as, s, sz, res); break;
        }
        for (int64_t t = 0; t < nt; ++t)
          for (int64_t r = r0; r < r1; ++r)
            out[(t0 + t) * N + r] = float_to_half<Act>(res[t * (r1 - r0) + (r - r0)]);
      }
    };
    parallel(plan.n_items, body);
    return true;
  }
};

}  // namespace

bool run_avx2(const MoeGemmParams& p, Phase /*phase*/) {
  bool handled = false;
  visit_encoding(p.act_type, p.weight_type, p.asym, [&](auto act, auto enc) {
    Runner<decltype(act), decltype(enc)> runner(p);
    handled = runner.run();
  });
  return handled;
}

}  // namespace qmoe::cpu::simd
