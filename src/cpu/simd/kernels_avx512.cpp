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
#include <utility>

#include "cpu/simd/driver.h"
#include "cpu/simd/tables.h"

#include <cstdlib>

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

// f(integral_constant<int, 0>) ... f(integral_constant<int, N - 1>).
template <class F, int... I>
inline void static_for_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, class F>
inline void static_for(F&& f) {
  static_for_impl(f, std::make_integer_sequence<int, N>{});
}

// ---------------------------------------------------------------- decoders
// Dec<Enc>::codes(p, v): kUnit weights (kBytes packed bytes at p) -> kVecs
// zmm of 32 bf16 words each, exact: word i of vector f stands for
// value(code of the weight at k = kVecs * i + f of the unit) + kOffset.
// The activations are prepared in the same order (permute_unit below), and
// kOffset comes back out through the per-group activation sums.
template <class Enc, class = void>
struct Dec;

// int8: bytes -> int32 -> fp32 -> bf16 (0..255 or -128..127 are exact).
template <bool Asym>
struct Dec<IntEncoding<8, Asym>, void> {
  static constexpr int kUnit = 32, kBytes = 32, kVecs = 1;
  static constexpr float kOffset = 0.0f;
  explicit Dec(const float*) {}
  VI raw(const uint8_t* p) const {  // one 32-byte load (L1 loads are the scarce port)
    const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m128i y0 = _mm256_castsi256_si128(y), y1 = _mm256_extracti128_si256(y, 1);
    VI lo, hi;
    if constexpr (Asym) {  // the trait: asym codes are unsigned bytes
      lo = _mm512_cvtepu8_epi32(y0);
      hi = _mm512_cvtepu8_epi32(y1);
    } else {  // sym codes are two's complement
      lo = _mm512_cvtepi8_epi32(y0);
      hi = _mm512_cvtepi8_epi32(y1);
    }
    return (VI)_mm512_cvtne2ps_pbh(_mm512_cvtepi32_ps(hi), _mm512_cvtepi32_ps(lo));
  }
  VI vec(VI raw, int) const { return raw; }
};

// int4 / int2, no shuffles: 64 bytes are 32 words; field f of word i (bits
// f*Bits..) is the weight at k = kVecs * i + f. bf16 0x4300 is 128.0 with a
// mantissa step of 1, so (field | 0x4300) is exactly 128 + u, u the field
// read as unsigned; sym codes are two's complement, so u = code ^ half and
// value = u - half (the trait's kQmin). kOffset = 128 - kQmin.
template <int Bits, bool Asym>
struct Dec<IntEncoding<Bits, Asym>, std::enable_if_t<(Bits < 8)>> {
  using Enc = IntEncoding<Bits, Asym>;
  static constexpr int kVecs = 16 / Bits, kUnit = 32 * kVecs, kBytes = 64;
  static constexpr float kOffset = 128.0f - float(Enc::kQmin);
  explicit Dec(const float*) {}
  VI raw(const uint8_t* p) const {
    VI x = loadu(p);
    if constexpr (!Asym) {  // flip the sign bit of every field
      constexpr int kHalf = 1 << (Bits - 1);
      int pattern = 0;
      for (int f = 0; f < 16 / Bits; ++f) pattern |= kHalf << (f * Bits);
      x = _mm512_xor_si512(x, _mm512_set1_epi16(int16_t(pattern)));
    }
    return x;
  }
  VI vec(VI x, int f) const {  // ((x >> f*Bits) & mask) | 0x4300
    const VI mask = _mm512_set1_epi16(int16_t(Enc::kMask)), one28 = _mm512_set1_epi16(0x4300);
    if (f == 0) return _mm512_ternarylogic_epi32(x, mask, one28, 0xEA);
    return _mm512_ternarylogic_epi32(_mm512_srli_epi16(x, unsigned(f * Bits)), mask, one28, 0xEA);
  }
};

// fp8: 64 bytes are 32 words (low byte: k = 2i, high byte: k = 2i + 1); the
// bf16 of each 7-bit magnitude comes from a 128-entry table built from the
// trait's values (two vpermt2w of 64 entries, picked by bit 6), then the
// sign bit. Exact for every code, subnormals, zero and NaN/inf included.
template <class Fmt, WeightType W>
struct Dec<Fp8Encoding<Fmt, W>, void> {
  static constexpr int kUnit = 64, kBytes = 64, kVecs = 2;
  static constexpr float kOffset = 0.0f;
  VI t0, t1, t2, t3;
  explicit Dec(const float* values) {
    t0 = bf16_table(values);
    t1 = bf16_table(values + 32);
    t2 = bf16_table(values + 64);
    t3 = bf16_table(values + 96);
  }
  VI mag(VI idx) const {  // bf16 of magnitude (idx & 127), idx bit 6 picks the half
    const VI lo = _mm512_permutex2var_epi16(t0, idx, t1);
    const VI hi = _mm512_permutex2var_epi16(t2, idx, t3);
    return _mm512_mask_blend_epi16(_mm512_test_epi16_mask(idx, _mm512_set1_epi16(0x40)), lo, hi);
  }
  VI raw(const uint8_t* p) const { return loadu(p); }
  VI vec(VI w, int f) const {  // r | (sign bit of the code)
    const VI sign = _mm512_set1_epi16(int16_t(0x8000));
    if (f == 0) return _mm512_ternarylogic_epi32(mag(w), _mm512_slli_epi16(w, 8), sign, 0xF8);
    return _mm512_ternarylogic_epi32(mag(_mm512_srli_epi16(w, 8)), w, sign, 0xF8);
  }
};

template <>
struct Dec<Native16Encoding<ActBF16>, void> {
  static constexpr int kUnit = 32, kBytes = 64, kVecs = 1;
  static constexpr float kOffset = 0.0f;
  explicit Dec(const float*) {}
  VI raw(const uint8_t* p) const { return loadu(p); }
  VI raw_tail(const uint8_t* p, int n) const {
    return _mm512_maskz_loadu_epi16(__mmask32((1ull << n) - 1), p);
  }
  VI vec(VI x, int) const { return x; }
};

