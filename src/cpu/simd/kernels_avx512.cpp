// AVX-512 level (F/BW/VL/DQ + AVX512_BF16): one decode kernel and one
// prefill kernel, templated on the encoding trait; the per-encoding part is
// the register decode `Dec<Enc>` below.
//
// Decode (<= 8 tokens per expert): a row's packed weights are decoded in
// registers into exact bf16 code values (int codes, fp8 values, bf16 weights
// are all exact in bf16) and multiplied with vdpbf16ps against the tokens'
// activations; per group, the fp32 partial sums are scaled by the group's
// scale; zeros come in once per row as sum_g s_g z_g sum_{k in g} a_k. bf16
// activations are exact in bf16; fp16 activations are split a = hi + lo
// (both bf16, exact), two dot products. So decode has the accuracy of an
// fp32 product. fp16 16-bit weights (not exact in bf16) use vcvtph2ps + FMA.
//
// Prefill (> 8 tokens): a block of rows is dequantized once into a panel in
// L2 — bf16 for bf16 activations (the weights then round to bf16, as in
// PyTorch's bf16 product), fp32 for fp16 activations (fp16 does not survive
// a bf16 round trip within the 2e-3 tolerance) — and every token of the
// expert runs against it in 4 x 4 register tiles (vdpbf16ps or FMA).
#include <immintrin.h>

// GCC 12 warns about the deliberately undefined upper halves in its own
// AVX-512 headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <type_traits>

#include "cpu/simd/driver.h"
#include "cpu/simd/tables.h"

namespace qmoe::cpu::simd {
namespace {

using V = __m512;
using VI = __m512i;

inline __m512bh bh(VI x) { return (__m512bh)x; }
inline VI loadu(const void* p) { return _mm512_loadu_si512(p); }

template <class Enc>
constexpr bool is_native_f16() {
  return std::is_same_v<Enc, Native16Encoding<ActF16>>;
}

// bf16 words of 32 floats (exact for the table values used here).
inline VI bf16_table(const float* v) {
  return (VI)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(v + 16), _mm512_loadu_ps(v));
}

// ---------------------------------------------------------------- decoders
// Dec<Enc>::codes(p, v): kUnit weights (kBytes packed bytes at p) -> kVecs
// zmm of 32 bf16 code values each (value before scale and zero, exact).
// Word j of vector v is the weight at k = kVecs * j + v of the unit; the
// activations are prepared in the same order (permute_unit below).
template <class Enc, class = void>
struct Dec;

template <bool Asym>
struct Dec<IntEncoding<8, Asym>, void> {
  static constexpr int kUnit = 32, kBytes = 32, kVecs = 1;
  explicit Dec(const float*) {}
  void codes(const uint8_t* p, VI* v) const {
    const __m128i* q = reinterpret_cast<const __m128i*>(p);
    VI lo, hi;
    if constexpr (Asym) {  // the trait: asym codes are unsigned bytes
      lo = _mm512_cvtepu8_epi32(_mm_loadu_si128(q));
      hi = _mm512_cvtepu8_epi32(_mm_loadu_si128(q + 1));
    } else {  // sym codes are two's complement
      lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(q));
      hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1));
    }
    v[0] = (VI)_mm512_cvtne2ps_pbh(_mm512_cvtepi32_ps(hi), _mm512_cvtepi32_ps(lo));
  }
};

// int4 / int2: 32 bytes -> 32 words, field f of each byte through a 32-entry
// vpermw table of bf16(value(code)) (vpermw reads the low 5 bits of the
// index, so table[i] = value(i & mask) needs no masking).
template <int Bits, bool Asym>
struct Dec<IntEncoding<Bits, Asym>, std::enable_if_t<(Bits < 8)>> {
  using Enc = IntEncoding<Bits, Asym>;
  static constexpr int kVecs = Enc::kPerByte, kUnit = 32 * kVecs, kBytes = 32;
  VI lut;
  explicit Dec(const float* values) {
    alignas(64) float t[32];
    for (int i = 0; i < 32; ++i) t[i] = values[i & Enc::kMask];
    lut = bf16_table(t);
  }
  void codes(const uint8_t* p, VI* v) const {
    const VI b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    v[0] = _mm512_permutexvar_epi16(b, lut);
    for (int f = 1; f < kVecs; ++f)
      v[f] = _mm512_permutexvar_epi16(_mm512_srli_epi16(b, unsigned(f * Bits)), lut);
  }
};

