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
// Where vpdpwssd issues much faster than vdpbf16ps (Intel), int8 / int4 /
// int2 codes go in as int16 words against the activations rounded to int16
// on a scale per (token, group) instead (kDotI16: exact int32 sums a group).
//
// Prefill (> 8 tokens): a block of rows is dequantized once into a panel in
// L2 — bf16 for bf16 activations (the weights then round to bf16, as in
// PyTorch's bf16 product), fp32 for fp16 activations (fp16 does not survive
// a bf16 round trip within the 2e-3 tolerance) — and every token of the
// expert runs against it in 8-token x 48-row register tiles (vdpbf16ps or
// FMA); the next panel's packed weights are prefetched into L2 meanwhile.
// bf16 weights with bf16 activations take the roles swapped instead (no
// panel: weight rows broadcast in place against packed token blocks; see
// prefill_item_t). Where the CPU has AMX (amx_ready), the prefill takes the
// bf16 panels on the tile unit instead (prefill_item_amx): 16 tokens x 48
// rows a step, TDPBF16PS; fp16 activations (from 24 tokens an expert) as
// bf16 hi + lo halves against the weights' hi and lo panels.
#include <immintrin.h>

// GCC 12 warns about the deliberately undefined upper halves in its own
// AVX-512 headers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <type_traits>
#include <utility>

#include "cpu/simd/driver.h"
#include "cpu/simd/tables.h"

#include <cstdlib>