// fp16 weights are not exact in bf16: this one has no codes(), only the f32
// path (vcvtph2ps).
template <>
struct Dec<Native16Encoding<ActF16>, void> {
  static constexpr int kUnit = 32, kBytes = 64, kVecs = 1;
  static constexpr float kOffset = 0.0f;
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
// Scales of G groups of a row as floats, and s * (offset + z) for the
// correction through the activation sums (when kCorr).
template <class Act, bool kAsym, bool kCorr>
void row_scales(const uint16_t* s, const uint16_t* z, int64_t G, float offset, float* sbuf,
                float* szbuf) {
  for (int64_t g = 0; g < G; g += 16) {
    const __mmask16 m = mask16(G - g);
    const V sv = half_to_f32<Act>(_mm256_maskz_loadu_epi16(m, s + g));
    _mm512_mask_storeu_ps(sbuf + g, m, sv);
    if constexpr (kCorr) {
      V zv = _mm512_set1_ps(offset);
      if constexpr (kAsym) zv = _mm512_add_ps(zv, half_to_f32<Act>(_mm256_maskz_loadu_epi16(m, z + g)));
      _mm512_mask_storeu_ps(szbuf + g, m, _mm512_mul_ps(sv, zv));
    }
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
// the order of Dec::codes: out_f[i] = x[kVecs * i + f].
template <int kVecs>
inline void permute_unit(const VI* x, VI* out) {
  if constexpr (kVecs == 1) {
    out[0] = x[0];
  } else {
    // Output word i comes from input pair (2 * kVecs * i) / 64 = i / (32 / kVecs)
    // of vectors; within the pair, from word (kVecs * i + f) % 64.
    constexpr int kPairs = kVecs / 2, kSpan = 32 / kPairs;  // output words per pair
    alignas(64) uint16_t idx[32];
    for (int f = 0; f < kVecs; ++f) {
      for (int i = 0; i < 32; ++i) idx[i] = uint16_t((kVecs * i + f) % 64);
      const VI ix = loadu(idx);
      VI r = _mm512_permutex2var_epi16(x[0], ix, x[1]);
      for (int q = 1; q < kPairs; ++q) {
        const __mmask32 m = __mmask32(((1ull << kSpan) - 1) << (q * kSpan));
        r = _mm512_mask_blend_epi16(m, r, _mm512_permutex2var_epi16(x[2 * q], ix, x[2 * q + 1]));
      }
      out[f] = r;
    }
  }
}

// acc (MR x 3 vectors) += packed activations [kd][MR] x panel [kd][48]:
// MR broadcasts and three panel vectors per step of K (a bf16 pair or one
// fp32), MR x 48 outputs in 3 * MR registers. With MR = 8 that is 11 loads
// per 24 vdpbf16ps / FMA, under the one 512-bit load per cycle the L1
// sustains next to two dot products per cycle.
template <bool kF32, int MR>
void prefill_micro(const uint32_t* pa, const uint32_t* pb, int64_t kd, V* c, bool first) {
  V acc[MR][3];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 3; ++j) acc[i][j] = first ? _mm512_setzero_ps() : c[3 * i + j];
  for (int64_t k = 0; k < kd; ++k) {
    const VI b0 = loadu(pb + k * 48), b1 = loadu(pb + k * 48 + 16), b2 = loadu(pb + k * 48 + 32);
    for (int i = 0; i < MR; ++i) {
      const VI a = _mm512_set1_epi32(int32_t(pa[k * MR + i]));
      if constexpr (kF32) {
        const V af = _mm512_castsi512_ps(a);
        acc[i][0] = _mm512_fmadd_ps(af, _mm512_castsi512_ps(b0), acc[i][0]);
        acc[i][1] = _mm512_fmadd_ps(af, _mm512_castsi512_ps(b1), acc[i][1]);
        acc[i][2] = _mm512_fmadd_ps(af, _mm512_castsi512_ps(b2), acc[i][2]);
      } else {
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], bh(b0), bh(a));
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], bh(b1), bh(a));
        acc[i][2] = _mm512_dpbf16_ps(acc[i][2], bh(b2), bh(a));
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 3; ++j) c[3 * i + j] = acc[i][j];
}

// Whether the products should compute with vdpbf16ps (two bf16 products
// per fp32 lane) or with fp32 FMA: on AMD Zen 4/5 the dot product does twice
// the FMA's work per cycle, on Intel Sapphire Rapids it runs at half the
// FMA's rate. Decides the decode of every encoding but fp16 weights, and the
// prefill of bf16 activations (fp16 activations always take FMA there).
// Measured once (two register-only loops, well under a millisecond);
// QMOE_CPU_DOT=bf16|fma overrides it (read on every call, for tests).
bool use_bf16_dot() {
  if (const char* env = std::getenv("QMOE_CPU_DOT")) {
    if (env[0] == 'b') return true;
    if (env[0] == 'f') return false;
  }
  static const bool dot = [] {
#define QMOE_C12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define QMOE_K12 __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), \
                                  "+v"(a6), "+v"(a7), "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11))
#define DECL(i) V a##i = _mm512_set1_ps(float(i));
    constexpr int kIters = 4096;
    double best_fma = 1e30, best_dot = 1e30;
    for (int rep = 0; rep < 3; ++rep) {
      {
        QMOE_C12(DECL)
        const V x = _mm512_set1_ps(0.5f);
        const int64_t t0 = now_ns();
        for (int it = 0; it < kIters; ++it) {
#define STEP(i) a##i = _mm512_fmadd_ps(a##i, x, x);
          QMOE_C12(STEP)
#undef STEP
          QMOE_K12;
        }
        const double dt = double(now_ns() - t0);
        best_fma = best_fma < dt ? best_fma : dt;
      }
      {
        QMOE_C12(DECL)
        const __m512bh x = bh(_mm512_set1_epi16(0x3f80));
        const int64_t t0 = now_ns();
        for (int it = 0; it < kIters; ++it) {
#define STEP(i) a##i = _mm512_dpbf16_ps(a##i, x, x);
          QMOE_C12(STEP)
#undef STEP
          QMOE_K12;
        }
        const double dt = double(now_ns() - t0);
        best_dot = best_dot < dt ? best_dot : dt;
      }
    }
#undef DECL
#undef QMOE_K12
#undef QMOE_C12
    // Same instruction count: the dot product does twice the flops.
    return 2.0 * best_fma > 1.3 * best_dot;
  }();
  return dot;
}

// ---------------------------------------------------------------- one call
enum class ActMode { bf16, hilo, f32, eo32 };  // prepared activation format

template <class Act, class Enc>
struct Runner {
  using D = Dec<Enc>;
  static constexpr bool kF16 = std::is_same_v<Act, ActF16>;
  static constexpr bool kNativeF16 = is_native_f16<Enc>();
  // Whether the dot needs sum_g s_g (kOffset + z_g) sum_{k in g} a_k taken off.
  static constexpr bool kCorr = Enc::kAsym || D::kOffset != 0.0f;
  // Decode rows between two output stores: kRowBudget / tokens (running
  // sums of 64 KB), so that few tokens stream long runs of rows.
  static constexpr int64_t kRowBudget = 1024;
  static constexpr int64_t kPrefetch = 8192;  // bytes ahead in the weight stream

