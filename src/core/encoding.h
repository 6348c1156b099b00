// The weight encodings of DESIGN.md §2 as one family of small traits.
//
// Every kernel — CPU reference, CPU fast, CUDA decode, CUDA prefill — reads
// weights through these traits, so an encoding is described in exactly one
// place. A trait says how wide a code is, how codes are packed into a row,
// what float a code stands for before scaling, and (host side) how a float is
// rounded to a code. Fast kernels may decode many codes at once with their
// own bit tricks, but they take the constants (bits, signedness, packing)
// from here and are tested against the scalar `value` below.
//
// This header is plain C++ that nvcc can also compile for the device.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "qmoe/qmoe.h"

#if defined(__CUDACC__)
#define QMOE_HD __host__ __device__ __forceinline__
#else
#define QMOE_HD inline
#endif

namespace qmoe {

// ---------------------------------------------------------------------------
// Scalar conversions, bit-exact, usable on host and device.
// ---------------------------------------------------------------------------
QMOE_HD float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
QMOE_HD uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

QMOE_HD float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    const float v = float(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (man << 13));  // inf / nan
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

// Round to nearest, ties to even; overflow gives inf, NaN stays NaN.
QMOE_HD uint16_t float_to_f16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
  if (absu >= 0x477ff000u) return uint16_t(sign | 0x7c00u); // >= 65520: inf
  if (absu < 0x38800000u) {                                 // below 2^-14: subnormal
    // value / 2^-24, rounded to nearest even (exact in float arithmetic).
    const float scaled = bits_to_float(absu) * 16777216.0f;
    const float r = rintf(scaled);
    return uint16_t(sign | uint32_t(r));
  }
  const uint32_t rounded = absu + 0xfffu + ((absu >> 13) & 1u);  // RNE on 13 dropped bits
  return uint16_t(sign | ((rounded - 0x38000000u) >> 13));
}

QMOE_HD float bf16_to_float(uint16_t b) { return bits_to_float(uint32_t(b) << 16); }

QMOE_HD uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// OCP FP8. E4M3FN: bias 7, no inf, 0x7f/0xff are NaN, max 448.
// E5M2: bias 15, IEEE-like with inf and NaN, max 57344.
template <int ExpBits, int ManBits>
struct Fp8Format {
  static constexpr int kExpBits = ExpBits;
  static constexpr int kManBits = ManBits;
  static constexpr int kBias = (1 << (ExpBits - 1)) - 1;
  static constexpr bool kHasInf = (ExpBits == 5);
  static constexpr float kMax = ExpBits == 4 ? 448.0f : 57344.0f;

  QMOE_HD static bool is_nan(uint32_t code) {
    const uint32_t mag = code & 0x7fu;
    return kHasInf ? (mag > 0x7cu) : (mag == 0x7fu);
  }

  QMOE_HD static float to_float(uint32_t code) {
    const bool neg = (code & 0x80u) != 0;
    const uint32_t exp = (code >> ManBits) & ((1u << ExpBits) - 1);
    const uint32_t man = code & ((1u << ManBits) - 1);
    float v;
    if (is_nan(code)) {
      v = bits_to_float(0x7fc00000u);
    } else if (kHasInf && exp == (1u << ExpBits) - 1) {
      v = bits_to_float(0x7f800000u);
    } else if (exp == 0) {  // subnormal: man * 2^(1 - bias - man_bits)
      v = ldexpf(float(man), 1 - kBias - ManBits);
    } else {
      v = bits_to_float(((exp - kBias + 127) << 23) | (man << (23 - ManBits)));
    }
    return neg ? -v : v;
  }