#if defined(QMOE_AMX)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace qmoe::cpu::simd {
namespace {

using V = __m512;
using VI = __m512i;

inline __m512bh bh(VI x) { return (__m512bh)x; }
inline VI loadu(const void* p) { return _mm512_loadu_si512(p); }
inline __mmask64 mask64(int64_t n) { return n >= 64 ? ~__mmask64(0) : n <= 0 ? __mmask64(0) : (__mmask64(1) << n) - 1; }

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
// (A split decode, each weight as two exact bf16 words: the low 7 bits in
// a mantissa, the top bit in an exponent bit, vpmovzxbw + 2 vpternlogd + 2
// dot products a 32-weight unit, ran the 1-token decode 75% faster from L2
// on one Zen 5 core but 10-15% slower from DRAM on the Mixtral b1 rows,
// interleaved, over three sessions: not kept.)
template <bool Asym>
struct Dec<IntEncoding<8, Asym>, void> {
  static constexpr int kUnit = 32, kBytes = 32, kVecs = 1;
  static constexpr float kOffset = 0.0f;
  static constexpr int kChains1 = 2;  // accumulator chains of the 1-token decode (see kChains)
  explicit Dec(const float*) {}
  VI raw(const uint8_t* p, bool = false) const {  // one 32-byte load (L1 loads are the scarce port)
    return conv(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  VI raw_part(const uint8_t* p, int64_t n, bool = false) const {
    return conv(_mm256_maskz_loadu_epi8(__mmask32((1ull << n) - 1), p));
  }
  static VI conv(__m256i y) {
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
  VI vec(VI raw, int, bool = false) const { return raw; }
  // The integer decode (Runner's kDotI16): the codes as int16 words (the
  // value itself: sym sign-extended, asym zero-extended).
  static constexpr bool kHasI16 = true;
  static constexpr int kI16Max = Asym ? 255 : 128;  // largest |word|
  static constexpr int kI16MaxTokens = 1;           // (Runner::run)
  static constexpr float kI16Offset = 0.0f;          // word = value + kI16Offset
  VI raw16(const uint8_t* p) const { return conv16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  VI raw16_part(const uint8_t* p, int64_t n) const {
    return conv16(_mm256_maskz_loadu_epi8(__mmask32((1ull << n) - 1), p));
  }
  static VI conv16(__m256i y) { return Asym ? _mm512_cvtepu8_epi16(y) : _mm512_cvtepi8_epi16(y); }
  VI field16(VI x, int) const { return x; }
};

// int4 / int2, no shuffles: 64 bytes are 32 words; field f of word i (bits
// f*Bits..) is the weight at k = kVecs * i + f. A bf16 word with exponent
// 2^e and a field (read as unsigned u) in its mantissa bits sh.. is exactly
// 2^e + u * 2^(e - 7 + sh); with 2^e = 128 >> sh that is (128 >> sh) + u.
// Narrow decode (vec(x, f)): every field shifted to bit 0 (a shift and a
// vpternlogd a field). Wide decode (vec(x, f, true), int2 only): bf16's 7
// mantissa bits hold kWin = 7 / Bits = 3 fields in place (those at bits 0,
// 2, 4), so a vector is one vpternlogd of x, x >> 6 or x >> 12: 2 shifts a
// unit instead of 7. The wide decode's four constants (three field masks |
// exponents, kHigh) cost registers, so only the 1-token decode, short of
// vector ALU slots but not of registers, takes it (2 tokens measured 10%
// slower with it). vpternlogd: c & (y | kHigh), c = field mask | exponent
// bits, kHigh = the bits above the window. Sym codes are two's complement,
// so u = code ^ half (narrow: the sign bit flipped by the same vpternlogd,
// see sel(); wide: one vpxord a unit in raw()) and value = u - half (the
// trait's kQmin). Word = value + kOffset (+ delta(f) when wide), kOffset =
// 128 - kQmin, delta(f) = (128 >> sh) - 128: both come back out through the
// per-group activation sums (delta's weighted by the element's vector).
template <int Bits, bool Asym>
struct Dec<IntEncoding<Bits, Asym>, std::enable_if_t<(Bits < 8)>> {
  using Enc = IntEncoding<Bits, Asym>;
  static constexpr int kVecs = 16 / Bits, kUnit = 32 * kVecs, kBytes = 64;
  static constexpr int kWin = 7 / Bits;  // fields a mantissa holds in place
  static constexpr int kHigh = 0xFFC0;   // every exponent bit used below, no field bit
  static constexpr float kOffset = 128.0f - float(Enc::kQmin);
  static constexpr bool kVarOffset = kWin > 1;  // whether a wide decode exists
  static constexpr float delta(int f) { return float(128 >> (f % kWin * Bits)) - 128.0f; }
  static constexpr int kChains1 = Bits == 2 ? 2 : 1;
  explicit Dec(const float*) {}
  VI raw(const uint8_t* p, bool wide = false) const { return flip(loadu(p), wide); }
  VI raw_part(const uint8_t* p, int64_t n, bool wide = false) const {
    return flip(_mm512_maskz_loadu_epi8(mask64(n), p), wide);
  }
  static VI flip(VI x, bool wide) {
    if (!Asym && kVarOffset && wide) {  // the wide decode flips every field's sign bit here
      int pattern = 0;
      for (int f = 0; f < 16 / Bits; ++f) pattern |= (1 << (Bits - 1)) << (f * Bits);
      return _mm512_xor_si512(x, _mm512_set1_epi16(int16_t(pattern)));
    }
    // Keep the loaded bytes in a register (else GCC folds the load into
    // each use: several loads a unit, load-port bound).
    __asm__("" : "+v"(x));
    return x;
  }
  // Sym codes: the field's sign bit is flipped inside the vpternlogd that
  // places it, with two constants: per bit, (A, B) = (1, 1) gives 1
  // (exponent bits), (1, 0) the bit of y (field bits below the sign),
  // (0, 1) its complement (the sign bit), (0, 0) zero (other fields).
  static VI sel(VI y, int lo, int sign, int e) {  // imm 0xCA: (A & B) | (A & y) | (B & ~y & ~A)
    return _mm512_ternarylogic_epi32(y, _mm512_set1_epi16(int16_t(e | lo)), _mm512_set1_epi16(int16_t(e | sign)),
                                     0xCA);
  }
  // The integer decode (Runner's kDotI16): field f of every word as an
  // int16, the code read as unsigned (sym: its sign bit flipped, u = code +
  // half), so word = value - kQmin.
  static constexpr bool kHasI16 = true;
  static constexpr int kI16Max = int(Enc::kMask);
  static constexpr int kI16MaxTokens = 0;  // (Runner::run: only where forced)
  static constexpr float kI16Offset = float(-Enc::kQmin);
  VI raw16(const uint8_t* p) const { return raw(p); }
  VI raw16_part(const uint8_t* p, int64_t n) const { return raw_part(p, n); }
  VI field16(VI x, int f) const {
    const VI y = f == 0 ? x : _mm512_srli_epi16(x, unsigned(f * Bits));
    if constexpr (Asym) return _mm512_and_si512(y, _mm512_set1_epi16(int16_t(Enc::kMask)));
    return _mm512_ternarylogic_epi32(y, _mm512_set1_epi16(int16_t(Enc::kMask)),
                                     _mm512_set1_epi16(int16_t(1 << (Bits - 1))), 0x6A);  // (y & mask) ^ half
  }
  VI vec(VI x, int f, bool wide = false) const {
    constexpr int kHalf = 1 << (Bits - 1);
    const VI one28 = _mm512_set1_epi16(0x4300);
    if (!(kVarOffset && wide)) {  // ((x >> f*Bits) & mask) | 0x4300
      const VI y = f == 0 ? x : _mm512_srli_epi16(x, unsigned(f * Bits));
      if constexpr (!Asym) return sel(y, kHalf - 1, kHalf, 0x4300);
      return _mm512_ternarylogic_epi32(y, _mm512_set1_epi16(int16_t(Enc::kMask)), one28, 0xEA);
    }
    const int win = f / kWin, sh = f % kWin * Bits;
    const int e = 0x4300 - (sh << 7);  // exponent: the field's lowest bit weighs 1
    const VI y = win == 0 ? x : _mm512_srli_epi16(x, unsigned(win * kWin * Bits));
    // (sym: flipped by raw(); sel() here measured 4% slower: 2 constants a
    // field position, 6 in all, against a unit's one vpxord)
    const VI c = _mm512_set1_epi16(int16_t((Enc::kMask << sh) | e));
    return _mm512_ternarylogic_epi32(y, c, _mm512_set1_epi16(int16_t(kHigh)), 0xC8);  // c & (y | kHigh)
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
  static constexpr int kChains1 = 1;
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
  VI raw(const uint8_t* p, bool = false) const { return loadu(p); }
  VI raw_part(const uint8_t* p, int64_t n, bool = false) const { return _mm512_maskz_loadu_epi8(mask64(n), p); }
  VI vec(VI w, int f, bool = false) const {  // r | (sign bit of the code)
    const VI sign = _mm512_set1_epi16(int16_t(0x8000));
    if (f == 0) return _mm512_ternarylogic_epi32(mag(w), _mm512_slli_epi16(w, 8), sign, 0xF8);
    return _mm512_ternarylogic_epi32(mag(_mm512_srli_epi16(w, 8)), w, sign, 0xF8);
  }
};

template <>
struct Dec<Native16Encoding<ActBF16>, void> {
  static constexpr int kUnit = 32, kBytes = 64, kVecs = 1;
  static constexpr float kOffset = 0.0f;
  static constexpr int kChains1 = 2;
  explicit Dec(const float*) {}
  VI raw(const uint8_t* p, bool = false) const { return loadu(p); }
  VI raw_part(const uint8_t* p, int64_t n, bool = false) const { return _mm512_maskz_loadu_epi8(mask64(n), p); }
  VI vec(VI x, int, bool = false) const { return x; }
};

// fp16 weights are not exact in bf16: raw halves, converted by vcvtph2ps
// and multiplied with FMA (no vec()).
template <>
struct Dec<Native16Encoding<ActF16>, void> {
  static constexpr int kUnit = 32, kBytes = 64, kVecs = 1;
  static constexpr float kOffset = 0.0f;
  static constexpr int kChains1 = 1;
  explicit Dec(const float*) {}
  VI raw(const uint8_t* p, bool = false) const { return loadu(p); }
  VI raw_part(const uint8_t* p, int64_t n, bool = false) const { return _mm512_maskz_loadu_epi8(mask64(n), p); }
};

// Fp8 encodings (Enc::format: their fp8 format) get their own prefill panel fill.
template <class Enc>
constexpr bool kIsFp8 = Enc::kType == WeightType::fp8_e4m3 || Enc::kType == WeightType::fp8_e5m2;

// Whether Dec's words carry a per-vector offset delta(f) on top of kOffset.
template <class D, class = void>
struct VarOff : std::false_type {};
template <class D>
struct VarOff<D, std::enable_if_t<D::kVarOffset>> : std::true_type {};
// Whether Dec has the integer decode (raw16 / field16: int8, int4, int2).
template <class D, class = void>
struct HasI16 : std::false_type {};
template <class D>
struct HasI16<D, std::enable_if_t<D::kHasI16>> : std::true_type {};

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
  // Zero slack: the lanes of a partial last unit read up to 16 groups past G
  // (times zero activations, which must not meet a NaN).
  _mm512_storeu_ps(sbuf + G, _mm512_setzero_ps());
  if constexpr (kCorr) _mm512_storeu_ps(szbuf + G, _mm512_setzero_ps());
}

// out[j] = the sum of the 16 lanes of v[j], j < 16: a transpose-and-add tree
// (45 operations, where 16 separate reductions take ~128).
inline void reduce16(const V* v, float* out) {
  V t[8], u[4];
  for (int k = 0; k < 8; ++k)  // a 128-bit block: [a0+a2, b0+b2, a1+a3, b1+b3]
    t[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {  // a 128-bit block: that block's sums of v[4k..4k+3]
    const __m512d a = _mm512_castps_pd(t[2 * k]), b = _mm512_castps_pd(t[2 * k + 1]);
    u[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const V w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const V w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD)));
}

inline float dot_f32(const float* a, const float* b, int64_t n) {
  V acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = mask16(n - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// a . b + c . d (n each), one reduction.
inline float dot2_f32(const float* a, const float* b, const float* c, const float* d, int64_t n) {
  V acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = mask16(n - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, c + i), _mm512_maskz_loadu_ps(m, d + i), acc);
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
// sustains next to two dot products per cycle. Activations: packed
// [kd][MR] dwords at pa, or (kRows) MR rows at ra[i], dword k of each.
template <bool kF32, int MR, bool kRows = false>
void prefill_micro(const uint32_t* pa, const uint32_t* const* ra, const uint32_t* pb, int64_t kd, V* c, bool first) {
  const uint32_t* r[MR];
  if constexpr (kRows)
    for (int i = 0; i < MR; ++i) r[i] = ra[i];
  V acc[MR][3];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 3; ++j) acc[i][j] = first ? _mm512_setzero_ps() : c[3 * i + j];
  for (int64_t k = 0; k < kd; ++k) {
    const VI b0 = loadu(pb + k * 48), b1 = loadu(pb + k * 48 + 16), b2 = loadu(pb + k * 48 + 32);
    for (int i = 0; i < MR; ++i) {
      const VI a = _mm512_set1_epi32(int32_t(kRows ? r[i][k] : pa[k * MR + i]));
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

// Roles swapped (bf16 pairs only): acc (MR weight rows x NV vectors of 16
// tokens) += weight rows (broadcast, dword k of row ra[i]) x packed
// activations [kd][ld] at pa (tokens along the lanes). The same products
// in the same K order as prefill_micro (the weights stay vdpbf16ps's first
// operand), so the results are bitwise the same.
template <int MR, int NV>
void prefill_micro_t(const uint32_t* const* ra, const uint32_t* pa, int64_t ld, int64_t kd, V* c, bool first) {
  const uint32_t* r[MR];
  for (int i = 0; i < MR; ++i) r[i] = ra[i];
  V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = first ? _mm512_setzero_ps() : c[NV * i + j];
  for (int64_t k = 0; k < kd; ++k) {
    VI a[NV];
    for (int j = 0; j < NV; ++j) a[j] = loadu(pa + k * ld + 16 * j);
    for (int i = 0; i < MR; ++i) {
      const VI b = _mm512_set1_epi32(int32_t(r[i][k]));
      for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], bh(b), bh(a[j]));
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) c[NV * i + j] = acc[i][j];
}

// Whether the prefill's products run on the AMX tile unit (TDPBF16PS: a
// 16 x 16 x 32 bf16 product an instruction, ~3.4 TFLOP/s a core in a
// register-only loop on this session's Intel Xeon, fp32 FMA ~0.23): the CPU
// has AMX-BF16 and AMX-TILE, the OS enables the tile state (XCR0 bits 17,
// 18) and grants it to this process (Linux: arch_prctl
// ARCH_REQ_XCOMP_PERM, once). Without it PyTorch's oneDNN (on AMX) ran 5-6x
// faster than qmoe's FMA prefill there. QMOE_CPU_AMX=0 turns it off, =1 takes
// it wherever it applies (fp16 activations too at few tokens an expert; read
// on every call, for tests).
bool amx_forced() {
  const char* env = std::getenv("QMOE_CPU_AMX");
  return env && env[0] == '1';
}
bool amx_ready() {
#if defined(QMOE_AMX)
  if (const char* env = std::getenv("QMOE_CPU_AMX"))
    if (env[0] == '0') return false;
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 22) & 1) || !((d >> 24) & 1)) return false;
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 0x60000u) != 0x60000u) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

// Whether the products should compute with vdpbf16ps (two bf16 products
// per fp32 lane) or with fp32 FMA: on AMD Zen 4/5 the dot product does twice
// the FMA's work per cycle, on Intel Sapphire Rapids it runs at half the
// FMA's rate. Decides the decode of every encoding but fp16 weights, and the
// prefill of bf16 activations (fp16 activations always take FMA there).
// Measured once (two register-only loops, well under a millisecond);
// QMOE_CPU_DOT=bf16|fma overrides it (read on every call, for tests).
// Nanoseconds of the best of 3 runs of 4096 steps of 12 independent chains
// of op (a register-only loop: the instruction's throughput).
template <class Init, class Op>
double chain_ns(Init init, Op op) {
  using T = decltype(init(0));
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    T a[12];
    for (int i = 0; i < 12; ++i) a[i] = init(i);
    const int64_t t0 = now_ns();
    for (int it = 0; it < 4096; ++it) {
#pragma GCC unroll 12
      for (int i = 0; i < 12; ++i) a[i] = op(a[i]);
      __asm__ volatile("" : "+v"(a[0]), "+v"(a[1]), "+v"(a[2]), "+v"(a[3]), "+v"(a[4]), "+v"(a[5]), "+v"(a[6]),
                       "+v"(a[7]), "+v"(a[8]), "+v"(a[9]), "+v"(a[10]), "+v"(a[11]));
    }
    const double dt = double(now_ns() - t0);
    best = best < dt ? best : dt;
  }
  return best;
}
double fma_ns() {
  static const double ns = chain_ns([](int i) { return _mm512_set1_ps(float(i)); },
                                    [](V a) { return _mm512_fmadd_ps(a, _mm512_set1_ps(0.5f), _mm512_set1_ps(0.5f)); });
  return ns;
}
double bf16_dot_ns() {
  static const double ns = chain_ns([](int i) { return _mm512_set1_ps(float(i)); }, [](V a) {
    const __m512bh x = bh(_mm512_set1_epi16(0x3f80));
    return _mm512_dpbf16_ps(a, x, x);
  });
  return ns;
}
double i16_dot_ns() {
  static const double ns = chain_ns([](int i) { return _mm512_set1_epi32(i); }, [](VI a) {
    const VI x = _mm512_set1_epi16(3);
    return _mm512_dpwssd_epi32(a, x, x);
  });
  return ns;
}

// The mode QMOE_CPU_DOT forces ('b' bf16, 'f' fma, 'i' i16; tests), else 0.
char forced_dot() {
  const char* env = std::getenv("QMOE_CPU_DOT");
  return env && (env[0] == 'b' || env[0] == 'f' || env[0] == 'i') ? env[0] : 0;
}

bool use_bf16_dot() {
  if (const char f = forced_dot()) return f == 'b';
  // Same instruction count: the dot product does twice the flops.
  static const bool dot = 2.0 * fma_ns() > 1.3 * bf16_dot_ns();
  return dot;
}

// Whether the decode of integer codes may take vpdpwssd on int16 words
// (Runner::kI16Ok; which token counts: Dec::kI16MaxTokens): where it runs
// at least 1.5 times the rate of vdpbf16ps (Intel Xeon: 4x, 2 a cycle
// against 0.5; AMD Zen runs both at the same rate). QMOE_CPU_DOT=i16
// forces it for every token count, =bf16 or =fma the others.
bool use_i16_dot() {
  if (const char f = forced_dot()) return f == 'i';
  static const bool i16 = bf16_dot_ns() > 1.5 * i16_dot_ns();
  return i16;
}

// ---------------------------------------------------------------- one call
enum class ActMode { bf16, hilo, f32, eo32, i16 };  // prepared activation format
// The decode's products: vdpbf16ps on bf16 words, fp32 FMA, or vpdpwssd on
// int16 words of integer codes and activations (see kI16Ok).
enum DotMode { kDotBf16 = 0, kDotFma = 1, kDotI16 = 2 };

template <class Act, class Enc>
struct Runner {
  using D = Dec<Enc>;
  static constexpr bool kF16 = std::is_same_v<Act, ActF16>;
  static constexpr bool kNativeF16 = is_native_f16<Enc>();
  // Whether the dot needs sum_g s_g (kOffset + z_g) sum_{k in g} a_k taken off.
  static constexpr bool kCorr = Enc::kAsym || D::kOffset != 0.0f;
  // Whether Dec has a wide decode, whose words of vector f also carry
  // D::delta(f): then a second per-group sum, sum_{k in g} delta(k % kVecs)
  // a_k, times s_g comes off. The decode of NT tokens takes it if kWide<NT>.
  static constexpr bool kVarOff = VarOff<D>::value;
  template <int NT>
  static constexpr bool kWide = kVarOff && NT == 1;
  static constexpr int64_t kSums = kVarOff ? 2 : 1;  // per-group sums a token
  // The integer decode (DotMode kDotI16): int8 / int4 / int2 codes as int16
  // words (Dec::raw16, field16) against each activation as two int16 words
  // on a scale per (token, group), a = s_a (hi + lo / 65536) with s_a =
  // max|a| / 32767 (|error| <= max|a| of the group / 2^32 an element), two
  // vpdpwssd into exact int32 sums a group (groups where kI16Max x 32767 x
  // gs < 2^31: int8 up to 256, int4 4368, int2 21845), folded as
  // float(hi + lo / 65536) * s_a * s_w; the words' offset Dec::kI16Offset
  // comes off through the activation sums (of the same rounded values) like
  // kOffset does.
  static constexpr bool kI16Ok = HasI16<D>::value;
  static constexpr float i16_offset() {
    if constexpr (kI16Ok) return D::kI16Offset;
    return 0.0f;
  }
  bool i16 = false;        // the decode takes kDotI16
  int64_t asum_ld = 0;     // floats a token in asum: kSums x G sums (+ G activation scales and 16 of slack with i16)
  static constexpr float delta(int f) {
    if constexpr (kVarOff) return D::delta(f);
    return 0.0f;
  }
  // Decode rows between two output stores (results buffered as fp32).
  static constexpr int64_t kResRows = 256;
  static constexpr int64_t kResLd = kResRows + 4;  // (slack: a step's rows past the chunk)
  static constexpr int64_t kPrefetchMin = 4096;
  static constexpr int64_t kDecodeL1Bytes = 32 << 10;  // activations a decode pass keeps in L1

  // Whether this level takes the call: a unit of packed weights must lie in
  // one group, or a group must cover whole fp32 lanes of the dot product.
  static bool takes(const MoeGemmParams& p) {
    if (!can_run(p, 1)) return false;
    if (!Enc::kScaled) return true;
    const int64_t gs = p.group_size;
    // (a partial last unit then holds whole groups: K is a multiple of gs)
    return gs % D::kUnit == 0 || (D::kUnit % gs == 0 && gs % (2 * D::kVecs) == 0);
  }

  const MoeGemmParams& p;
  const D dec;
  int64_t N, K, Kp, G, gs, units, row_bytes;
  int64_t tail_bytes;  // packed bytes of a partial last unit (0: none)
  int64_t pf_dist = 0;  // software prefetch distance of the decode weight streams
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
  float* asum = nullptr;  // [T, kSums, G] per-group activation sums (kCorr)

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
        tail_bytes(p.k % D::kUnit * D::kBytes / D::kUnit),
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
    if (decode_token && i16) return ActMode::i16;
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
    if (m == ActMode::i16) return prep_token_i16(t, dst);
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

  // Token t for the integer decode: each group's scale s_a = max|a| / 32767
  // (1 for a zero group) into its asum row, and the activations as int16
  // words hi = round(a / s_a), then lo = round((a - s_a hi) / s_a * 65536)
  // (Kp words later), in the unit's permuted order; the group sums of the
  // asum row are those of the rounded values, so that the codes' offset
  // comes off the products of the same values.
  void prep_token_i16(int64_t t, uint8_t* dst) const {
    const uint16_t* src = act + t * K;
    float* sums = asum + t * asum_ld;
    float* sa = sums + kSums * G;
    for (int64_t g = 0; g < G; ++g) sums[g] = 0.0f;
    for (int64_t g = 0; g < G; ++g) {
      V m = _mm512_setzero_ps();
      for (int64_t k = g * gs; k < (g + 1) * gs; k += 16)
        m = _mm512_max_ps(m, _mm512_abs_ps(half_to_f32<Act>(_mm256_maskz_loadu_epi16(mask16(K - k), src + k))));
      const float mx = _mm512_reduce_max_ps(m);
      sa[g] = mx > 0.0f ? mx / 32767.0f : 1.0f;
    }
    // (slack: the fold's lanes of a partial last unit read up to 16 groups past G)
    _mm512_storeu_ps(sa + G, _mm512_setzero_ps());
    for (int64_t u = 0; u < units; ++u) {
      VI x[D::kVecs], y[D::kVecs], xl[D::kVecs], yl[D::kVecs];
      for (int j = 0; j < D::kVecs; ++j) {
        const int64_t k0 = u * D::kUnit + j * 32;
        __m256i h[2], l[2];
        for (int q = 0; q < 2; ++q) {  // 16 elements in one group (gs % 16 == 0); zero past K
          const int64_t k = k0 + 16 * q, g = min64(k / gs, G - 1);
          const V f = half_to_f32<Act>(_mm256_maskz_loadu_epi16(mask16(K - k), src + k));
          const V sv = _mm512_set1_ps(sa[g]);
          const VI qi = _mm512_cvtps_epi32(_mm512_div_ps(f, sv));
          const V r = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(qi), sv, f);  // |r| <= s_a / 2
          const VI ri = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_div_ps(r, sv), _mm512_set1_ps(65536.0f)));
          sums[g] += (float(_mm512_reduce_add_epi32(qi)) + float(_mm512_reduce_add_epi32(ri)) / 65536.0f) * sa[g];
          h[q] = _mm512_cvtsepi32_epi16(qi);
          l[q] = _mm512_cvtsepi32_epi16(ri);
        }
        x[j] = _mm512_inserti64x4(_mm512_castsi256_si512(h[0]), h[1], 1);
        xl[j] = _mm512_inserti64x4(_mm512_castsi256_si512(l[0]), l[1], 1);
      }
      permute_unit<D::kVecs>(x, y);
      permute_unit<D::kVecs>(xl, yl);
      for (int j = 0; j < D::kVecs; ++j) {
        _mm512_storeu_si512(reinterpret_cast<uint16_t*>(dst) + u * D::kUnit + j * 32, y[j]);
        _mm512_storeu_si512(reinterpret_cast<uint16_t*>(dst) + Kp + u * D::kUnit + j * 32, yl[j]);
      }
    }
  }