  // Whether this level takes the call: a unit of packed weights must lie in
  // one group, or a group must cover whole fp32 lanes of the dot product.
  static bool takes(const MoeGemmParams& p) {
    if (!can_run(p, 1)) return false;
    if (!Enc::kScaled) return true;
    const int64_t gs = p.group_size;
    if (p.k % D::kUnit != 0) return false;
    return gs % D::kUnit == 0 || (D::kUnit % gs == 0 && gs % (2 * D::kVecs) == 0);
  }

  const MoeGemmParams& p;
  const D dec;
  int64_t N, K, Kp, G, gs, units, row_bytes;
  int64_t upb = 1, gpb = 1;  // units and groups per decode block
  VI idx_dot, idx_p0, idx_p1;  // lane -> group offset within a block / unit
  const uint8_t* w;
  const uint16_t* scales;
  const uint16_t* zeros;
  const uint16_t* act;
  uint16_t* out;
  Buf act_buf, asum_buf;
  int64_t stride = 0;     // bytes per prepared activation row
  int64_t sstride_ = 0;   // floats per scale buffer (G + slack)
  bool direct = false;    // bf16 activations used in place
  float* asum = nullptr;  // [T, G] sums of each group's activations (kCorr)

  Runner(const MoeGemmParams& params, const float* values)
      : p(params),
        dec(values),
        N(p.n),
        K(p.k),
        Kp(round_up(p.k, D::kUnit)),
        G(Enc::kScaled ? p.k / p.group_size : 1),
        gs(Enc::kScaled ? p.group_size : round_up(p.k, D::kUnit)),
        units(round_up(p.k, D::kUnit) / D::kUnit),
        row_bytes(qmoe::row_bytes<Enc>(p.k)),
        w(static_cast<const uint8_t*>(p.weights)),
        scales(static_cast<const uint16_t*>(p.scales)),
        zeros(static_cast<const uint16_t*>(p.zeros)),
        act(static_cast<const uint16_t*>(p.activations)),
        out(static_cast<uint16_t*>(p.out)) {
    if (gs >= D::kUnit) {
      upb = gs / D::kUnit;
    } else {
      gpb = D::kUnit / gs;
    }
    alignas(64) int32_t d[16], p0[16], p1[16];
    for (int l = 0; l < 16; ++l) {
      // fp32 lane l of a dot accumulates words 2l, 2l+1 (k = kVecs*2l + f ..).
      d[l] = gs >= D::kUnit ? 0 : int32_t(2 * D::kVecs * l / gs);
      p0[l] = gs >= D::kUnit ? 0 : int32_t(D::kVecs * l / gs);
      p1[l] = gs >= D::kUnit ? 0 : int32_t(D::kVecs * (l + 16) / gs);
    }
    idx_dot = _mm512_load_si512(d);
    idx_p0 = _mm512_load_si512(p0);
    idx_p1 = _mm512_load_si512(p1);
  }

  ActMode mode(bool decode_token) const {
    if (kNativeF16) return ActMode::f32;
    if (decode_token && dfma) return ActMode::eo32;
    if (!kF16) return ActMode::bf16;
    return decode_token ? ActMode::hilo : ActMode::f32;
  }
  const uint8_t* act_row(int64_t t) const {
    return direct ? reinterpret_cast<const uint8_t*>(act + t * K)
                  : act_buf.as<uint8_t>() + t * stride;
  }