// fp8: bit trick for normal codes (move exponent and mantissa into bf16's
// fields and rebias), a vpermw table for the subnormals, inf/NaN codes to
// bf16 inf/NaN, then the sign. Constants come from the format.
template <class Fmt, WeightType W>
struct Dec<Fp8Encoding<Fmt, W>, void> {
  static constexpr int kUnit = 32, kBytes = 32, kVecs = 1;
  static constexpr int kMan = Fmt::kManBits, kShift = 7 - kMan;
  static constexpr int kRebias = (127 - Fmt::kBias) << 7;
  static constexpr int kSpecial = Fmt::kHasInf ? (((1 << Fmt::kExpBits) - 1) << kMan) : 0x7f;
  VI sub;
  explicit Dec(const float* values) {
    alignas(64) float t[32];
    for (int i = 0; i < 32; ++i) t[i] = values[i & ((1 << kMan) - 1)];
    sub = bf16_table(t);
  }
  void codes(const uint8_t* p, VI* v) const {
    const VI w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    const VI mag = _mm512_and_si512(w, _mm512_set1_epi16(0x7f));
    const VI sh = _mm512_slli_epi16(mag, kShift);
    VI r = _mm512_add_epi16(sh, _mm512_set1_epi16(kRebias));
    r = _mm512_mask_permutexvar_epi16(r, _mm512_cmplt_epu16_mask(mag, _mm512_set1_epi16(1 << kMan)),
                                      mag, sub);
    r = _mm512_mask_mov_epi16(r, _mm512_cmpge_epu16_mask(mag, _mm512_set1_epi16(kSpecial)),
                              _mm512_or_si512(sh, _mm512_set1_epi16(0x7f80)));
    // r | ((w << 8) & 0x8000)
    v[0] = _mm512_ternarylogic_epi32(r, _mm512_slli_epi16(w, 8), _mm512_set1_epi16(int16_t(0x8000)),
                                     0xF8);
  }
};

template <>
struct Dec<Native16Encoding<ActBF16>, void> {
  static constexpr int kUnit = 32, kBytes = 64, kVecs = 1;
  explicit Dec(const float*) {}
  void codes(const uint8_t* p, VI* v) const { v[0] = loadu(p); }
  void codes_tail(const uint8_t* p, int n, VI* v) const {
    v[0] = _mm512_maskz_loadu_epi16(__mmask32((1ull << n) - 1), p);
  }
};

// fp16 weights are not exact in bf16: this one has no codes(), only the f32
// path (vcvtph2ps).
template <>
struct Dec<Native16Encoding<ActF16>, void> {
  static constexpr int kUnit = 32, kBytes = 64, kVecs = 1;
  explicit Dec(const float*) {}
};

// ---------------------------------------------------------------- helpers
template <class Act>
inline V half_to_f32(__m256i h) {
  if constexpr (std::is_same_v<Act, ActF16>) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline V bf16_lo_f32(VI v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
}
inline V bf16_hi_f32(VI v) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
}
// Masks of the first n lanes (n <= 0: none).
inline __mmask16 mask16(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}
inline __mmask32 mask32(int64_t n) {
  return n >= 32 ? __mmask32(0xffffffffu) : n <= 0 ? __mmask32(0) : __mmask32((1ull << n) - 1);
}

// n floats -> activation dtype (round to nearest even).
template <class Act>
void store_act(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = mask16(n - i);
    const V x = _mm512_maskz_loadu_ps(m, src + i);
    __m256i h;
    if constexpr (std::is_same_v<Act, ActF16>)
      h = _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    else
      h = (__m256i)_mm512_cvtneps_pbh(x);
    _mm256_mask_storeu_epi16(dst + i, m, h);
  }
}