  // Sum of each group's activations (fp32) of token t, and (kVarOff) the
  // sum weighted by delta of each element's vector.
  void prep_asum(int64_t t) {
    const uint16_t* src = act + t * K;
    float* as = asum + t * asum_ld;
    alignas(64) float dp[16];
    for (int l = 0; l < 16; ++l) dp[l] = delta(l % D::kVecs);
    const V dpat = _mm512_load_ps(dp);  // (groups start at multiples of 16 where kVarOff)
    for (int64_t g = 0; g < G; ++g) {
      V acc = _mm512_setzero_ps(), accd = acc;
      for (int64_t k = g * gs; k < (g + 1) * gs; k += 16) {
        const V x = half_to_f32<Act>(_mm256_maskz_loadu_epi16(mask16((g + 1) * gs - k), src + k));
        acc = _mm512_add_ps(acc, x);
        if constexpr (kVarOff) accd = _mm512_fmadd_ps(x, dpat, accd);
      }
      as[g] = _mm512_reduce_add_ps(acc);
      if constexpr (kVarOff) as[G + g] = _mm512_reduce_add_ps(accd);
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

  void load_scales(int64_t e, int64_t r, int64_t g0, int64_t g1, float* sbuf, float* szbuf,
                   float offset = D::kOffset) const {
    if constexpr (Enc::kScaled)
      row_scales<Act, Enc::kAsym, kCorr>(scales + (e * N + r) * G + g0,
                                         Enc::kAsym ? zeros + (e * N + r) * G + g0 : nullptr, g1 - g0,
                                         offset, sbuf, szbuf);
  }

  // ------------------------------------------------------------ decode rows
  // One decode step: R rows x NT tokens, each row walked along the whole K
  // once (no K chunks: their jumps cost the prefetchers more than
  // L2-resident activations cost the loads). The R rows are a chunk's
  // rows j, j + rs, j + 2 rs, ..., so each of the R weight streams runs on
  // sequentially through rs whole rows: R side-by-side rows made short
  // streams (one row, 1-7 KB) that the prefetchers never got ahead of (the
  // int2/int4 Mixtral b1 rows read DRAM at 50-70% of the anchor that way,
  // 80-90% as long streams, interleaved runs). A unit's
  // packed bytes are decoded once in registers; every activation vector
  // loaded feeds the R rows (with several tokens the L1 loads, not the
  // weight bytes, would bound it). C accumulator chains per (row, token)
  // hide vdpbf16ps' latency where there are few; per block of units that
  // share a scale (a group, or one unit whose fp32 lanes span several
  // groups) they fold into the running sums as tot += (sum of chains) * s.
  // Rows per step: 4 for few tokens (more independent work per weight
  // stream; measured faster than 1 or 2 rows in and out of cache), 2 for
  // more (R x NT accumulators and running sums fill the 32 registers).
  // Chains: for one token, the decoder's kChains1 (one Zen 5 core,
  // L2-resident, 1 vs 2 chains: int4 +13%, fp8 +6%, fp16 weights +15%,
  // int2 sym -15%, int2 asym -4% (31.5 vs 32.7 GB/s, 3 interleaved rounds),
  // bf16 weights level; 3 or 4 chains slower for int2 and int4 (int2 sym
  // 26-28 and 24-25 GB/s); int8 keeps 2, as before; fp16 activations keep 2:
  // two dot products a vector already); for more tokens 1: 2 tokens x 4
  // rows are 8 chains already (a second set spilled registers: one chain
  // measured 4% faster for int2, 20% for int4, 5-10% for int8/fp8).
  template <int NT>
  static constexpr int kRows = NT <= 2 ? 4 : 2;
  template <int NT>
  static constexpr int kChains = NT > 1 ? 1 : kF16 && !kNativeF16 ? 2 : D::kChains1;

  // acc[(j + P) % C][i][t] += vector j of unit u of R rows (raw registers
  // x[i]) . token t.
  template <int NT, int R, int C, int P, int M>
  [[gnu::always_inline]] inline void unit_dots(const VI* x, int64_t u, const uint8_t* const* a, V (*acc)[R][NT]) const {
    if constexpr (kNativeF16) {  // fp16 weights: vcvtph2ps + FMA on fp32 activations
      V w0[R], w1[R];
      for (int i = 0; i < R; ++i) {
        w0[i] = _mm512_cvtph_ps(_mm512_castsi512_si256(x[i]));
        w1[i] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(x[i], 1));
      }
      for (int t = 0; t < NT; ++t) {
        const float* at = reinterpret_cast<const float*>(a[t]) + u * 32;
        const V a0 = _mm512_loadu_ps(at), a1 = _mm512_loadu_ps(at + 16);
        for (int i = 0; i < R; ++i) {
          acc[P % C][i][t] = _mm512_fmadd_ps(w0[i], a0, acc[P % C][i][t]);
          acc[(P + 1) % C][i][t] = _mm512_fmadd_ps(w1[i], a1, acc[(P + 1) % C][i][t]);
        }
      }
    } else {
      constexpr bool FMA = M == kDotFma;
#pragma GCC unroll 8
      for (int j = 0; j < D::kVecs; ++j) {
        const int c = (j + P) % C;
        VI v[R];
        if constexpr (M == kDotI16) {  // fields as int16 . int16 activations, int32 sums
          if constexpr (kI16Ok) {
            for (int i = 0; i < R; ++i) v[i] = dec.field16(x[i], j);
            const int64_t eo = u * D::kUnit + j * 32;
#pragma GCC unroll 8
            for (int t = 0; t < NT; ++t) {
              const VI ah = loadu(a[t] + eo * 2), al = loadu(a[t] + 2 * Kp + eo * 2);
#pragma GCC unroll 4
              for (int i = 0; i < R; ++i) {
                acc[c][i][t] = _mm512_castsi512_ps(_mm512_dpwssd_epi32(_mm512_castps_si512(acc[c][i][t]), v[i], ah));
                acc[C + c][i][t] =
                    _mm512_castsi512_ps(_mm512_dpwssd_epi32(_mm512_castps_si512(acc[C + c][i][t]), v[i], al));
              }
            }
          }
          continue;
        }
        for (int i = 0; i < R; ++i) v[i] = dec.vec(x[i], j, kWide<NT>);
        const int64_t eo = u * D::kUnit + j * 32;  // element offset of the vector
        // acc[c] += words v . the tokens' activations of this vector
        auto dots = [&](const VI* v, int c) {
          if constexpr (FMA) {  // words as fp32 (even, odd) against [16 even | 16 odd] activations
            V ev[R], od[R];
            for (int i = 0; i < R; ++i) {
              ev[i] = _mm512_castsi512_ps(_mm512_slli_epi32(v[i], 16));
              od[i] = _mm512_castsi512_ps(_mm512_and_si512(v[i], _mm512_set1_epi32(int(0xFFFF0000u))));
            }
            for (int t = 0; t < NT; ++t) {
              const float* p = reinterpret_cast<const float*>(a[t]) + eo;
              const V ae = _mm512_loadu_ps(p), ao = _mm512_loadu_ps(p + 16);
              for (int i = 0; i < R; ++i) acc[c][i][t] = _mm512_fmadd_ps(od[i], ao, _mm512_fmadd_ps(ev[i], ae, acc[c][i][t]));
            }
          } else {
#pragma GCC unroll 8
            for (int t = 0; t < NT; ++t) {
              const VI ah = loadu(a[t] + eo * 2);
#pragma GCC unroll 4
              for (int i = 0; i < R; ++i) acc[c][i][t] = _mm512_dpbf16_ps(acc[c][i][t], bh(v[i]), bh(ah));
              if constexpr (kF16) {  // lo half of fp16 activations
                const VI al = loadu(a[t] + 2 * Kp + eo * 2);
#pragma GCC unroll 4
                for (int i = 0; i < R; ++i) acc[c][i][t] = _mm512_dpbf16_ps(acc[c][i][t], bh(v[i]), bh(al));
              }
            }
          }
        };
        dots(v, c);
      }
    }
  }

  // A unit's packed codes at p (part > 0: its first `part` bytes) in the
  // registers the decode mode M takes.
  template <int NT, int M>
  [[gnu::always_inline]] inline VI unit_raw(const uint8_t* p, int64_t part) const {
    if constexpr (M == kDotI16 && kI16Ok) return part ? dec.raw16_part(p, part) : dec.raw16(p);
    return part ? dec.raw_part(p, part, kWide<NT>) : dec.raw(p, kWide<NT>);
  }

  // Units [u0, u1) of the R rows at wr into acc (whole units; unit pairs
  // alternate chains where a unit is one vector).
  template <int NT, int R, int C, int M>
  [[gnu::always_inline]] inline void units_into(const uint8_t* const* wr, int64_t u0, int64_t u1, const uint8_t* const* a,
                         V (*acc)[R][NT]) const {
    // (pf: whether to prefetch; one prefetch a 64-byte line is enough)
    auto load = [&](int64_t u, VI* x, bool pf = true) {
      for (int i = 0; i < R; ++i) {
        if (pf) _mm_prefetch(reinterpret_cast<const char*>(wr[i] + u * D::kBytes) + pf_dist, _MM_HINT_T0);
        x[i] = unit_raw<NT, M>(wr[i] + u * D::kBytes, 0);
      }
    };
    int64_t u = u0;
    if constexpr (C > 1 && D::kVecs == 1)
      for (; u + 1 < u1; u += 2) {
        VI x0[R], x1[R];
        load(u, x0);
        load(u + 1, x1, D::kBytes >= 64);
        unit_dots<NT, R, C, 0, M>(x0, u, a, acc);
        unit_dots<NT, R, C, 1, M>(x1, u + 1, a, acc);
      }
    for (; u < u1; ++u) {
      VI x[R];
      load(u, x);
      unit_dots<NT, R, C, 0, M>(x, u, a, acc);
    }
  }

  // Rows r + i * rs (i < R) of expert e (rows past r1 repeat row r1 - 1;
  // their results land in res's slack) for NT tokens; res[t * ldr + i * rs]
  // gets the results.
  template <int NT, int R, int M>
  void decode_step(int64_t e, int64_t r, int64_t rs, int64_t r1, const uint8_t* const* a,
                   const float* const* as, float* sb, float* res, int64_t ldr, int64_t ub, int64_t ue) const {
    constexpr int C = kChains<NT>;
    const uint8_t* wr[R];
    const float* s[R];
    for (int i = 0; i < R; ++i) {
      const int64_t row = min64(r + i * rs, r1 - 1);
      wr[i] = w + (e * N + row) * row_bytes;
      float* si = sb + i * 2 * sstride_;
      load_scales(e, row, 0, G, si, si + sstride_, M == kDotI16 ? i16_offset() : D::kOffset);
      prefetch_scales(e, row + 4, 0);
      s[i] = si;
    }
    // Units [ub, ue) of the rows: all of them, or (unscaled weights, see
    // chunk_units) a K chunk; the first chunk writes res, the others add.
    const bool first = ub == 0;
    const bool last = ue == units;
    const int64_t full = last && tail_bytes ? units - 1 : ue;  // units read whole
    constexpr int CA = M == kDotI16 ? 2 * C : C;  // (i16: the chains of the activations' hi words, then lo)
    V tot[R][NT], acc[CA][R][NT];
    auto zero = [&] {
      for (int c = 0; c < CA; ++c)
        for (int i = 0; i < R; ++i)
          for (int t = 0; t < NT; ++t) acc[c][i][t] = _mm512_setzero_ps();
    };
    // tot += (sum of chains) * scale of block g: one scale (a group of
    // whole units), or a scale per fp32 lane.
    // The scales sc[] of block g for each fp32 lane.
    auto lane_scales = [&](const float* sc, int64_t g) {
      return gs >= D::kUnit ? _mm512_set1_ps(sc[g]) : _mm512_permutexvar_ps(idx_dot, _mm512_loadu_ps(sc + g));
    };
    auto fold = [&](int64_t g) {
      V av[NT];  // (i16: each token's activation scales)
      if constexpr (M == kDotI16)
        for (int t = 0; t < NT; ++t) av[t] = lane_scales(as[t] + kSums * G, g);
      for (int i = 0; i < R; ++i) {
        const V sv = lane_scales(s[i], g);
#pragma GCC unroll 8
        for (int t = 0; t < NT; ++t) {
          V d = acc[0][i][t];
          if constexpr (M == kDotI16) {  // int32 sums of hi and lo, times the token's scale
            VI hi = _mm512_castps_si512(d), lo = _mm512_castps_si512(acc[C][i][t]);
            for (int c = 1; c < C; ++c) {
              hi = _mm512_add_epi32(hi, _mm512_castps_si512(acc[c][i][t]));
              lo = _mm512_add_epi32(lo, _mm512_castps_si512(acc[C + c][i][t]));
            }
            d = _mm512_mul_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_set1_ps(1.0f / 65536.0f),
                                              _mm512_cvtepi32_ps(hi)),
                              av[t]);
          } else {
            for (int c = 1; c < C; ++c) d = _mm512_add_ps(d, acc[c][i][t]);
          }
          tot[i][t] = _mm512_fmadd_ps(d, sv, tot[i][t]);
        }
      }
    };
    auto tail = [&] {  // the partial last unit (masked bytes, zero activations past K)
      VI x[R];
      for (int i = 0; i < R; ++i) x[i] = unit_raw<NT, M>(wr[i] + full * D::kBytes, tail_bytes);
      unit_dots<NT, R, C, 0, M>(x, full, a, acc);
    };
    for (int i = 0; i < R; ++i)
      for (int t = 0; t < NT; ++t) tot[i][t] = _mm512_setzero_ps();
    if constexpr (!Enc::kScaled) {
      zero();
      units_into<NT, R, C, M>(wr, ub, full, a, acc);
      if (last && tail_bytes) tail();
      for (int i = 0; i < R; ++i)
        for (int t = 0; t < NT; ++t)
          for (int c = 0; c < C; ++c) tot[i][t] = _mm512_add_ps(tot[i][t], acc[c][i][t]);
    } else {
      const int64_t gstep = gs >= D::kUnit ? 1 : gpb;  // groups per block
      int64_t g = 0;
      for (int64_t u0 = 0; u0 < full; u0 += upb, g += gstep) {
        zero();
        units_into<NT, R, C, M>(wr, u0, u0 + upb, a, acc);
        fold(g);
      }
      if (tail_bytes) {  // (only where a unit holds several groups: upb == 1)
        zero();
        tail();
        fold(g);
      }
    }
    // The R x NT sums: one transpose-and-add tree where they are 16.
    float sums[R * NT];
    if constexpr (R * NT == 16) {
      reduce16(&tot[0][0], sums);
    } else {
      for (int i = 0; i < R; ++i)
        for (int t = 0; t < NT; ++t) sums[i * NT + t] = _mm512_reduce_add_ps(tot[i][t]);
    }
    for (int i = 0; i < R; ++i)
      for (int t = 0; t < NT; ++t) {
        float v = sums[i * NT + t];
        // - sum_g s_g (kOffset + z_g) sum_{k in g} a_k
        //   (kVarOff: - sum_g s_g sum_{k in g} delta(k % kVecs) a_k, same reduction)
        if constexpr (kWide<NT> && kVarOff && M != kDotI16) v -= dot2_f32(s[i] + sstride_, as[t], s[i], as[t] + G, G);
        else if constexpr (kCorr) v -= dot_f32(s[i] + sstride_, as[t], G);
        float& dst = res[t * ldr + i * rs];
        dst = first ? v : dst + v;
      }
  }

  // Units of K a decode pass takes at once. 16-bit weights with 8 tokens
  // are bound by the dot products, and their activations (8 x K x 2 bytes:
  // 64 KB at K = 4096) spill out of L1 and are re-read from L2 for every
  // step of rows: there K is cut into chunks whose activations fit L1
  // (32 KB). One core, L2-resident, bf16 weights, 8 tokens: 32 -> 40 GB/s;
  // Mixtral down from DRAM (K = 14336), two threads: 8.0 -> 6.9 ms
  // (interleaved runs, 2026-11-27). Not for fewer tokens (bound by memory,
  // and the chunks' jumps cost the prefetchers: 2 tokens 4.8 -> 5.6 ms) nor
  // for quantized weights (their short row pieces: int4 3.5 -> 4.7 ms).
  int64_t chunk_units(int nt, bool fma) const {
    if (Enc::kScaled || nt < 8) return units;
    const int64_t bytes_per_k = kF16 || fma ? 4 : 2;  // prepared activations (hi + lo, or fp32)
    return max64(1, kDecodeL1Bytes / (int64_t(nt) * bytes_per_k * D::kUnit));
  }

  // Rows [r0, r1) of expert e for its nt tokens (padded to NT), into out.
  template <int NT, int M>
  void decode_rows(int64_t e, int64_t r0, int64_t r1, int64_t t0, int64_t nt, const uint8_t* const* a,
                   const float* const* as, float* sb, float* res) const {
    constexpr int R = kRows<NT>;
    for (int64_t c0 = r0; c0 < r1; c0 += kResRows) {
      const int64_t c1 = min64(r1, c0 + kResRows);
      // The R rows of a step lie `rs` rows apart: each row stream runs on
      // through rs consecutive rows (long sequential streams for the
      // prefetchers), not R rows side by side for one row's length. (Rows
      // side by side where rows are >= 4 KB measured 5-15% slower from
      // DRAM, interleaved; L2-resident they are up to 20% faster.)
      const int64_t rs = ceil_div(c1 - c0, R);
      const int64_t cu = chunk_units(NT, M == kDotFma);
      for (int64_t ub = 0; ub < units; ub += cu)
        for (int64_t j = 0; j < rs; ++j)
          decode_step<NT, R, M>(e, c0 + j, rs, c1, a, as, sb, res + j, kResLd, ub, min64(units, ub + cu));
      for (int64_t t = 0; t < nt; ++t) store_act<Act>(res + t * kResLd, out + (t0 + t) * N + c0, c1 - c0);
    }
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
  bool direct_pf = false;  // prefill broadcasts straight from the activation rows
  bool amx_pf = false;     // prefill on the AMX tile unit (prefill_item_amx)
  int64_t amx_ld = 0;      // dwords a token row of the AMX prefill (Kd + 16: see run)
  CachedBuf<0> pack_buf;
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
  // unit's permuted order, like the activations): kUnitVecs<F32> vectors
  // of 16 dwords.
  template <bool F32>
  static constexpr int kUnitVecs = D::kUnit / (F32 ? 1 : 2) / 16;
  // Lo (bf16 panels only): the residual w - bf16(w) of each dequantized
  // weight, in bf16 (the low half of w = hi + lo: fp16 activations on AMX).
  template <bool F32, bool Lo = false>
  [[gnu::always_inline]] inline void unit_vecs(const uint8_t* wr, int64_t u, const float* sbuf,
                                               const float* szbuf, VI* out) const {
    if constexpr (kNativeF16) {
      const uint16_t* s = reinterpret_cast<const uint16_t*>(wr) + u * 32;
      const V f0 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask16(K - u * 32), s));
      const V f1 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask16(K - u * 32 - 16), s + 16));
      if constexpr (F32) {
        out[0] = _mm512_castps_si512(f0);
        out[1] = _mm512_castps_si512(f1);
      } else {  // (the AMX prefill: bf16 hi, or with Lo the residual)
        const VI hi = (VI)_mm512_cvtne2ps_pbh(f1, f0);
        out[0] = Lo ? (VI)_mm512_cvtne2ps_pbh(_mm512_sub_ps(f1, bf16_hi_f32(hi)), _mm512_sub_ps(f0, bf16_lo_f32(hi)))
                    : hi;
      }
    } else if constexpr (!Enc::kScaled) {  // bf16 weights
      const uint16_t* s = reinterpret_cast<const uint16_t*>(wr) + u * 32;
      const VI v = _mm512_maskz_loadu_epi16(mask32(K - u * 32), s);
      if constexpr (F32) {
        out[0] = _mm512_castps_si512(bf16_lo_f32(v));
        out[1] = _mm512_castps_si512(bf16_hi_f32(v));
      } else {
        out[0] = v;
      }
    } else {
      const int64_t g = gs >= D::kUnit ? u / (gs / D::kUnit) : u * (D::kUnit / gs);  // first group
      V s0, s1, z0 = _mm512_setzero_ps(), z1 = z0;
      if (gs >= D::kUnit) {  // one group a unit: a broadcast load, no permutes (2-4 a unit)
        s0 = s1 = _mm512_set1_ps(sbuf[g]);
        if constexpr (kCorr) z0 = z1 = _mm512_set1_ps(szbuf[g]);
      } else {
        s0 = _mm512_permutexvar_ps(idx_p0, _mm512_loadu_ps(sbuf + g));
        s1 = _mm512_permutexvar_ps(idx_p1, _mm512_loadu_ps(sbuf + g));
        if constexpr (kCorr) {
          z0 = _mm512_permutexvar_ps(idx_p0, _mm512_loadu_ps(szbuf + g));
          z1 = _mm512_permutexvar_ps(idx_p1, _mm512_loadu_ps(szbuf + g));
        }
      }
      auto put = [&](int j, V f0, V f1) {
        if constexpr (F32) {
          out[2 * j] = _mm512_castps_si512(f0);
          out[2 * j + 1] = _mm512_castps_si512(f1);
        } else if constexpr (Lo) {
          const VI hi = (VI)_mm512_cvtne2ps_pbh(f1, f0);
          out[j] = (VI)_mm512_cvtne2ps_pbh(_mm512_sub_ps(f1, bf16_hi_f32(hi)), _mm512_sub_ps(f0, bf16_lo_f32(hi)));
        } else {
          out[j] = (VI)_mm512_cvtne2ps_pbh(f1, f0);
        }
      };
      if constexpr (std::is_same_v<Enc, IntEncoding<8, Enc::kAsym>>) {  // int8: bytes -> int32 -> fp32, (code - z) * s
        const uint8_t* b = wr + u * D::kBytes;
        const bool part = tail_bytes && u == units - 1;
        const __m128i b0 = part ? _mm_maskz_loadu_epi8(__mmask16(mask32(tail_bytes)), b) : _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
        const __m128i b1 = part ? _mm_maskz_loadu_epi8(__mmask16(mask32(tail_bytes - 16)), b + 16)
                                : _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16));
        auto cvt = [](__m128i y) {
          return _mm512_cvtepi32_ps(Enc::kAsym ? _mm512_cvtepu8_epi32(y) : _mm512_cvtepi8_epi32(y));
        };
        put(0, _mm512_fmsub_ps(cvt(b0), s0, z0), _mm512_fmsub_ps(cvt(b1), s1, z1));
      } else if constexpr (kIsFp8<Enc>) {
        // fp8 -> fp16 bits -> fp32 (vcvtph2ps), exact, skipping the bf16
        // table decode and its bf16 -> fp32 widening (prefill fp8 ~0.5-1.5%
        // faster). Word i of x holds k = 2i (low byte, vector 0) and 2i + 1
        // (high byte, vector 1), as in Dec. e5m2 is the high byte of an
        // fp16; e4m3's magnitude << 7 is the fp16 of its value * 2^-8
        // (subnormals included; vcvtph2ps widens fp16 subnormals exactly),
        // the 2^8 folded into the scales, and its NaN code (magnitude 0x7F,
        // never written by the quantizer) patched only in a unit that has one.
        using Fmt = typename Enc::format;
        const VI x = tail_bytes && u == units - 1 ? dec.raw_part(wr + u * D::kBytes, tail_bytes)
                                                  : dec.raw(wr + u * D::kBytes);
        V t0 = s0, t1 = s1;
        bool any_nan = false;
        if constexpr (!Fmt::kHasInf) {
          any_nan = _mm512_cmpeq_epi8_mask(_mm512_or_si512(x, _mm512_set1_epi8(char(0x80))),
                                           _mm512_set1_epi8(char(0xFF))) != 0;
          const V k = _mm512_set1_ps(256.0f);
          t0 = _mm512_mul_ps(s0, k);
          t1 = _mm512_mul_ps(s1, k);
        }
        auto half = [&](int j) -> VI {  // fp16 words of vector j
          if constexpr (Fmt::kHasInf) {
            return j == 0 ? _mm512_slli_epi16(x, 8) : _mm512_and_si512(x, _mm512_set1_epi16(int16_t(0xFF00)));
          } else {  // (byte << 8) >> 1 arithmetic: sign at 15 and 14, magnitude at 7..13; clear 14 and below 7
            VI h = _mm512_and_si512(_mm512_srai_epi16(j == 0 ? _mm512_slli_epi16(x, 8) : x, 1),
                                    _mm512_set1_epi16(int16_t(0xBF80)));
            if (any_nan) {
              const VI mm = _mm512_set1_epi16(int16_t(j == 0 ? 0x7F : 0x7F00));
              h = _mm512_mask_mov_epi16(h, _mm512_cmpeq_epi16_mask(_mm512_and_si512(x, mm), mm),
                                        _mm512_set1_epi16(0x7E00));
            }
            return h;
          }
        };
        for (int j = 0; j < D::kVecs; ++j) {
          const VI h = half(j);
          put(j, _mm512_fmsub_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(h)), t0, z0),
              _mm512_fmsub_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)), t1, z1));
        }
      } else {
        const VI x = tail_bytes && u == units - 1 ? dec.raw_part(wr + u * D::kBytes, tail_bytes)
                                                  : dec.raw(wr + u * D::kBytes);
        for (int j = 0; j < D::kVecs; ++j) {
          const VI v = dec.vec(x, j);
          // (value + kOffset) * s - s * (kOffset + z) = (value - z) * s
          put(j, _mm512_fmsub_ps(bf16_lo_f32(v), s0, z0), _mm512_fmsub_ps(bf16_hi_f32(v), s1, z1));
        }
      }
    }
  }
  template <bool F32, bool Lo = false>
  void unit_dwords(const uint8_t* wr, int64_t u, const float* sbuf, const float* szbuf,
                   uint32_t* dst) const {
    VI v[kUnitVecs<F32>];
    unit_vecs<F32, Lo>(wr, u, sbuf, szbuf, v);
    for (int j = 0; j < kUnitVecs<F32>; ++j) _mm512_storeu_si512(dst + 16 * j, v[j]);
  }

  // Panel [kd][48] of rows r0.. (zero past r1) over K dwords [d0, d0 + kd)
  // (Lo: of the weights' low halves, unit_vecs).
  template <bool F32, bool Lo = false>
  void fill_panel(int64_t e, int64_t r0, int64_t r1, int64_t d0, int64_t kd, uint32_t* panel,
                  uint32_t* tmp, float* srow, int64_t sstride) const {
    constexpr int64_t ud = D::kUnit / (F32 ? 1 : 2);  // dwords per unit
    const int64_t u0 = d0 / ud, u1 = (d0 + kd) / ud;
    for (int h = 0; h < PNR / 16; ++h) {
      const int64_t rb = r0 + 16 * h;
      for (int i = 0; i < 16; ++i)
        if (rb + i < r1) load_scales(e, rb + i, 0, G, srow + i * 2 * sstride, srow + (i * 2 + 1) * sstride);
      if constexpr (kUnitVecs<F32> == 1) {  // a unit is one vector: decoded straight into the transpose
        for (int64_t u = u0; u < u1; ++u) {
          VI r[16];
          for (int i = 0; i < 16; ++i) {
            if (rb + i < r1) {
              if (u + 4 < u1 && (D::kBytes >= 64 || u % 2 == 0))  // in case this panel was not prefetched
                _mm_prefetch(reinterpret_cast<const char*>(w + (e * N + rb + i) * row_bytes + (u + 4) * D::kBytes),
                             _MM_HINT_T0);
              unit_vecs<F32, Lo>(w + (e * N + rb + i) * row_bytes, u, srow + i * 2 * sstride,
                             srow + (i * 2 + 1) * sstride, r + i);
            } else {
              r[i] = _mm512_setzero_si512();
            }
          }
          transpose16(r);
          uint32_t* dst = panel + (u - u0) * ud * PNR + 16 * h;
          for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + i * PNR, r[i]);
        }
        continue;
      }
      for (int64_t u = u0; u < u1; ++u) {
        for (int i = 0; i < 16; ++i) {
          uint32_t* t = tmp + i * ud;
          if (rb + i < r1) {
            if (u + 4 < u1)  // in case this panel was not prefetched
              _mm_prefetch(reinterpret_cast<const char*>(w + (e * N + rb + i) * row_bytes + (u + 4) * D::kBytes),
                           _MM_HINT_T0);
            unit_dwords<F32, Lo>(w + (e * N + rb + i) * row_bytes, u, srow + i * 2 * sstride,
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

  // Prefetch share `part` of `parts` of the packed weights (and, with part
  // 0, the scales and zeros) that fill_panel will read for rows [ra, rb)
  // over K dwords [d0, d0 + kd), into L2.
  template <bool F32>
  void prefetch_panel(int64_t e, int64_t ra, int64_t rb, int64_t d0, int64_t kd, int64_t part,
                      int64_t parts) const {
    constexpr int64_t ud = D::kUnit / (F32 ? 1 : 2);
    const int64_t b0 = d0 / ud * D::kBytes, b1 = min64(row_bytes, ceil_div(d0 + kd, ud) * D::kBytes);
    const int64_t lpr = ceil_div(b1 - b0, 64) + 1;  // lines a row (+1: rows need not be aligned)
    const int64_t total = (rb - ra) * lpr;
    const int64_t j0 = total * part / parts, j1 = total * (part + 1) / parts;
    int64_t row = ra + j0 / lpr, l = j0 % lpr;
    for (int64_t j = j0; j < j1; ++j) {
      const uint8_t* base = w + (e * N + row) * row_bytes;
      _mm_prefetch(reinterpret_cast<const char*>(base + min64(b1 - 1, b0 + l * 64)), _MM_HINT_T1);
      if (++l == lpr) l = 0, ++row;
    }
    if constexpr (Enc::kScaled)
      if (part == 0)
        for (int64_t b = 0; b < (rb - ra) * G * 2; b += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(scales + (e * N + ra) * G) + b, _MM_HINT_T1);
          if constexpr (Enc::kAsym)
            _mm_prefetch(reinterpret_cast<const char*>(zeros + (e * N + ra) * G) + b, _MM_HINT_T1);
        }
  }

  // Rows [r0, r1) of prefill expert e: panels of PNR rows, each over K in
  // chunks of kc_dw dwords. The panel is decoded once and every token block
  // of the expert runs against it (block(b, d0, kd, first, last, rp, re)):
  // while the blocks run, the packed weights of the next panel (same rows'
  // next chunk, else the next rows' first) are prefetched into L2, a share
  // after each block, so the next fill reads from L2 instead of waiting on
  // 16 DRAM streams at once. (Also prefetching the first panel of the item
  // this worker likely takes next, i + threads, measured no faster.)
  // (Lo: a second panel of the weights' low halves right after the first.)
  template <bool F32, bool Lo, class Block>
  void walk_panels(int64_t e, int64_t r0, int64_t r1, int64_t nblk, uint32_t* panel, uint32_t* tmp, float* srow,
                   int64_t sstride, Block&& block) const {
    // Only during the last blocks: each block streams its activations
    // through L2, which would evict what came in earlier.
    const int64_t pf_parts = min64(nblk, 8);
    for (int64_t rp = r0; rp < r1; rp += PNR) {
      const int64_t re = min64(r1, rp + PNR);
      for (int64_t d0 = 0; d0 < Kd; d0 += kc_dw) {
        const int64_t kd = min64(kc_dw, Kd - d0);
        int64_t nrp = rp, nd0 = d0 + kc_dw;  // the next panel
        if (nd0 >= Kd) nd0 = 0, nrp = rp + PNR;
        const bool has_next = nrp < r1;
        fill_panel<F32>(e, rp, re, d0, kd, panel, tmp, srow, sstride);
        if constexpr (Lo) fill_panel<F32, true>(e, rp, re, d0, kd, panel + kc_dw * PNR, tmp, srow, sstride);
        for (int64_t b = 0; b < nblk; ++b) {
          block(b, d0, kd, d0 == 0, d0 + kd >= Kd, rp, re);
          if (has_next && b >= nblk - pf_parts)
            prefetch_panel<F32>(e, nrp, min64(r1, nrp + PNR), nd0, min64(kc_dw, Kd - nd0),
                                b - (nblk - pf_parts), pf_parts);
        }
      }
    }
  }

  // The expert's tokens in blocks of PMR against each panel (prefill_micro),
  // packed or (direct_pf) the activation rows in place.
  template <bool F32>
  void prefill_item(const Plan& plan, int64_t e, int64_t r0, int64_t r1, uint32_t* panel,
                    uint32_t* tmp, float* srow, int64_t sstride, V* cbuf) const {
    const int64_t t0 = plan.offsets[e], nt = plan.tokens(e);
    const uint32_t* pack =
        reinterpret_cast<const uint32_t*>(pack_buf.as<uint8_t>() + pack_off_buf.as<int64_t>()[e]);
    alignas(64) float outv[PNR];
    walk_panels<F32, false>(e, r0, r1, ceil_div(nt, PMR), panel, tmp, srow, sstride,
                     [&](int64_t b, int64_t d0, int64_t kd, bool first, bool last, int64_t rp, int64_t re) {
      V* c = cbuf + (Kd > kc_dw ? b * PMR * 3 : 0);  // one tile unless K takes chunks
      const int64_t rows = block_rows(nt, b);
      if (direct_pf) {  // the block's rows in place (rows past the tokens repeat the last one)
        const uint32_t* ra[PMR];
        for (int i = 0; i < PMR; ++i)
          ra[i] = reinterpret_cast<const uint32_t*>(act + (t0 + min64(b * PMR + i, nt - 1)) * K) + d0;
        if (rows == PMR) prefill_micro<F32, PMR, true>(nullptr, ra, panel, kd, c, first);
        else prefill_micro<F32, 4, true>(nullptr, ra, panel, kd, c, first);
      } else {
        const uint32_t* pa = pack + b * PMR * Kd + d0 * rows;
        if (rows == PMR) prefill_micro<F32, PMR>(pa, nullptr, panel, kd, c, first);
        else prefill_micro<F32, 4>(pa, nullptr, panel, kd, c, first);
      }
      if (!last) return;
      const int64_t mr = min64(PMR, nt - b * PMR);
      for (int64_t i = 0; i < mr; ++i) {
        for (int j = 0; j < 3; ++j) _mm512_store_ps(outv + 16 * j, c[3 * i + j]);
        store_act<Act>(outv, out + (t0 + b * PMR + i) * N + rp, re - rp);
      }
    });
  }

#if defined(QMOE_AMX)
  // prefill_item on the AMX tile unit: the same bf16 panels ([kd][48]
  // dwords: for each K pair the 48 rows' pairs, which is TDPBF16PS's layout
  // for its second operand, three tiles of 16 rows at a 192-byte stride)
  // against the expert's tokens as rows of bf16 pairs in the panel's K
  // order (the first operand: 16 tokens x 16 pairs a tile), 16 tokens x 48
  // rows of fp32 sums in three tiles. fp16 activations (kF16) keep their
  // precision as a = hi + lo and w = hi + lo, all bf16 (the activations'
  // split exact, the weights' to 2^-16): three products a step, a_hi w_hi +
  // a_lo w_hi + a_hi w_lo (a_lo w_lo under 2^-16 of the sum).
  struct alignas(64) TileConfig {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  };
  static constexpr int AMR = 16;  // tokens a tile
  template <int = 0>  // (instantiated where called)
  void prefill_item_amx(const Plan& plan, int64_t e, int64_t r0, int64_t r1, uint32_t* panel, uint32_t* tmp,
                        float* srow, int64_t sstride, float* cbuf) const {
    TileConfig cfg{};
    cfg.palette = 1;
    // 0-2 sums; 3 tokens; 4-6 panel (kF16: 3 and 4 the tokens' hi and lo, 5 and 6 a panel tile's hi and lo)
    for (int t = 0; t < 7; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    _tile_loadconfig(&cfg);
    const int64_t t0 = plan.offsets[e], nt = plan.tokens(e);
    const uint32_t* rows =
        reinterpret_cast<const uint32_t*>(pack_buf.as<uint8_t>() + pack_off_buf.as<int64_t>()[e]);
    constexpr int64_t ldc = PNR * 4, ldb = PNR * 4;
    const int64_t lda = amx_ld * 4;
    alignas(64) float outv[AMR * PNR];
    const uint32_t* panel_lo = panel + kc_dw * PNR;
    walk_panels<false, kF16>(e, r0, r1, ceil_div(nt, AMR), panel, tmp, srow, sstride,
                       [&](int64_t b, int64_t d0, int64_t kd, bool first, bool last, int64_t rp, int64_t re) {
      float* c = cbuf + (Kd > kc_dw ? b * AMR * PNR : 0);
      if (first) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
      } else {
        _tile_loadd(0, c, ldc);
        _tile_loadd(1, c + 16, ldc);
        _tile_loadd(2, c + 32, ldc);
      }
      const uint32_t* a = rows + b * AMR * amx_ld + d0;
      for (int64_t ks = 0; ks < kd; ks += 16) {  // (kd: a multiple of 16, as Kd and kc_dw are)
        const uint32_t* pb = panel + ks * PNR;
        if constexpr (kF16) {
          const uint32_t* pl = panel_lo + ks * PNR;
          _tile_loadd(3, a + ks, lda);
          _tile_loadd(4, a + Kd + ks, lda);
          // (GCC's tile intrinsics paste the tile number into the asm: literals)
#define QMOE_AMX_HILO(J)                  \
  _tile_loadd(5, pb + 16 * J, ldb);      \
  _tile_loadd(6, pl + 16 * J, ldb);      \
  _tile_dpbf16ps(J, 3, 5);               \
  _tile_dpbf16ps(J, 4, 5);               \
  _tile_dpbf16ps(J, 3, 6);
          QMOE_AMX_HILO(0)
          QMOE_AMX_HILO(1)
          QMOE_AMX_HILO(2)
#undef QMOE_AMX_HILO
        } else {
          _tile_loadd(3, a + ks, lda);
          _tile_loadd(4, pb, ldb);
          _tile_loadd(5, pb + 16, ldb);
          _tile_loadd(6, pb + 32, ldb);
          _tile_dpbf16ps(0, 3, 4);
          _tile_dpbf16ps(1, 3, 5);
          _tile_dpbf16ps(2, 3, 6);
        }
      }
      float* dst = last ? outv : c;
      _tile_stored(0, dst, ldc);
      _tile_stored(1, dst + 16, ldc);
      _tile_stored(2, dst + 32, ldc);
      if (!last) return;
      const int64_t mr = min64(AMR, nt - b * AMR);
      for (int64_t i = 0; i < mr; ++i) store_act<Act>(outv + i * PNR, out + (t0 + b * AMR + i) * N + rp, re - rp);
    });
    _tile_release();
  }
#endif

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

  // ------------------------------------------------- prefill, roles swapped
  // bf16 weights in K order with bf16 pairs (vdpbf16ps): tokens run along
  // the vector lanes and the weights are broadcast from their rows in place,
  // so no panel is built at all. The activations of a prefill expert are
  // packed once into blocks of PB = 48 tokens, [Kd][ld] dwords each, by
  // 16 x 16 transposes (zero slots past the tokens); each output tile takes
  // one 16 x 16 transpose before its store. Same products in the same K
  // order as prefill_item, so the same bits. Interleaved on E=4 N=K=4096,
  // 256 tokens an expert: 4% less time than the panel path. (Quantized
  // weights through a decode-only row panel [48][kd] (no transpose)
  // measured 1-4% slower than prefill_item, interleaved: the micro-kernel
  // reading a scratch panel ran ~5% slower than reading the weight rows
  // themselves even with the fill skipped, for reasons not found.)
  static constexpr int PB = 48;
  static constexpr bool kSwapOk = !kF16 && !Enc::kScaled && D::kVecs == 1;  // bf16 weights, bf16 activations
  bool swap_pf = false;  // the swapped prefill runs
  // Token blocks of an expert: 48 tokens each, the rest in one block of
  // round_up(rest, 16) slots, or (rest <= 16 after a full block) the last
  // 48 + rest tokens as two blocks of 32 (a 16-token block runs at half
  // the dot product rate: 16 broadcasts a vector load). Block b starts at
  // token (and slot) start, ld slots.
  static int64_t tblocks(int64_t nt) { return ceil_div(nt, PB); }
  static void tblock(int64_t nt, int64_t b, int64_t& start, int64_t& ld) {
    const int64_t rem = nt % PB;
    const bool split = rem > 0 && rem <= 16 && nt > PB;
    const int64_t nf = nt / PB - (split ? 1 : 0);
    start = b < nf ? b * PB : nf * PB + (b - nf) * 32;
    ld = b < nf ? PB : min64(round_up(nt - start, 16), split ? 32 : PB);
  }
  const uint32_t* packed(int64_t e) const {
    return reinterpret_cast<const uint32_t*>(pack_buf.as<uint8_t>() + pack_off_buf.as<int64_t>()[e]);
  }
  // Tokens [16 g, 16 g + 16) of prefill expert e into its packed blocks
  // (bf16 rows already in K order).
  void pack_tokens16(const Plan& plan, int64_t e, int64_t g) const {
    const int64_t t0 = plan.offsets[e], nt = plan.tokens(e);
    const uint32_t* src[16];
    for (int i = 0; i < 16; ++i)
      src[i] = 16 * g + i < nt ? reinterpret_cast<const uint32_t*>(act + (t0 + 16 * g + i) * K) : nullptr;
    int64_t b = 0, start = 0, ld = 0;
    for (;; ++b) {
      tblock(nt, b, start, ld);
      if (16 * g < start + ld) break;
    }
    uint32_t* blk = const_cast<uint32_t*>(packed(e)) + start * Kd + (16 * g - start);
    for (int64_t k = 0; k < Kd; k += 16) {
      VI r[16];
      for (int i = 0; i < 16; ++i) r[i] = src[i] ? loadu(src[i] + k) : _mm512_setzero_si512();
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(blk + (k + i) * ld, r[i]);
    }
  }
  // Rows [r0, r1) of prefill expert e, PNR = 48 at a time over K in chunks
  // of kc_dw dwords: every token block runs against the rows (MR rows x NV
  // token vectors a micro-kernel call); the next rows' weights are
  // prefetched into L2 meanwhile, as in prefill_item.
  void prefill_item_t(const Plan& plan, int64_t e, int64_t r0, int64_t r1, V* cbuf) const {
    const int64_t t0 = plan.offsets[e], nt = plan.tokens(e);
    const int64_t nblk = tblocks(nt);
    const uint32_t* pack = packed(e);
    alignas(64) float outt[16 * PNR];
    const int64_t pf_parts = min64(nblk, 8);
    for (int64_t rp = r0; rp < r1; rp += PNR) {
      const int64_t re = min64(r1, rp + PNR), nr = re - rp;
      for (int64_t d0 = 0; d0 < Kd; d0 += kc_dw) {
        const int64_t kd = min64(kc_dw, Kd - d0);
        int64_t nrp = rp, nd0 = d0 + kc_dw;  // the next rows' chunk
        if (nd0 >= Kd) nd0 = 0, nrp = rp + PNR;
        const bool has_next = nrp < r1;
        const uint32_t* ra[PNR];
        for (int64_t i = 0; i < PNR; ++i)  // rows past r1 repeat the last one
          ra[i] = reinterpret_cast<const uint32_t*>(w + (e * N + rp + min64(i, nr - 1)) * row_bytes) + d0;
        const bool first = d0 == 0, last = d0 + kd >= Kd;
        for (int64_t b = 0; b < nblk; ++b) {
          V* c = cbuf + (Kd > kc_dw ? b * 3 * PNR : 0);  // [row][nv] vectors
          int64_t start = 0, ld = 0;
          tblock(nt, b, start, ld);
          const uint32_t* pa = pack + start * Kd + d0 * ld;
          auto run_sub = [&](auto mr_c, auto nv_c) {
            constexpr int MR = decltype(mr_c)::value, NV = decltype(nv_c)::value;
            for (int64_t s = 0; s * MR < nr; ++s)
              prefill_micro_t<MR, NV>(ra + s * MR, pa, ld, kd, c + s * MR * NV, first);
          };
          const int64_t nv = ld / 16;
          if (nv == 3) run_sub(std::integral_constant<int, 8>{}, std::integral_constant<int, 3>{});
          else if (nv == 2) run_sub(std::integral_constant<int, 12>{}, std::integral_constant<int, 2>{});
          else run_sub(std::integral_constant<int, 16>{}, std::integral_constant<int, 1>{});
          if (has_next && b >= nblk - pf_parts)
            prefetch_panel<false>(e, nrp, min64(r1, nrp + PNR), nd0, min64(kc_dw, Kd - nd0),
                                  b - (nblk - pf_parts), pf_parts);
          if (!last) continue;
          for (int64_t j = 0; j < nv; ++j) {
            for (int64_t h = 0; h * 16 < nr; ++h) {
              VI r[16];
              for (int i = 0; i < 16; ++i) r[i] = _mm512_castps_si512(c[(16 * h + i) * nv + j]);
              transpose16(r);
              for (int i = 0; i < 16; ++i) _mm512_store_si512(outt + i * PNR + 16 * h, r[i]);
            }
            const int64_t tb = start + 16 * j, n = min64(16, nt - tb);
            for (int64_t i = 0; i < n; ++i) store_act<Act>(outt + i * PNR, out + (t0 + tb + i) * N + rp, nr);
          }
        }
      }
    }
  }

  // ------------------------------------------------------------ driver
  bool run() {
    if (!takes(p)) return false;
    const int64_t T = p.total_tokens;
    if (T == 0) return true;
    const int threads = pool_size();
    // Prefill items of up to 4 panels (the next panel's weights are
    // prefetched while one runs), fewer where that leaves < 16 items a thread.
    Plan plan(p, row_bytes, 4 * PNR, threads, PNR);
    pf32 = kF16 || !use_bf16_dot();
    dfma = !kNativeF16 && !use_bf16_dot();
    int64_t most = 0;  // tokens of the largest decode expert
    for (int64_t e = 0; e < plan.E; ++e)
      if (plan.is_decode_expert(e)) most = max64(most, plan.tokens(e));
    // Where FMA outruns the dot product (Intel), a decode of few tokens an
    // expert is bound by the decode's instructions, not the products: the
    // dot product's path (weights to bf16 pairs, one vdpbf16ps for 32, or
    // bf16 weights as they are) runs faster for bf16 activations (Intel
    // Xeon, one thread, L2-resident weights, GB/s of weights FMA -> dot: 1
    // token int2 8.7 -> 9.8, int4 14.6 -> 16.6, bf16 weights 43.7 -> 56.5;
    // 2 tokens int4 11.2 -> 10.2, bf16 weights 33.2 -> 41.4; bf16 weights 4
    // tokens 16.9 -> 22.7, 8 tokens 14.9 -> 13.9; fp16 activations and fp8
    // no faster; int8 takes the integer decode below).
    if (dfma && !kF16 && !forced_dot() && ((!Enc::kScaled && most <= 4) || (Enc::kBits <= 4 && most <= 1)))
      dfma = false;
    // Integer codes: the integer decode where vpdpwssd pays (use_i16_dot)
    // and for the tokens where it measured faster (Dec::kI16MaxTokens):
    // Intel Xeon, one thread, L2-resident, GB/s of weights FMA -> i16 (hi
    // and lo activation words): int8 1 token 15.8 -> 27.7, 2 tokens 13.5 ->
    // 12.3, 4 tokens 8.3 -> 5.5; int4 1 token 14.9 -> 16.7 (the bf16 dot
    // product above: 16.6), 2 tokens 11.9 -> 9.0; int2 1 token 9.2 -> 9.0.
    // (With the hi words alone it ran int2 at 12.4, int4 at 19.2 and int8 at
    // 38 GB/s, 1 token, but a one-row product of 128 weights missed the
    // tests' 1e-2 / 2e-3 tolerances by up to 8x: the activations' fixed
    // point loses the small elements of a group.)
    if constexpr (kI16Ok)
      i16 = use_i16_dot() && gs % 16 == 0 && double(gs) * D::kI16Max * 32767.0 < 2147483647.0 &&
            (most <= D::kI16MaxTokens || forced_dot() == 'i');
    Kd = pf32 ? Kp : Kp / 2;
    kc_dw = min64(Kd, 2048);
    // bf16 activations already in the panel's K order (no permutation or
    // padding): the micro-kernel broadcasts from the rows in place instead
    // of a packed copy (the pack's extra pass over the activations measured
    // 1-3% of a 256-token prefill call).
    direct_pf = !pf32 && D::kVecs == 1 && K % 32 == 0;
    swap_pf = kSwapOk && !pf32 && K % 32 == 0;
    if (swap_pf) direct_pf = false;
    // AMX: the bf16 panels against token rows (fp16 activations with their
    // and the weights' low halves).
    amx_pf = amx_ready();
    if (kF16 && amx_pf && !amx_forced()) {  // fp16: two panels to decode, from 24 tokens an expert
      // (Intel Xeon, two interleaved rounds: ARK's rows of 32-76 tokens an
      // expert 1.2-1.6x the speed of FMA, 256 tokens 2.1x; 16 tokens 0.8x)
      amx_pf = plan.prefill_tokens >= 24 * plan.prefill_experts;
    }
    if (amx_pf) pf32 = direct_pf = swap_pf = false, Kd = Kp / 2, kc_dw = min64(Kd, 2048);
    // The token rows (kF16: hi, then lo) one cache line longer: a tile load
    // reads 16 rows, which at a multiple of 4 KB apart would share one L1 set.
    amx_ld = (kF16 ? 2 * Kd : Kd) + 16;

    // Decode tokens: prepared rows (bf16 activations in place when no
    // permutation or padding is needed) and per-group sums.
    direct = !kF16 && !dfma && !i16 && D::kVecs == 1 && K % 32 == 0;
    if (!direct && plan.decode_tokens > 0) {
      stride = Kp * (kF16 || dfma || i16 ? 4 : 2);  // (i16: hi, then lo words)
      act_buf.alloc(size_t(T * stride));
    }
    const bool need_asum = (kCorr || i16) && plan.decode_tokens > 0;  // (i16: the activation scales live there)
    if (need_asum) {
      asum_ld = kSums * G + (i16 ? G + 16 : 0);
      asum_buf.alloc(size_t(T * asum_ld * 4));
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
        if (nt > kDecodeMaxTokens && swap_pf) {
          bytes += round_up(nt, 16) * Kd * 4;
          max_blocks = max64(max_blocks, tblocks(nt));
        } else if (nt > kDecodeMaxTokens && amx_pf) {  // token rows, 16 a tile
          bytes += round_up(nt, 16) * amx_ld * 4;
          max_blocks = max64(max_blocks, ceil_div(nt, 16));
        } else if (nt > kDecodeMaxTokens) {
          if (!direct_pf) bytes += ceil_div(nt, PMR) * PMR * Kd * 4;
          max_blocks = max64(max_blocks, ceil_div(nt, PMR));
        }
      }
      pack_buf.alloc(size_t(bytes));
      for (int64_t e = 0; e < plan.E; ++e) {  // zero the padding slots of the last block
        const int64_t nt = plan.tokens(e);
        if (nt > kDecodeMaxTokens && amx_pf && nt % 16)  // the last tile's padding rows
          std::memset(pack_buf.as<uint8_t>() + off[e] + nt * amx_ld * 4, 0,
                      size_t((round_up(nt, 16) - nt) * amx_ld * 4));
        else if (nt > kDecodeMaxTokens && nt % 4 && !direct_pf && !swap_pf && !amx_pf)  // padding slots of the last block
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
            if (need_asum && !i16) prep_asum(t);  // (i16: prep_token_i16's own sums)
          } else if (amx_pf) {  // the token's row in the panel's K order (kF16: hi, then lo)
            prep_token_into(t, kF16 ? ActMode::hilo : ActMode::bf16,
                            pack_buf.as<uint8_t>() + pack_off_buf.as<int64_t>()[e] + (t - plan.offsets[e]) * amx_ld * 4);
          } else if (!direct_pf && !swap_pf) {
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
    if (swap_pf && plan.prefill_tokens > 0) {  // pack the prefill experts' activations, 16 tokens a task
      int64_t ntask = 0;
      for (int64_t e = 0; e < plan.E; ++e)
        if (!plan.is_decode_expert(e)) ntask += ceil_div(plan.tokens(e), 16);
      auto pack = [&](int64_t i, int) {
        int64_t e = 0;
        for (;; ++e) {
          if (plan.is_decode_expert(e)) continue;
          const int64_t n = ceil_div(plan.tokens(e), 16);
          if (i < n) break;
          i -= n;
        }
        if constexpr (kSwapOk) pack_tokens16(plan, e, i);
      };
      parallel(ntask, pack);
    }

    // Decode weight streams are prefetched this far ahead: the same place
    // of a later row of the same stream (each of a step's R rows runs on
    // through consecutive rows), at least kPrefetchMin bytes on.
    pf_dist = ceil_div(kPrefetchMin, row_bytes) * row_bytes;

    // Per-worker scratch. Decode: scales and s * (offset + z) of the R rows
    // of a step (+16 floats of slack for full-vector loads), results.
    // Prefill: panel, unit buffer, scales of 16 rows, running tiles when K
    // takes several chunks.
    const int64_t res_elems = kResLd * kDecodeMaxTokens;
    const int64_t sc_elems = round_up(G + 16, 16);
    sstride_ = sc_elems;
    const int64_t tot_bytes = 0;
    const int64_t small = round_up((8 * sc_elems + res_elems) * 4, 64);
    int64_t pre_bytes = 0, panel_bytes = 0, tmp_bytes = 0, srow_bytes = 0;
    if (plan.prefill_tokens > 0) {
      panel_bytes = swap_pf ? 0 : kc_dw * PNR * 4 * (amx_pf && kF16 ? 2 : 1);  // (AMX, fp16: hi and lo)
      tmp_bytes = 16 * (pf32 ? D::kUnit : D::kUnit / 2) * 4;
      srow_bytes = 2 * 16 * sc_elems * 4;
      pre_bytes = panel_bytes + tmp_bytes + srow_bytes +
                  (swap_pf  ? (Kd > kc_dw ? max_blocks : 1) * 3 * PNR * 64
                   : amx_pf ? (Kd > kc_dw ? max_blocks : 1) * 16 * PNR * 4
                            : (Kd > kc_dw ? max_blocks * PMR * 3 * 64 : PMR * 3 * 64));
    }
    const int64_t per = tot_bytes + small + round_up(pre_bytes, 64);
    CachedBuf<1> scratch;
    scratch.alloc(size_t(per * threads));

    auto body = [&](int64_t i, int wk) {
      const Item& it = plan.items[i];
      uint8_t* s = scratch.as<uint8_t>() + wk * per;
      float* sbuf = reinterpret_cast<float*>(s + tot_bytes);
      float* res = sbuf + 8 * sc_elems;
      const int64_t e = it.expert, t0 = plan.offsets[e], nt = plan.tokens(e);
      if (!it.decode) {
        uint8_t* q = s + tot_bytes + small;
        uint32_t* panel = reinterpret_cast<uint32_t*>(q);
        uint32_t* tmp = reinterpret_cast<uint32_t*>(q + panel_bytes);
        float* srow = reinterpret_cast<float*>(q + panel_bytes + tmp_bytes);
        V* cbuf = reinterpret_cast<V*>(q + panel_bytes + tmp_bytes + srow_bytes);
        if (swap_pf) {
          if constexpr (kSwapOk) prefill_item_t(plan, e, it.r0, it.r1, cbuf);
        } else if (amx_pf) {
#if defined(QMOE_AMX)
          prefill_item_amx(plan, e, it.r0, it.r1, panel, tmp, srow, sc_elems, reinterpret_cast<float*>(cbuf));
#endif
        } else if (pf32)
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
        as[t] = asum ? asum + tt * asum_ld : nullptr;
      }
      auto rows = [&](auto nt_c) {
        constexpr int NT = decltype(nt_c)::value;
        if constexpr (kI16Ok)
          if (i16) return decode_rows<NT, kDotI16>(e, it.r0, it.r1, t0, nt, a, as, sbuf, res);
        if (dfma)
          decode_rows<NT, kDotFma>(e, it.r0, it.r1, t0, nt, a, as, sbuf, res);
        else
          decode_rows<NT, kDotBf16>(e, it.r0, it.r1, t0, nt, a, as, sbuf, res);
      };
      // The expert's own token count (padding 3 to 4 or 5 to 8 costs up
      // to 60% more dot products where they bound it); 7 takes 8 (14
      // accumulators and running sums a row would not fit the registers).
      switch (nt) {
        case 1: rows(std::integral_constant<int, 1>{}); break;
        case 2: rows(std::integral_constant<int, 2>{}); break;
        case 3: rows(std::integral_constant<int, 3>{}); break;
        case 4: rows(std::integral_constant<int, 4>{}); break;
        case 5: rows(std::integral_constant<int, 5>{}); break;
        case 6: rows(std::integral_constant<int, 6>{}); break;
        default: rows(std::integral_constant<int, 8>{}); break;
      }
    };
    parallel(plan.n_items, body);
    return true;
  }
};

}  // namespace

bool avx512_uses_bf16_dot() { return use_bf16_dot(); }
bool avx512_uses_amx() { return amx_ready(); }

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