  // Saturating cast (to +-max), round to nearest even; NaN maps to NaN.
  QMOE_HD static uint32_t from_float(float x) {
    const uint32_t sign = (float_to_bits(x) >> 24) & 0x80u;
    if (x != x) return kHasInf ? 0x7fu : 0x7fu;
    float a = fabsf(x);
    if (a >= kMax) a = kMax;
    // Spacing of representable values around a (subnormal spacing below 2^(1-bias)).
    int e;
    frexpf(a, &e);  // a = m * 2^e, m in [0.5, 1)
    int exp_unbiased = e - 1;
    if (exp_unbiased < 1 - kBias) exp_unbiased = 1 - kBias;
    const float quantum = ldexpf(1.0f, exp_unbiased - ManBits);
    float r = rintf(a / quantum) * quantum;  // exact division by a power of two
    if (r > kMax) r = kMax;
    // Encode r exactly.
    if (r == 0.0f) return sign;
    int re;
    frexpf(r, &re);
    int rexp = re - 1 + kBias;
    uint32_t code;
    if (rexp <= 0) {  // subnormal
      code = uint32_t(rintf(ldexpf(r, kBias - 1 + ManBits)));
    } else {
      const float frac = ldexpf(r, -(re - 1)) - 1.0f;  // in [0, 1)
      code = (uint32_t(rexp) << ManBits) | uint32_t(rintf(ldexpf(frac, ManBits)));
    }
    return sign | code;
  }
};
using Fp8E4M3 = Fp8Format<4, 3>;
using Fp8E5M2 = Fp8Format<5, 2>;

// ---------------------------------------------------------------------------
// Activation types: 16-bit storage, float arithmetic.
// ---------------------------------------------------------------------------
struct ActF16 {
  static constexpr ActType type = ActType::f16;
  QMOE_HD static float to_float(uint16_t h) { return f16_to_float(h); }
  QMOE_HD static uint16_t from_float(float f) { return float_to_f16(f); }
};
struct ActBF16 {
  static constexpr ActType type = ActType::bf16;
  QMOE_HD static float to_float(uint16_t h) { return bf16_to_float(h); }
  QMOE_HD static uint16_t from_float(float f) { return float_to_bf16(f); }
};

// ---------------------------------------------------------------------------
// Weight encodings. Common members:
//   kType, kBits, kPerByte (codes per byte; 0 for 16-bit), kScaled, kAsym
//   code(row, k)   raw code of element k of a packed row (row = first byte)
//   value(code)    float the code stands for before scale / zero
//   (host) encode(x) and put(row, k, code) for the quantizers
// dequantized weight = (value(code) - zero) * scale   (zero = 0 unless kAsym)
// ---------------------------------------------------------------------------
template <int Bits, bool Asym>
struct IntEncoding {
  static_assert(Bits == 8 || Bits == 4 || Bits == 2, "int8, int4 or int2");
  static constexpr WeightType kType =
      Bits == 8 ? WeightType::int8 : (Bits == 4 ? WeightType::int4 : WeightType::int2);
  static constexpr int kBits = Bits;
  static constexpr int kPerByte = 8 / Bits;
  static constexpr bool kScaled = true;
  static constexpr bool kAsym = Asym;
  static constexpr uint32_t kMask = (1u << Bits) - 1;
  static constexpr int kQmin = Asym ? 0 : -(1 << (Bits - 1));
  static constexpr int kQmax = Asym ? (1 << Bits) - 1 : (1 << (Bits - 1)) - 1;

  QMOE_HD static uint32_t code(const uint8_t* row, int64_t k) {
    return (uint32_t(row[k / kPerByte]) >> ((k % kPerByte) * Bits)) & kMask;
  }
  // Sym codes are two's complement; asym codes are unsigned.
  QMOE_HD static float value(uint32_t c) {
    if constexpr (Asym) return float(c);
    return float(int32_t(c << (32 - Bits)) >> (32 - Bits));
  }
  // x is already divided by the scale (and shifted by the zero for asym).
  static uint32_t encode(float x) {
    float r = std::nearbyint(x);
    if (!(r >= float(kQmin))) r = float(kQmin);  // also catches NaN
    if (r > float(kQmax)) r = float(kQmax);
    return uint32_t(int32_t(r)) & kMask;
  }
  static void put(uint8_t* row, int64_t k, uint32_t c) {
    const int shift = int(k % kPerByte) * Bits;
    uint8_t& b = row[k / kPerByte];
    b = uint8_t((b & ~(kMask << shift)) | ((c & kMask) << shift));
  }
};