  // ------------------------------------------------------------ activations
  void prep_token(int64_t t, ActMode m) { prep_token_into(t, m, act_buf.as<uint8_t>() + t * stride); }
  void prep_token_into(int64_t t, ActMode m, uint8_t* dst) const {
    const uint16_t* src = act + t * K;
    for (int64_t u = 0; u < units; ++u) {
      VI x[D::kVecs], y[D::kVecs];
      for (int j = 0; j < D::kVecs; ++j) {
        const int64_t k0 = u * D::kUnit + j * 32;
        x[j] = _mm512_maskz_loadu_epi16(mask32(K - k0), src + k0);
      }
      permute_unit<D::kVecs>(x, y);
      for (int j = 0; j < D::kVecs; ++j) {
        const int64_t o = u * D::kUnit + j * 32;
        if (m == ActMode::bf16) {
          _mm512_storeu_si512(reinterpret_cast<uint16_t*>(dst) + o, y[j]);
          continue;
        }
        if (m == ActMode::eo32) {  // fp32 of the even words, then of the odd words
          V ev, od;
          if constexpr (kF16) {
            ev = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(y[j]));
            od = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(y[j], 16)));
          } else {
            ev = _mm512_castsi512_ps(_mm512_slli_epi32(y[j], 16));
            od = _mm512_castsi512_ps(_mm512_and_si512(y[j], _mm512_set1_epi32(int(0xFFFF0000u))));
          }
          _mm512_storeu_ps(reinterpret_cast<float*>(dst) + o, ev);
          _mm512_storeu_ps(reinterpret_cast<float*>(dst) + o + 16, od);
          continue;
        }
        const V f0 = half_to_f32<Act>(_mm512_castsi512_si256(y[j]));
        const V f1 = half_to_f32<Act>(_mm512_extracti64x4_epi64(y[j], 1));
        if (m == ActMode::f32) {
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
    }
  }

  // Sum of each group's activations (fp32) of token t.
  void prep_asum(int64_t t) {
    const uint16_t* src = act + t * K;
    float* as = asum + t * G;
    for (int64_t g = 0; g < G; ++g) {
      V acc = _mm512_setzero_ps();
      for (int64_t k = g * gs; k < (g + 1) * gs; k += 16)
        acc = _mm512_add_ps(acc, half_to_f32<Act>(_mm256_maskz_loadu_epi16(mask16((g + 1) * gs - k), src + k)));
      as[g] = _mm512_reduce_add_ps(acc);
    }
  }

  // Scales (and zeros) of a row a few rows ahead: small strided streams
  // that the hardware prefetchers pick up late.
  void prefetch_scales(int64_t e, int64_t r, int64_t g0) const {
    if constexpr (Enc::kScaled) {
      _mm_prefetch(reinterpret_cast<const char*>(scales + (e * N + r) * G + g0), _MM_HINT_T0);
      if constexpr (Enc::kAsym)
        _mm_prefetch(reinterpret_cast<const char*>(zeros + (e * N + r) * G + g0), _MM_HINT_T0);
    }
  }

  void load_scales(int64_t e, int64_t r, int64_t g0, int64_t g1, float* sbuf, float* szbuf) const {
    if constexpr (Enc::kScaled)
      row_scales<Act, Enc::kAsym, kCorr>(scales + (e * N + r) * G + g0,
                                         Enc::kAsym ? zeros + (e * N + r) * G + g0 : nullptr, g1 - g0,
                                         D::kOffset, sbuf, szbuf);
  }

  // ------------------------------------------------------------ decode rows
  // Rows [r0, r1) of expert e for NT tokens (a[t]: prepared activations;
  // as[t]: per-group activation sums). K is walked in chunks whose
  // activations fit in L1 (16 KB), each chunk over all the rows, so the
  // activations are read from L1 while every weight byte is read once.
  // Per-row running sums live in totbuf between chunks; res gets [NT, nr].
  // Rows A and B over units [u0, u1) of a chunk, one scale fold per unit
  // (see decode_rows), running sums in totA / totB.
  int64_t unit_group(int64_t u) const { return gs >= D::kUnit ? u / upb : u * gpb; }

  // acc += w . a for 32 bf16 code words w against a token's prepared
  // activations at element offset eoff: vdpbf16ps on bf16 activations, or
  // (FMA) two fp32 FMAs on the even and odd words against fp32 activations
  // stored as [16 even | 16 odd] per 32 elements. lo(): the lo half of fp16
  // activations (dot mode only).
  template <bool FMA>
  V dot32(V acc, VI w, const uint8_t* a, int64_t eoff) const {
    if constexpr (FMA) {
      const float* p = reinterpret_cast<const float*>(a) + eoff;
      acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), _mm512_loadu_ps(p), acc);
      return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(int(0xFFFF0000u)))),
                             _mm512_loadu_ps(p + 16), acc);
    } else {
      return _mm512_dpbf16_ps(acc, bh(w), bh(loadu(a + eoff * 2)));
    }
  }
  V dot32lo(V acc, VI w, const uint8_t* a, int64_t eoff) const {
    return _mm512_dpbf16_ps(acc, bh(w), bh(loadu(a + 2 * Kp + eoff * 2)));
  }
  // Parts per code vector: hi and lo for fp16 activations in dot mode.
  template <bool FMA>
  static constexpr int kParts = (kF16 && !FMA) ? 2 : 1;

  template <int NT, bool FMA>
  void pair_tight(const uint8_t* wA, const uint8_t* wB, int64_t u0, int64_t u1, int64_t g0,
                  const uint8_t* const* a, const float* sA, const float* sB, V* totA, V* totB) const {
    constexpr int kCh = NT <= 2 ? 4 : 2;
    constexpr int kP = kParts<FMA>;
    constexpr int kQ = D::kVecs * kP;
    constexpr int kUsed = kQ < kCh ? kQ : kCh;
    V tA[NT], tB[NT];
    for (int t = 0; t < NT; ++t) tA[t] = totA[t], tB[t] = totB[t];
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t gi = unit_group(u) - g0;  // first group of the unit, in the chunk's scales
      _mm_prefetch(reinterpret_cast<const char*>(wA + u * D::kBytes) + kPrefetch, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wB + u * D::kBytes) + kPrefetch, _MM_HINT_T0);
      const VI xA = dec.raw(wA + u * D::kBytes), xB = dec.raw(wB + u * D::kBytes);
      V cA[kCh][NT], cB[kCh][NT];