// Scales (and scale * zero) of one row, as floats.
template <class Act, bool Asym>
void row_scales(const uint16_t* s, const uint16_t* z, int64_t G, float* sbuf, float* szbuf) {
  for (int64_t g = 0; g < G; g += 16) {
    const __mmask16 m = mask16(G - g);
    const V sv = half_to_f32<Act>(_mm256_maskz_loadu_epi16(m, s + g));
    _mm512_mask_storeu_ps(sbuf + g, m, sv);
    if constexpr (Asym)
      _mm512_mask_storeu_ps(szbuf + g, m,
                            _mm512_mul_ps(sv, half_to_f32<Act>(_mm256_maskz_loadu_epi16(m, z + g))));
  }
}

inline float dot_f32(const float* a, const float* b, int64_t n) {
  V acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = mask16(n - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// Permutes one unit of activations (kVecs x 32 words, already loaded) into
// the order of Dec::codes: out_j[i] = x[kVecs * i + j].
template <int kVecs>
inline void permute_unit(const VI* x, VI* out) {
  if constexpr (kVecs == 1) {
    out[0] = x[0];
  } else if constexpr (kVecs == 2) {
    alignas(64) uint16_t idx[32];
    for (int j = 0; j < 2; ++j) {
      for (int i = 0; i < 32; ++i) idx[i] = uint16_t(2 * i + j);
      out[j] = _mm512_permutex2var_epi16(x[0], loadu(idx), x[1]);
    }
  } else {
    static_assert(kVecs == 4);
    alignas(64) uint16_t idx[32];
    for (int j = 0; j < 4; ++j) {
      for (int i = 0; i < 32; ++i) idx[i] = uint16_t(4 * (i % 16) + j);
      const VI ix = loadu(idx);
      const VI lo = _mm512_permutex2var_epi16(x[0], ix, x[1]);
      const VI hi = _mm512_permutex2var_epi16(x[2], ix, x[3]);
      out[j] = _mm512_mask_blend_epi16(__mmask32(0xffff0000u), lo, hi);
    }
  }
}

// ---------------------------------------------------------------- one call
enum class ActMode { bf16, hilo, f32 };  // prepared activation format

template <class Act, class Enc>
struct Runner {
  using D = Dec<Enc>;
  static constexpr bool kF16 = std::is_same_v<Act, ActF16>;
  static constexpr bool kNativeF16 = is_native_f16<Enc>();
  static constexpr int MR = 4, NR = 4;

  const MoeGemmParams& p;
  const D dec;
  int64_t N, K, Kp, G, upg, units, row_bytes;
  const uint8_t* w;
  const uint16_t* scales;
  const uint16_t* zeros;
  const uint16_t* act;
  uint16_t* out;
  // Prepared activations: one row of `stride` bytes per token.
  Buf act_buf, asum_buf;
  int64_t stride = 0;
  bool direct = false;  // bf16 activations used in place
  float* asum = nullptr;  // [T, G] (asym decode tokens)

  Runner(const MoeGemmParams& params, const float* values)
      : p(params),
        dec(values),
        N(p.n),
        K(p.k),
        Kp(round_up(p.k, D::kUnit)),
        G(Enc::kScaled ? p.k / p.group_size : 1),
        upg(Enc::kScaled ? p.group_size / D::kUnit : round_up(p.k, D::kUnit) / D::kUnit),
        units(round_up(p.k, D::kUnit) / D::kUnit),
        row_bytes(qmoe::row_bytes<Enc>(p.k)),
        w(static_cast<const uint8_t*>(p.weights)),
        scales(static_cast<const uint16_t*>(p.scales)),
        zeros(static_cast<const uint16_t*>(p.zeros)),
        act(static_cast<const uint16_t*>(p.activations)),
        out(static_cast<uint16_t*>(p.out)) {}

  ActMode mode(bool decode_token) const {
    if (!kF16) return ActMode::bf16;
    return (decode_token && !kNativeF16) ? ActMode::hilo : ActMode::f32;
  }
  const uint8_t* act_row(int64_t t) const {
    return direct ? reinterpret_cast<const uint8_t*>(act + t * K)
                  : act_buf.as<uint8_t>() + t * stride;
  }

  // ------------------------------------------------------------ activations
  void prep_token(int64_t t, ActMode m, bool want_asum) {
    const uint16_t* src = act + t * K;
    uint8_t* dst = act_buf.as<uint8_t>() + t * stride;
    float* as = want_asum ? asum + t * G : nullptr;
    V gsum = _mm512_setzero_ps();
    for (int64_t u = 0; u < units; ++u) {
      VI x[D::kVecs], y[D::kVecs];
      for (int j = 0; j < D::kVecs; ++j) {
        const int64_t k0 = u * D::kUnit + j * 32;
        x[j] = _mm512_maskz_loadu_epi16(mask32(K - k0), src + k0);
      }
      permute_unit<D::kVecs>(x, y);
      for (int j = 0; j < D::kVecs; ++j) {
        const int64_t o = u * D::kUnit + j * 32;
        const V f0 = half_to_f32<Act>(_mm512_castsi512_si256(y[j]));
        const V f1 = half_to_f32<Act>(_mm512_extracti64x4_epi64(y[j], 1));
        if (as) gsum = _mm512_add_ps(gsum, _mm512_add_ps(f0, f1));
        if (m == ActMode::bf16) {
          _mm512_storeu_si512(reinterpret_cast<uint16_t*>(dst) + o, y[j]);
        } else if (m == ActMode::f32) {
          _mm512_storeu_ps(reinterpret_cast<float*>(dst) + o, f0);
          _mm512_storeu_ps(reinterpret_cast<float*>(dst) + o + 16, f1);
        } else {  // a = hi + lo, both bf16, exact for fp16 a
          const VI hi = (VI)_mm512_cvtne2ps_pbh(f1, f0);
          const V r0 = _mm512_sub_ps(f0, bf16_lo_f32(hi));
          const V r1 = _mm512_sub_ps(f1, bf16_hi_f32(hi));
          _mm512_storeu_si512(reinterpret_cast<uint16_t*>(dst) + o, hi);
          _mm512_storeu_si512(reinterpret_cast<uint16_t*>(dst) + Kp + o,
                              (VI)_mm512_cvtne2ps_pbh(r1, r0));
        }
      }
      if (as && (u + 1) % upg == 0) {
        as[u / upg] = _mm512_reduce_add_ps(gsum);
        gsum = _mm512_setzero_ps();
      }
    }
  }

  // ------------------------------------------------------------ decode rows
  template <int NT>
  void decode_rows(int64_t e, int64_t r0, int64_t r1, const uint8_t* const* a,
                   const float* const* as, float* sbuf, float* szbuf, float* res) const {
    const int64_t nr = r1 - r0;
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* wr = w + (e * N + r) * row_bytes;
      V tot[NT];
      for (int t = 0; t < NT; ++t) tot[t] = _mm512_setzero_ps();
      if constexpr (kNativeF16) {
        const int64_t full = K / 32;
        auto step = [&](V w0, V w1, int64_t k0) {
          for (int t = 0; t < NT; ++t) {
            const float* at = reinterpret_cast<const float*>(a[t]) + k0;
            tot[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(at), tot[t]);
            tot[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(at + 16), tot[t]);
          }
        };
        const __m256i* wp = reinterpret_cast<const __m256i*>(wr);
        for (int64_t u = 0; u < full; ++u)
          step(_mm512_cvtph_ps(_mm256_loadu_si256(wp + 2 * u)),
               _mm512_cvtph_ps(_mm256_loadu_si256(wp + 2 * u + 1)), u * 32);
        if (K % 32) {
          const int64_t n = K % 32;
          const uint16_t* tp = reinterpret_cast<const uint16_t*>(wr) + full * 32;
          step(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask16(n), tp)),
               _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask16(n - 16), tp + 16)),
               full * 32);
        }
      } else {
        if constexpr (Enc::kScaled)
          row_scales<Act, Enc::kAsym>(scales + (e * N + r) * G, Enc::kAsym ? zeros + (e * N + r) * G : nullptr,
                                      G, sbuf, szbuf);
        // Two accumulator chains per token (vdpbf16ps has a 6-cycle latency):
        // chain (q + j + part) & 1 for unit q of a pair, vector j, and
        // hi/lo part of fp16 activations.
        V acc[2][NT];
        auto step = [&](const VI* v, int64_t u, int q) {
          for (int j = 0; j < D::kVecs; ++j) {
            const int64_t o = (u * D::kUnit + j * 32) * 2;  // bytes
            const int c0 = (q + j) & 1;
            for (int t = 0; t < NT; ++t) {
              acc[c0][t] = _mm512_dpbf16_ps(acc[c0][t], bh(v[j]), bh(loadu(a[t] + o)));
              if constexpr (kF16)
                acc[c0 ^ 1][t] = _mm512_dpbf16_ps(acc[c0 ^ 1][t], bh(v[j]), bh(loadu(a[t] + 2 * Kp + o)));
            }
          }
        };
        const int64_t full = Enc::kScaled ? upg : K / D::kUnit;
        for (int64_t g = 0; g < G; ++g) {
          for (int t = 0; t < NT; ++t) acc[0][t] = acc[1][t] = _mm512_setzero_ps();
          const int64_t u0 = g * upg, u1 = u0 + full;
          int64_t u = u0;
          for (; u + 1 < u1; u += 2) {
            VI v[D::kVecs], v2[D::kVecs];
            dec.codes(wr + u * D::kBytes, v);
            dec.codes(wr + (u + 1) * D::kBytes, v2);
            step(v, u, 0);
            step(v2, u + 1, 1);
          }
          if (u < u1) {
            VI v[D::kVecs];
            dec.codes(wr + u * D::kBytes, v);
            step(v, u, 0);
          }
          if constexpr (!Enc::kScaled) {
            if (K % D::kUnit) {
              VI v[1];
              dec.codes_tail(wr + full * D::kBytes, int(K % D::kUnit), v);
              step(v, full, 1);
            }
            for (int t = 0; t < NT; ++t) tot[t] = _mm512_add_ps(acc[0][t], acc[1][t]);
          } else {
            const V s = _mm512_set1_ps(sbuf[g]);
            for (int t = 0; t < NT; ++t)
              tot[t] = _mm512_fmadd_ps(_mm512_add_ps(acc[0][t], acc[1][t]), s, tot[t]);
          }
        }
      }
      for (int t = 0; t < NT; ++t) {
        float x = _mm512_reduce_add_ps(tot[t]);
        if constexpr (Enc::kAsym) x -= dot_f32(szbuf, as[t], G);
        res[t * nr + (r - r0)] = x;
      }
    }
  }

  // ------------------------------------------------------------ prefill
  // Dequantized row r of expert e into a panel row (Kp elements, permuted
  // like the activations, zero tail): bf16 or fp32.
  void panel_row(int64_t e, int64_t r, void* dst, float* sbuf, float* szbuf) const {
    const uint8_t* wr = w + (e * N + r) * row_bytes;
    if constexpr (kNativeF16) {
      float* d = static_cast<float*>(dst);
      const uint16_t* s = reinterpret_cast<const uint16_t*>(wr);
      for (int64_t k = 0; k < Kp; k += 16)
        _mm512_storeu_ps(d + k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask16(K - k), s + k)));
    } else if constexpr (!Enc::kScaled) {  // bf16 weights, bf16 panel
      uint16_t* d = static_cast<uint16_t*>(dst);
      const uint16_t* s = reinterpret_cast<const uint16_t*>(wr);
      for (int64_t k = 0; k < Kp; k += 32)
        _mm512_storeu_si512(d + k, _mm512_maskz_loadu_epi16(mask32(K - k), s + k));
    } else {
      row_scales<Act, Enc::kAsym>(scales + (e * N + r) * G, Enc::kAsym ? zeros + (e * N + r) * G : nullptr,
                                  G, sbuf, szbuf);
      for (int64_t u = 0; u < units; ++u) {
        const int64_t g = u / upg;
        const V s = _mm512_set1_ps(sbuf[g]);
        const V zs = Enc::kAsym ? _mm512_set1_ps(szbuf[g]) : _mm512_setzero_ps();
        VI v[D::kVecs];
        dec.codes(wr + u * D::kBytes, v);
        for (int j = 0; j < D::kVecs; ++j) {
          const int64_t o = u * D::kUnit + j * 32;
          const V f0 = _mm512_fmsub_ps(bf16_lo_f32(v[j]), s, zs);  // (q - z) * s
          const V f1 = _mm512_fmsub_ps(bf16_hi_f32(v[j]), s, zs);
          if constexpr (kF16) {
            _mm512_storeu_ps(static_cast<float*>(dst) + o, f0);
            _mm512_storeu_ps(static_cast<float*>(dst) + o + 16, f1);
          } else {
            _mm512_storeu_si512(static_cast<uint16_t*>(dst) + o, (VI)_mm512_cvtne2ps_pbh(f1, f0));
          }
        }
      }
    }
  }

  // C[i][j] = sum_k A_i[k] B_j[k] over Kp elements (bf16 pairs or fp32).
  static void micro(const uint8_t* const* A, const uint8_t* const* B, int64_t Kp, float* C) {
    V acc[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
    const int64_t bytes = Kp * (kF16 ? 4 : 2);
    for (int64_t o = 0; o < bytes; o += 64) {
      VI b[NR];
      for (int j = 0; j < NR; ++j) b[j] = loadu(B[j] + o);
      for (int i = 0; i < MR; ++i) {
        const VI a = loadu(A[i] + o);
        for (int j = 0; j < NR; ++j) {
          if constexpr (kF16)
            acc[i][j] = _mm512_fmadd_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b[j]), acc[i][j]);
          else
            acc[i][j] = _mm512_dpbf16_ps(acc[i][j], bh(a), bh(b[j]));
        }
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) C[i * NR + j] = _mm512_reduce_add_ps(acc[i][j]);
  }

  bool panel_is_weights() const {  // bf16 weights used in place
    return std::is_same_v<Enc, Native16Encoding<ActBF16>> && K % 32 == 0;
  }

  void prefill_item(const Plan& plan, int64_t e, int64_t r0, int64_t r1, uint8_t* panel,
                    float* sbuf, float* szbuf) const {
    const int64_t pstride = Kp * (kF16 ? 4 : 2);
    const bool in_place = panel_is_weights();
    const uint8_t* prow[64 + NR];
    const int64_t nr = r1 - r0;
    for (int64_t r = 0; r < nr; ++r) {
      if (in_place) {
        prow[r] = w + (e * N + r0 + r) * row_bytes;
      } else {
        panel_row(e, r0 + r, panel + r * pstride, sbuf, szbuf);
        prow[r] = panel + r * pstride;
      }
    }
    for (int64_t r = nr; r < nr + NR; ++r) prow[r] = prow[nr - 1];
    const int64_t t0 = plan.offsets[e], nt = plan.tokens(e);
    float C[MR * NR];
    for (int64_t m = 0; m < nt; m += MR) {
      const uint8_t* A[MR];
      for (int i = 0; i < MR; ++i) A[i] = act_row(t0 + min64(m + i, nt - 1));
      const int64_t mr = min64(MR, nt - m);
      for (int64_t j = 0; j < nr; j += NR) {
        micro(A, prow + j, Kp, C);
        const int64_t nc = min64(NR, nr - j);
        for (int64_t i = 0; i < mr; ++i) store_act<Act>(C + i * NR, out + (t0 + m + i) * N + r0 + j, nc);
      }
    }
  }

  // ------------------------------------------------------------ driver
  bool run() {
    if (!can_run(p, D::kUnit)) return false;
    const int64_t T = p.total_tokens;
    if (T == 0) return true;
    const int threads = pool_size();
    const int64_t pelem = kF16 ? 4 : 2;
    const int64_t nb = max64(NR, min64(64, (256 << 10) / (Kp * pelem) / NR * NR));
    Plan plan(p, row_bytes, nb, threads);

    // Activations: bf16 ones are used in place when no permutation or
    // padding is needed.
    direct = !kF16 && D::kVecs == 1 && K % 32 == 0;
    if (!direct) {
      stride = Kp * (kF16 ? 4 : 2);
      act_buf.alloc(size_t(T * stride));
    }
    const bool need_asum = Enc::kAsym && plan.decode_tokens > 0;
    if (need_asum) {
      asum_buf.alloc(size_t(T * G * 4));
      asum = asum_buf.as<float>();
    }
    if (!direct || need_asum) {
      const int64_t blocks = ceil_div(T, 16);
      auto prep = [&](int64_t b, int) {
        int64_t e = 0;
        for (int64_t t = b * 16; t < min64(T, (b + 1) * 16); ++t) {
          while (plan.offsets[e + 1] <= t) ++e;
          const bool dec_tok = plan.is_decode_expert(e);
          if (direct) {
            if (dec_tok) prep_asum_only(t);
          } else {
            prep_token(t, mode(dec_tok), Enc::kAsym && dec_tok);
          }
        }
      };
      parallel(blocks, prep);
    }

    // Per-worker scratch.
    const int64_t chunk = 512;  // decode rows between two output stores
    const int64_t res_elems = min64(chunk, N) * kDecodeMaxTokens;
    const int64_t panel_bytes = plan.prefill_tokens > 0 && !panel_is_weights() ? plan.prefill_nb * Kp * pelem : 0;
    const int64_t per = round_up(2 * G * 4 + res_elems * 4 + panel_bytes, 64);
    Buf scratch(size_t(per * threads));

    auto body = [&](int64_t i, int wk) {
      const Item& it = plan.items[i];
      uint8_t* s = scratch.as<uint8_t>() + wk * per;
      float* sbuf = reinterpret_cast<float*>(s);
      float* szbuf = sbuf + G;
      float* res = szbuf + G;
      uint8_t* panel = reinterpret_cast<uint8_t*>(res + res_elems);
      const int64_t e = it.expert, t0 = plan.offsets[e], nt = plan.tokens(e);
      if (!it.decode) {
        prefill_item(plan, e, it.r0, it.r1, panel, sbuf, szbuf);
        return;
      }
      const uint8_t* a[kDecodeMaxTokens];
      const float* as[kDecodeMaxTokens];
      for (int t = 0; t < kDecodeMaxTokens; ++t) {
        const int64_t tt = t0 + min64(t, nt - 1);
        a[t] = act_row(tt);
        as[t] = asum ? asum + tt * G : nullptr;
      }
      const int64_t nr = it.r1 - it.r0;
      for (int64_t c0 = 0; c0 < nr; c0 += chunk) {
        const int64_t c1 = min64(nr, c0 + chunk);
        const int64_t r0 = it.r0 + c0, r1 = it.r0 + c1;
        switch (padded_tokens(nt)) {
          case 1: decode_rows<1>(e, r0, r1, a, as, sbuf, szbuf, res); break;
          case 2: decode_rows<2>(e, r0, r1, a, as, sbuf, szbuf, res); break;
          case 4: decode_rows<4>(e, r0, r1, a, as, sbuf, szbuf, res); break;
          default: decode_rows<8>(e, r0, r1, a, as, sbuf, szbuf, res); break;
        }
        for (int64_t t = 0; t < nt; ++t) store_act<Act>(res + t * (r1 - r0), out + (t0 + t) * N + r0, r1 - r0);
      }
    };
    parallel(plan.n_items, body);
    return true;
  }

  // asum only (bf16 activations used in place).
  void prep_asum_only(int64_t t) {
    if constexpr (Enc::kAsym) {
      const uint16_t* src = act + t * K;
      float* as = asum + t * G;
      for (int64_t g = 0; g < G; ++g) {
        V s = _mm512_setzero_ps();
        for (int64_t k = g * p.group_size; k < (g + 1) * p.group_size; k += 16)
          s = _mm512_add_ps(s, half_to_f32<Act>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k))));
        as[g] = _mm512_reduce_add_ps(s);
      }
    }
  }
};

}  // namespace

bool run_avx512(const MoeGemmParams& p, Phase /*phase*/) {
  float values[256];
  code_values(p.act_type, p.weight_type, p.asym, values);
  bool handled = false;
  visit_encoding(p.act_type, p.weight_type, p.asym, [&](auto act, auto enc) {
    Runner<decltype(act), decltype(enc)> runner(p, values);
    handled = runner.run();
  });
  return handled;
}

}  // namespace qmoe::cpu::simd