template <class Format, WeightType Type>
struct Fp8Encoding {
  static constexpr WeightType kType = Type;
  static constexpr int kBits = 8;
  static constexpr int kPerByte = 1;
  static constexpr bool kScaled = true;
  static constexpr bool kAsym = false;
  static constexpr float kMax = Format::kMax;
  using format = Format;

  QMOE_HD static uint32_t code(const uint8_t* row, int64_t k) { return row[k]; }
  QMOE_HD static float value(uint32_t c) { return Format::to_float(c); }
  static uint32_t encode(float x) { return Format::from_float(x); }
  static void put(uint8_t* row, int64_t k, uint32_t c) { row[k] = uint8_t(c); }
};

// Weights in the activation dtype: no scale, no zero.
template <class Act>
struct Native16Encoding {
  static constexpr WeightType kType = WeightType::native16;
  static constexpr int kBits = 16;
  static constexpr int kPerByte = 0;
  static constexpr bool kScaled = false;
  static constexpr bool kAsym = false;
  using act = Act;

  QMOE_HD static uint32_t code(const uint8_t* row, int64_t k) {
    uint16_t h;
    std::memcpy(&h, row + 2 * k, 2);
    return h;
  }
  QMOE_HD static float value(uint32_t c) { return Act::to_float(uint16_t(c)); }
  static uint32_t encode(float x) { return Act::from_float(x); }
  static void put(uint8_t* row, int64_t k, uint32_t c) {
    const uint16_t h = uint16_t(c);
    std::memcpy(row + 2 * k, &h, 2);
  }
};

using Int8Sym = IntEncoding<8, false>;
using Int8Asym = IntEncoding<8, true>;
using Int4Sym = IntEncoding<4, false>;
using Int4Asym = IntEncoding<4, true>;
using Int2Sym = IntEncoding<2, false>;
using Int2Asym = IntEncoding<2, true>;
using Fp8E4M3Enc = Fp8Encoding<Fp8E4M3, WeightType::fp8_e4m3>;
using Fp8E5M2Enc = Fp8Encoding<Fp8E5M2, WeightType::fp8_e5m2>;

// Bytes of one packed row of K elements.
template <class Enc>
QMOE_HD constexpr int64_t row_bytes(int64_t k) {
  return Enc::kBits == 16 ? 2 * k : k * Enc::kBits / 8;
}

// ---------------------------------------------------------------------------
// The one run-time -> compile-time dispatch. `f` is called with a
// value-initialised Act tag and Enc tag: f(ActF16{}, Int4Sym{}).
// Returns false for combinations that do not exist (asym fp8/native16).
// ---------------------------------------------------------------------------
template <class F>
bool visit_act(ActType a, F&& f) {
  switch (a) {
    case ActType::f16: f(ActF16{}); return true;
    case ActType::bf16: f(ActBF16{}); return true;
  }
  return false;
}

template <class F>
bool visit_encoding(ActType a, WeightType w, bool asym, F&& f) {
  const bool has_zero = w == WeightType::int8 || w == WeightType::int4 || w == WeightType::int2;
  if (asym && !has_zero) return false;
  return visit_act(a, [&](auto act) {
    using Act = decltype(act);
    switch (w) {
      case WeightType::native16: f(act, Native16Encoding<Act>{}); break;
      case WeightType::int8: asym ? f(act, Int8Asym{}) : f(act, Int8Sym{}); break;
      case WeightType::int4: asym ? f(act, Int4Asym{}) : f(act, Int4Sym{}); break;
      case WeightType::int2: asym ? f(act, Int2Asym{}) : f(act, Int2Sym{}); break;
      case WeightType::fp8_e4m3: f(act, Fp8E4M3Enc{}); break;
      case WeightType::fp8_e5m2: f(act, Fp8E5M2Enc{}); break;
    }
  });
}

}  // namespace qmoe