#pragma GCC unroll 16
      for (int q = 0; q < kQ; ++q) {
        const int j = q / kP;
        const VI vA = dec.vec(xA, j), vB = dec.vec(xB, j);
        const int64_t eo = u * D::kUnit + j * 32;
        const int ch = q % kCh;
        for (int t = 0; t < NT; ++t) {
          const V zA = q < kCh ? _mm512_setzero_ps() : cA[ch][t];
          const V zB = q < kCh ? _mm512_setzero_ps() : cB[ch][t];
          if constexpr (FMA) {
            cA[ch][t] = dot32<true>(zA, vA, a[t], eo);
            cB[ch][t] = dot32<true>(zB, vB, a[t], eo);
          } else {
            const VI av = loadu(a[t] + eo * 2 + ((kP == 2 && q % 2) ? 2 * Kp : 0));
            cA[ch][t] = _mm512_dpbf16_ps(zA, bh(vA), bh(av));
            cB[ch][t] = _mm512_dpbf16_ps(zB, bh(vB), bh(av));
          }
        }
      }
      const V svA = _mm512_permutexvar_ps(idx_dot, _mm512_loadu_ps(sA + gi));
      const V svB = _mm512_permutexvar_ps(idx_dot, _mm512_loadu_ps(sB + gi));
      for (int t = 0; t < NT; ++t) {
        V dA = cA[0][t], dB = cB[0][t];
        if constexpr (kUsed > 1) dA = _mm512_add_ps(dA, cA[1][t]), dB = _mm512_add_ps(dB, cB[1][t]);
        if constexpr (kUsed > 2) {
          dA = _mm512_add_ps(dA, _mm512_add_ps(cA[2][t], cA[3][t]));
          dB = _mm512_add_ps(dB, _mm512_add_ps(cB[2][t], cB[3][t]));
        }
        tA[t] = _mm512_fmadd_ps(dA, svA, tA[t]);
        tB[t] = _mm512_fmadd_ps(dB, svB, tB[t]);
      }
    }
    for (int t = 0; t < NT; ++t) totA[t] = tA[t], totB[t] = tB[t];
  }

  template <int NT, bool FMA>
  void decode_rows(int64_t e, int64_t r0, int64_t r1, const uint8_t* const* a,
                   const float* const* as, float* sbuf, float* szbuf, float* res, V* totbuf) const {
    const int64_t nr = r1 - r0;
    const int64_t act_elem = ((kF16 || FMA) ? 4 : 2);
    const int64_t chunk_elems = max64(D::kUnit, (16 << 10) / (NT * act_elem));
    // Blocks of units summed before one scale (a group, or a unit holding
    // several groups); for 16-bit weights (no groups) a run of about a chunk.
    const int64_t full_units = Enc::kScaled ? units : K / D::kUnit;
    const int64_t bu = Enc::kScaled ? upb : max64(1, chunk_elems / D::kUnit);
    const int64_t nblocks = Enc::kScaled ? ceil_div(units, bu) : max64(1, ceil_div(units, bu));
    const int64_t bpc = max64(1, chunk_elems / (bu * D::kUnit));
    const bool tail = !Enc::kScaled && K % D::kUnit != 0;

    for (int64_t i = 0; i < nr * NT; ++i) totbuf[i] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nr * NT; ++i) res[i] = 0.0f;

    for (int64_t b0 = 0; b0 < nblocks; b0 += bpc) {
      const int64_t b1 = min64(nblocks, b0 + bpc);
      const int64_t g0 = b0 * gpb, g1 = min64(G, b1 * gpb);  // groups of this chunk
      // Rows in pairs (r0 + i, r0 + h + i): every activation vector loaded
      // feeds both rows (L1 loads, not the arithmetic, bound this loop), and
      // each half of the rows is one sequential stream for the prefetchers.
      int64_t h = 0;
      if constexpr (Enc::kScaled && NT <= 4)
        if (bu == 1 || NT <= 2) h = nr / 2;
      if constexpr (Enc::kScaled && NT <= 4)
        for (int64_t i = 0; i < h; ++i) {
          const int64_t rA = r0 + i, rB = r0 + h + i;
          float* sB = szbuf + sstride_;
          float* szB = sB + sstride_;
          prefetch_scales(e, rA + 8, g0);
          prefetch_scales(e, rB + 8, g0);
          load_scales(e, rA, g0, g1, sbuf, szbuf);
          load_scales(e, rB, g0, g1, sB, szB);
          pair_tight<NT, FMA>(w + (e * N + rA) * row_bytes, w + (e * N + rB) * row_bytes, b0 * bu,
                              min64(full_units, b1 * bu), g0, a, sbuf, sB, totbuf + (rA - r0) * NT,
                              totbuf + (rB - r0) * NT);
          if constexpr (kCorr)
            for (int t = 0; t < NT; ++t) {
              res[t * nr + (rA - r0)] -= dot_f32(szbuf, as[t] + g0, g1 - g0);
              res[t * nr + (rB - r0)] -= dot_f32(szB, as[t] + g0, g1 - g0);
            }
        }
      for (int64_t r = r0 + 2 * h; r < r1; ++r) {
        const uint8_t* wr = w + (e * N + r) * row_bytes;
        prefetch_scales(e, r + 8, g0);
        load_scales(e, r, g0, g1, sbuf, szbuf);
        V tot[NT];
        V* tb = totbuf + (r - r0) * NT;
        for (int t = 0; t < NT; ++t) tot[t] = tb[t];
        bool done = false;
        if constexpr (Enc::kScaled) if (bu == 1 || NT <= 2) {
          done = true;
          // One scale fold per unit (a group is one unit, or a unit holds
          // several groups on fp32 lanes, or few tokens): a tight loop.
          const int64_t ua = b0 * bu, ub = min64(full_units, b1 * bu);
          const uint8_t* wp = wr + ua * D::kBytes;
          for (int64_t u = ua; u < ub; ++u, wp += D::kBytes) {
            const float* sp = sbuf + (unit_group(u) - g0);
            _mm_prefetch(reinterpret_cast<const char*>(wp) + kPrefetch, _MM_HINT_T0);
            const VI x = dec.raw(wp);
            // Independent chains: 4 for few tokens (short dependency chains
            // keep the scheduler from filling up), else 2.
            constexpr int kCh = NT <= 2 ? 4 : 2;
            constexpr int kP = kParts<FMA>;
            V c[kCh][NT];
#pragma GCC unroll 16
            for (int q = 0; q < D::kVecs * kP; ++q) {
              const int j = q / kP;
              const VI v = dec.vec(x, j);
              const int64_t eo = u * D::kUnit + j * 32;
              const int ch = q % kCh;
              for (int t = 0; t < NT; ++t) {
                const V z = q < kCh ? _mm512_setzero_ps() : c[ch][t];
                c[ch][t] = (kP == 2 && q % 2) ? dot32lo(z, v, a[t], eo) : dot32<FMA>(z, v, a[t], eo);
              }
            }
            constexpr int kUsed = D::kVecs * kP < kCh ? D::kVecs * kP : kCh;
            const V sv = _mm512_permutexvar_ps(idx_dot, _mm512_loadu_ps(sp));
            for (int t = 0; t < NT; ++t) {
              V d = c[0][t];
              if constexpr (kUsed > 1) d = _mm512_add_ps(d, c[1][t]);
              if constexpr (kUsed > 2) d = _mm512_add_ps(d, _mm512_add_ps(c[2][t], c[3][t]));
              tot[t] = _mm512_fmadd_ps(d, sv, tot[t]);
            }
          }
        }
        if (!done)
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t u0 = b * bu, u1 = min64(full_units, u0 + bu);
          if constexpr (kNativeF16) {
            // fp16 weights: vcvtph2ps + FMA with fp32 activations.
            auto step = [&](V w0, V w1, int64_t k0) {
              for (int t = 0; t < NT; ++t) {
                const float* at = reinterpret_cast<const float*>(a[t]) + k0;
                tot[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(at), tot[t]);
                tot[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(at + 16), tot[t]);
              }
            };
            const __m256i* wp = reinterpret_cast<const __m256i*>(wr);
            for (int64_t u = u0; u < u1; ++u, _mm_prefetch(reinterpret_cast<const char*>(wp + 2 * u) + kPrefetch, _MM_HINT_T0))
              step(_mm512_cvtph_ps(_mm256_loadu_si256(wp + 2 * u)),
                   _mm512_cvtph_ps(_mm256_loadu_si256(wp + 2 * u + 1)), u * 32);
            if (tail && b == nblocks - 1) {
              const int64_t n = K % 32;
              const uint16_t* tp = reinterpret_cast<const uint16_t*>(wr) + full_units * 32;
              step(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask16(n), tp)),
                   _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask16(n - 16), tp + 16)), full_units * 32);
            }
          } else {
            // Two accumulator chains per token (vdpbf16ps has a 6-cycle
            // latency): units alternate between them (the lo half of fp16
            // activations goes to the other chain). Vectors are decoded one
            // at a time from the raw unit, so few registers are live.
            V acc0[NT], acc1[NT];
            for (int t = 0; t < NT; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
            int64_t u = u0;
            for (; u + 1 < u1; u += 2) {
              _mm_prefetch(reinterpret_cast<const char*>(wr + u * D::kBytes) + kPrefetch, _MM_HINT_T0);
              if constexpr (D::kBytes == 32)
                _mm_prefetch(reinterpret_cast<const char*>(wr + u * D::kBytes) + kPrefetch + 32, _MM_HINT_T0);
              else
                _mm_prefetch(reinterpret_cast<const char*>(wr + u * D::kBytes) + kPrefetch + 64, _MM_HINT_T0);
              const VI x0 = dec.raw(wr + u * D::kBytes), x1 = dec.raw(wr + (u + 1) * D::kBytes);
#pragma GCC unroll 8
              for (int j = 0; j < D::kVecs; ++j) {
                const VI v0 = dec.vec(x0, j), v1 = dec.vec(x1, j);
                const int64_t e0 = u * D::kUnit + j * 32, e1 = e0 + D::kUnit;  // elements
                for (int t = 0; t < NT; ++t) {
                  acc0[t] = dot32<FMA>(acc0[t], v0, a[t], e0);
                  acc1[t] = dot32<FMA>(acc1[t], v1, a[t], e1);
                  if constexpr (kParts<FMA> == 2) {
                    acc1[t] = dot32lo(acc1[t], v0, a[t], e0);
                    acc0[t] = dot32lo(acc0[t], v1, a[t], e1);
                  }
                }
              }
            }
            // One unit: vectors alternate between the chains (bf16), or the
            // hi and lo halves take one chain each (fp16).
            auto single = [&](VI x, int64_t uu) {
#pragma GCC unroll 8
              for (int j = 0; j < D::kVecs; ++j) {
                const VI v = dec.vec(x, j);
                const int64_t eo = uu * D::kUnit + j * 32;
                for (int t = 0; t < NT; ++t) {
                  if constexpr (kParts<FMA> == 2) {
                    acc0[t] = dot32<FMA>(acc0[t], v, a[t], eo);
                    acc1[t] = dot32lo(acc1[t], v, a[t], eo);
                  } else if (j % 2 == 0) {
                    acc0[t] = dot32<FMA>(acc0[t], v, a[t], eo);
                  } else {
                    acc1[t] = dot32<FMA>(acc1[t], v, a[t], eo);
                  }
                }
              }
            };
            if (u < u1) single(dec.raw(wr + u * D::kBytes), u);
            if constexpr (!Enc::kScaled) {
              if (tail && b == nblocks - 1)
                single(dec.raw_tail(wr + full_units * D::kBytes, int(K % D::kUnit)), full_units);
              for (int t = 0; t < NT; ++t) tot[t] = _mm512_add_ps(tot[t], _mm512_add_ps(acc0[t], acc1[t]));
            } else {
              // The block's scale per fp32 lane (one group, or lane groups).
              const V sv = _mm512_permutexvar_ps(idx_dot, _mm512_loadu_ps(sbuf + (b * gpb - g0)));
              for (int t = 0; t < NT; ++t)
                tot[t] = _mm512_fmadd_ps(_mm512_add_ps(acc0[t], acc1[t]), sv, tot[t]);
            }
          }
        }
        for (int t = 0; t < NT; ++t) tb[t] = tot[t];
        if constexpr (kCorr)  // - sum_g s_g (kOffset + z_g) sum_{k in g} a_k
          for (int t = 0; t < NT; ++t) res[t * nr + (r - r0)] -= dot_f32(szbuf, as[t] + g0, g1 - g0);
      }
    }
    for (int64_t r = 0; r < nr; ++r)
      for (int t = 0; t < NT; ++t) res[t * nr + r] += _mm512_reduce_add_ps(totbuf[r * NT + t]);
  }

  // ------------------------------------------------------------ prefill
  // Layouts (dwords: a bf16 pair for bf16 activations, an fp32 for fp16):
  //   packed activations of a prefill expert: blocks of MR tokens,
  //     [Kd][MR] dwords each (Kd = Kp / 2 or Kp), zero rows past the tokens;
  //   panel of an item: [kd][NR] dwords for NR = 48 rows over a K chunk,
  //     built by decoding 16 rows x one unit into a small buffer and
  //     transposing it 16 x 16 dwords at a time.
  // The micro-kernel keeps an MR x 48 tile in 24 registers and walks K with
  // one broadcast of activations (vpbroadcastd) per token and three panel
  // vectors per step: lanes run along N, so no horizontal sums.
  static constexpr int PMR = 8, PNR = 48;
  bool pf32 = kF16;        // prefill computes in fp32 (FMA), else bf16 pairs (vdpbf16ps)
  bool dfma = false;       // decode computes with fp32 FMA, else vdpbf16ps
  int64_t Kd = 0;         // dwords along K
  int64_t kc_dw = 0;      // dwords of K per panel chunk
  Buf pack_buf;
  Buf pack_off_buf;       // [E] byte offsets of each prefill expert's packed block

  static inline void transpose16(VI r[16]) {
    VI t[16];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
      r[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
      r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
      r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
      r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 4; ++i) {
      t[i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0x88);
      t[4 + i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0xdd);
      t[8 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0x88);
      t[12 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0xdd);
    }
    for (int i = 0; i < 4; ++i) {
      r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
      r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);
      r[4 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0x88);
      r[12 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0xdd);
    }
  }

  // Unit u of a row, dequantized, as kUnit / kElemPerDword dwords (in the
  // unit's permuted order, like the activations).
  template <bool F32>
  void unit_dwords(const uint8_t* wr, int64_t u, const float* sbuf, const float* szbuf,
                   uint32_t* dst) const {
    if constexpr (kNativeF16) {
      const uint16_t* s = reinterpret_cast<const uint16_t*>(wr) + u * 32;
      float* d = reinterpret_cast<float*>(dst);
      _mm512_storeu_ps(d, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask16(K - u * 32), s)));
      _mm512_storeu_ps(d + 16, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask16(K - u * 32 - 16), s + 16)));
    } else if constexpr (!Enc::kScaled) {  // bf16 weights
      const uint16_t* s = reinterpret_cast<const uint16_t*>(wr) + u * 32;
      const VI v = _mm512_maskz_loadu_epi16(mask32(K - u * 32), s);
      if constexpr (F32) {
        _mm512_storeu_ps(reinterpret_cast<float*>(dst), bf16_lo_f32(v));
        _mm512_storeu_ps(reinterpret_cast<float*>(dst) + 16, bf16_hi_f32(v));
      } else {
        _mm512_storeu_si512(dst, v);
      }
    } else {
      const int64_t g = gs >= D::kUnit ? u / (gs / D::kUnit) : u * (D::kUnit / gs);  // first group
      const V s0 = _mm512_permutexvar_ps(idx_p0, _mm512_loadu_ps(sbuf + g));
      const V s1 = _mm512_permutexvar_ps(idx_p1, _mm512_loadu_ps(sbuf + g));
      V z0 = _mm512_setzero_ps(), z1 = z0;
      if constexpr (kCorr) {
        z0 = _mm512_permutexvar_ps(idx_p0, _mm512_loadu_ps(szbuf + g));
        z1 = _mm512_permutexvar_ps(idx_p1, _mm512_loadu_ps(szbuf + g));
      }
      const VI x = dec.raw(wr + u * D::kBytes);
      for (int j = 0; j < D::kVecs; ++j) {
        const VI v = dec.vec(x, j);
        // (value + kOffset) * s - s * (kOffset + z) = (value - z) * s
        const V f0 = _mm512_fmsub_ps(bf16_lo_f32(v), s0, z0);
        const V f1 = _mm512_fmsub_ps(bf16_hi_f32(v), s1, z1);
        if constexpr (F32) {
          _mm512_storeu_ps(reinterpret_cast<float*>(dst) + j * 32, f0);
          _mm512_storeu_ps(reinterpret_cast<float*>(dst) + j * 32 + 16, f1);
        } else {
          _mm512_storeu_si512(dst + j * 16, (VI)_mm512_cvtne2ps_pbh(f1, f0));
        }
      }
    }
  }

  // Panel [kd][48] of rows r0.. (zero past r1) over K dwords [d0, d0 + kd).
  template <bool F32>
  void fill_panel(int64_t e, int64_t r0, int64_t r1, int64_t d0, int64_t kd, uint32_t* panel,
                  uint32_t* tmp, float* srow, int64_t sstride) const {
    constexpr int64_t ud = D::kUnit / (F32 ? 1 : 2);  // dwords per unit
    const int64_t u0 = d0 / ud, u1 = (d0 + kd) / ud;
    for (int h = 0; h < PNR / 16; ++h) {
      const int64_t rb = r0 + 16 * h;
      for (int i = 0; i < 16; ++i)
        if (rb + i < r1) load_scales(e, rb + i, 0, G, srow + i * 2 * sstride, srow + (i * 2 + 1) * sstride);
      for (int64_t u = u0; u < u1; ++u) {
        for (int i = 0; i < 16; ++i) {
          uint32_t* t = tmp + i * ud;
          if (rb + i < r1) {
            unit_dwords<F32>(w + (e * N + rb + i) * row_bytes, u, srow + i * 2 * sstride,
                        srow + (i * 2 + 1) * sstride, t);
          } else {
            for (int64_t c = 0; c < ud; c += 16) _mm512_storeu_si512(t + c, _mm512_setzero_si512());
          }
        }
        for (int64_t c = 0; c < ud; c += 16) {
          VI r[16];
          for (int i = 0; i < 16; ++i) r[i] = loadu(tmp + i * ud + c);
          transpose16(r);
          uint32_t* dst = panel + ((u - u0) * ud + c) * PNR + 16 * h;
          for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + i * PNR, r[i]);
        }
      }
    }
  }

  // Tokens of a prefill expert come in blocks of PMR = 8, the last block of
  // round_up(rest, 4) tokens (4 or 8), each block [Kd][rows] dwords.
  static int64_t block_rows(int64_t nt, int64_t b) {
    const int64_t rest = nt - b * PMR;
    return rest >= PMR ? PMR : round_up(rest, 4);
  }

  template <bool F32>
  void prefill_item(const Plan& plan, int64_t e, int64_t r0, int64_t r1, uint32_t* panel,
                    uint32_t* tmp, float* srow, int64_t sstride, V* cbuf) const {
    const int64_t t0 = plan.offsets[e], nt = plan.tokens(e);
    const int64_t nblk = ceil_div(nt, PMR);
    const uint32_t* pack =
        reinterpret_cast<const uint32_t*>(pack_buf.as<uint8_t>() + pack_off_buf.as<int64_t>()[e]);
    alignas(64) float outv[PNR];
    for (int64_t d0 = 0; d0 < Kd; d0 += kc_dw) {
      const int64_t kd = min64(kc_dw, Kd - d0);
      fill_panel<F32>(e, r0, r1, d0, kd, panel, tmp, srow, sstride);
      const bool first = d0 == 0, last = d0 + kd >= Kd;
      for (int64_t b = 0; b < nblk; ++b) {
        V* c = cbuf + (Kd > kc_dw ? b * PMR * 3 : 0);  // one tile unless K takes chunks
        const int64_t rows = block_rows(nt, b);
        const uint32_t* pa = pack + b * PMR * Kd + d0 * rows;
        if (rows == PMR) prefill_micro<F32, PMR>(pa, panel, kd, c, first);
        else prefill_micro<F32, 4>(pa, panel, kd, c, first);
        if (!last) continue;
        const int64_t mr = min64(PMR, nt - b * PMR);
        for (int64_t i = 0; i < mr; ++i) {
          for (int j = 0; j < 3; ++j) _mm512_store_ps(outv + 16 * j, c[3 * i + j]);
          store_act<Act>(outv, out + (t0 + b * PMR + i) * N + r0, r1 - r0);
        }
      }
    }
  }

  // Token t (slot i of a block of `rows` tokens) into the packed layout.
  template <bool F32>
  void pack_token(int64_t t, uint32_t* blk, int64_t rows, int64_t i, uint8_t* row) const {
    const uint32_t* src;
    if (!F32 && D::kVecs == 1 && K % 32 == 0) {
      src = reinterpret_cast<const uint32_t*>(act + t * K);  // already in order
    } else {
      prep_token_into(t, F32 ? ActMode::f32 : ActMode::bf16, row);
      src = reinterpret_cast<const uint32_t*>(row);
    }
    for (int64_t k = 0; k < Kd; ++k) blk[k * rows + i] = src[k];
  }

  // ------------------------------------------------------------ driver
  bool run() {
    if (!takes(p)) return false;
    const int64_t T = p.total_tokens;
    if (T == 0) return true;
    const int threads = pool_size();
    Plan plan(p, row_bytes, PNR, threads);
    pf32 = kF16 || !use_bf16_dot();
    dfma = !kNativeF16 && !use_bf16_dot();
    Kd = pf32 ? Kp : Kp / 2;
    kc_dw = min64(Kd, 2048);

    // Decode tokens: prepared rows (bf16 activations in place when no
    // permutation or padding is needed) and per-group sums.
    direct = !kF16 && !dfma && D::kVecs == 1 && K % 32 == 0;
    if (!direct && plan.decode_tokens > 0) {
      stride = Kp * ((kF16 || dfma) ? 4 : 2);
      act_buf.alloc(size_t(T * stride));
    }
    const bool need_asum = kCorr && plan.decode_tokens > 0;
    if (need_asum) {
      asum_buf.alloc(size_t(T * G * 4));
      asum = asum_buf.as<float>();
    }
    // Prefill tokens: packed blocks of PMR tokens per expert.
    int64_t max_blocks = 0;
    if (plan.prefill_tokens > 0) {
      pack_off_buf.alloc(size_t(8 * plan.E));
      int64_t* off = pack_off_buf.as<int64_t>();
      int64_t bytes = 0;
      for (int64_t e = 0; e < plan.E; ++e) {
        off[e] = bytes;
        const int64_t nt = plan.tokens(e);
        if (nt > kDecodeMaxTokens) {
          bytes += ceil_div(nt, PMR) * PMR * Kd * 4;
          max_blocks = max64(max_blocks, ceil_div(nt, PMR));
        }
      }
      pack_buf.alloc(size_t(bytes));
      for (int64_t e = 0; e < plan.E; ++e) {  // zero the padding slots of the last block
        const int64_t nt = plan.tokens(e);
        if (nt > kDecodeMaxTokens && nt % 4)  // padding slots of the last block
          std::memset(pack_buf.as<uint8_t>() + off[e] + (nt / PMR) * PMR * Kd * 4, 0,
                      size_t(block_rows(nt, nt / PMR) * Kd * 4));
      }
    }
    {
      auto prep = [&](int64_t b, int) {
        Buf row(size_t(Kp * 4));
        int64_t e = 0;
        for (int64_t t = b * 16; t < min64(T, (b + 1) * 16); ++t) {
          while (plan.offsets[e + 1] <= t) ++e;
          if (plan.is_decode_expert(e)) {
            if (!direct) prep_token(t, mode(true));
            if (need_asum) prep_asum(t);
          } else {
            const int64_t i = t - plan.offsets[e];
            uint32_t* blk = reinterpret_cast<uint32_t*>(pack_buf.as<uint8_t>() + pack_off_buf.as<int64_t>()[e]) +
                            (i / PMR) * PMR * Kd;
            if (pf32)
              pack_token<true>(t, blk, block_rows(plan.tokens(e), i / PMR), i % PMR, row.as<uint8_t>());
            else if constexpr (!kF16)
              pack_token<false>(t, blk, block_rows(plan.tokens(e), i / PMR), i % PMR, row.as<uint8_t>());
          }
        }
      };
      parallel(ceil_div(T, 16), prep);
    }

    // Per-worker scratch. Decode: running sums, scales (+16 floats of slack
    // for full-vector loads), outputs. Prefill: panel, unit buffer, scales
    // of 16 rows, running tiles when K takes several chunks.
    const int64_t res_elems = kRowBudget;  // rows x tokens <= kRowBudget
    const int64_t tot_bytes = kRowBudget * 64;
    const int64_t sc_elems = round_up(G + 16, 16);
    sstride_ = sc_elems;
    // scales and s*(offset+z) of two rows: sbuf, szbuf, then [s, sz] of row B
    const int64_t small = round_up((4 * sc_elems + res_elems) * 4, 64);
    int64_t pre_bytes = 0, panel_bytes = 0, tmp_bytes = 0, srow_bytes = 0;
    if (plan.prefill_tokens > 0) {
      panel_bytes = kc_dw * PNR * 4;
      tmp_bytes = 16 * (pf32 ? D::kUnit : D::kUnit / 2) * 4;
      srow_bytes = 2 * 16 * sc_elems * 4;
      pre_bytes = panel_bytes + tmp_bytes + srow_bytes + (Kd > kc_dw ? max_blocks * PMR * 3 * 64 : PMR * 3 * 64);
    }
    const int64_t per = tot_bytes + small + round_up(pre_bytes, 64);
    Buf scratch(size_t(per * threads));

    auto body = [&](int64_t i, int wk) {
      const Item& it = plan.items[i];
      uint8_t* s = scratch.as<uint8_t>() + wk * per;
      V* totbuf = reinterpret_cast<V*>(s);
      float* sbuf = reinterpret_cast<float*>(s + tot_bytes);
      float* szbuf = sbuf + sc_elems;
      float* res = szbuf + 3 * sc_elems;
      const int64_t e = it.expert, t0 = plan.offsets[e], nt = plan.tokens(e);
      if (!it.decode) {
        uint8_t* q = s + tot_bytes + small;
        uint32_t* panel = reinterpret_cast<uint32_t*>(q);
        uint32_t* tmp = reinterpret_cast<uint32_t*>(q + panel_bytes);
        float* srow = reinterpret_cast<float*>(q + panel_bytes + tmp_bytes);
        V* cbuf = reinterpret_cast<V*>(q + panel_bytes + tmp_bytes + srow_bytes);
        if (pf32)
          prefill_item<true>(plan, e, it.r0, it.r1, panel, tmp, srow, sc_elems, cbuf);
        else if constexpr (!kF16)
          prefill_item<false>(plan, e, it.r0, it.r1, panel, tmp, srow, sc_elems, cbuf);
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
      const int64_t chunk = kRowBudget / padded_tokens(nt);
      for (int64_t c0 = 0; c0 < nr; c0 += chunk) {
        const int64_t r0 = it.r0 + c0, r1 = it.r0 + min64(nr, c0 + chunk);
        switch (padded_tokens(nt)) {
          case 1: dfma ? decode_rows<1, true>(e, r0, r1, a, as, sbuf, szbuf, res, totbuf) : decode_rows<1, false>(e, r0, r1, a, as, sbuf, szbuf, res, totbuf); break;
          case 2: dfma ? decode_rows<2, true>(e, r0, r1, a, as, sbuf, szbuf, res, totbuf) : decode_rows<2, false>(e, r0, r1, a, as, sbuf, szbuf, res, totbuf); break;
          case 4: dfma ? decode_rows<4, true>(e, r0, r1, a, as, sbuf, szbuf, res, totbuf) : decode_rows<4, false>(e, r0, r1, a, as, sbuf, szbuf, res, totbuf); break;
          default: dfma ? decode_rows<8, true>(e, r0, r1, a, as, sbuf, szbuf, res, totbuf) : decode_rows<8, false>(e, r0, r1, a, as, sbuf, szbuf, res, totbuf); break;
        }
        for (int64_t t = 0; t < nt; ++t) store_act<Act>(res + t * (r1 - r0), out + (t0 + t) * N + r0, r1 - r0);
      }
    };
    parallel(plan.n_items, body);
    return true;
  }
};

}  // namespace

bool avx512_uses_bf16_dot() { return use_bf16_dot(); }

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
