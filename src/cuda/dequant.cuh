// Register dequantization for the CUDA kernels: packed weight codes to pairs
// of 16-bit floats (f16x2 / bf16x2) that tensor-core instructions can take.
//
// One decoder per (activation type, encoding) of core/encoding.h; each takes
// its constants (bits, packing, signedness, fp8 exponent and mantissa widths)
// from the encoding trait, so an encoding is still described in one place.
// The decoders are bit tricks (no lookup tables, no conversion instructions
// that sm_80 lacks) and are exact: they produce the trait's `value(code)`
// minus the zero point, with no rounding, for every code.
//
// Contract of Dequant<Act, Enc>:
//   kWordPairs          pairs produced from one 32-bit word of packed codes
//   Zero zero(float z)  per-group constants; z is the zero point (asym) and is
//                       ignored for symmetric encodings
//   word(w, zc, out)    out[i] = (v(2i) - z, v(2i+1) - z) as a 16-bit pair, for
//                       the elements 2i, 2i+1 of the word in K order (low half
//                       = lower k), v = Enc::value
//   kPostScale          the pairs are value * 2^-log2(kPostScale): a float
//                       factor for whoever applies the scale in fp32 (only f16
//                       e4m3 uses it: its pairs keep fp8's range exactly)
//   exact(pair)         multiplies that factor back in 16-bit (exact)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "core/encoding.h"

namespace qmoe::cuda {

// ---------------------------------------------------------------------------
// 16-bit float pairs held in a 32-bit register, per activation type.
// ---------------------------------------------------------------------------
template <class Act>
struct Half;

template <>
struct Half<ActF16> {
  static constexpr int kMant = 10, kBias = 15;
  __device__ static __forceinline__ __half2 h2(uint32_t u) {
    __half2 r;
    memcpy(&r, &u, 4);
    return r;
  }
  __device__ static __forceinline__ uint32_t u32(__half2 h) {
    uint32_t r;
    memcpy(&r, &h, 4);
    return r;
  }
  __device__ static __forceinline__ uint32_t fma(uint32_t a, uint32_t b, uint32_t c) {
    return u32(__hfma2(h2(a), h2(b), h2(c)));
  }
  __device__ static __forceinline__ uint32_t mul(uint32_t a, uint32_t b) {
    return u32(__hmul2(h2(a), h2(b)));
  }
  __device__ static __forceinline__ uint32_t add(uint32_t a, uint32_t b) {
    return u32(__hadd2(h2(a), h2(b)));
  }
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    return u32(__floats2half2_rn(lo, hi));
  }
  __device__ static __forceinline__ float to_float(uint16_t h) {
    return __half2float(__ushort_as_half(h));
  }
  __device__ static __forceinline__ uint16_t from_float(float f) {
    return __half_as_ushort(__float2half_rn(f));
  }
};

template <>
struct Half<ActBF16> {
  static constexpr int kMant = 7, kBias = 127;
  __device__ static __forceinline__ __nv_bfloat162 h2(uint32_t u) {
    __nv_bfloat162 r;
    memcpy(&r, &u, 4);
    return r;
  }
  __device__ static __forceinline__ uint32_t u32(__nv_bfloat162 h) {
    uint32_t r;
    memcpy(&r, &h, 4);
    return r;
  }
  __device__ static __forceinline__ uint32_t fma(uint32_t a, uint32_t b, uint32_t c) {
    return u32(__hfma2(h2(a), h2(b), h2(c)));
  }
  __device__ static __forceinline__ uint32_t mul(uint32_t a, uint32_t b) {
    return u32(__hmul2(h2(a), h2(b)));
  }
  __device__ static __forceinline__ uint32_t add(uint32_t a, uint32_t b) {
    return u32(__hadd2(h2(a), h2(b)));
  }
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    return u32(__floats2bfloat162_rn(lo, hi));
  }
  __device__ static __forceinline__ float to_float(uint16_t h) {
    return __uint_as_float(uint32_t(h) << 16);
  }
  __device__ static __forceinline__ uint16_t from_float(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
};

// Bits of 2^e in Act's 16-bit format, in both halves of a pair.
template <class Act>
constexpr uint32_t pow2_pair(int e_lo, int e_hi) {
  using H = Half<Act>;
  return (uint32_t(H::kBias + e_lo) << H::kMant) | (uint32_t(H::kBias + e_hi) << (H::kMant + 16));
}
// 2^kMant in both halves: the float whose mantissa holds an integer 0..2^kMant-1 exactly.
template <class Act>
constexpr uint32_t magic_pair() {
  return pow2_pair<Act>(Half<Act>::kMant, Half<Act>::kMant);
}

// A byte replicated into every byte of a word.
constexpr uint32_t repeat_byte(uint32_t b) { return b * 0x01010101u; }

// ---------------------------------------------------------------------------
// The decoders.
// ---------------------------------------------------------------------------
template <class Act, class Enc>
struct Dequant;

// 16-bit weights: the word already is a pair.
template <class Act>
struct Dequant<Act, Native16Encoding<Act>> {
  static constexpr int kWordPairs = 1;
  static constexpr float kPostScale = 1.0f;
  struct Zero {};
  __device__ static __forceinline__ Zero zero(float) { return {}; }
  __device__ static __forceinline__ void word(uint32_t w, const Zero&, uint32_t* out) { out[0] = w; }
  __device__ static __forceinline__ uint32_t exact(uint32_t p) { return p; }
};

// (a & B) ^ c in one LOP3 (the compiler splits it in two when B and c are
// both constants).
template <uint32_t B>
__device__ __forceinline__ uint32_t and_xor(uint32_t a, uint32_t c) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0x6A;" : "=r"(r) : "r"(a), "n"(B), "r"(c));
  return r;
}

// int8 / int4 / int2, symmetric (two's complement) or asymmetric (unsigned).
// Symmetric codes are made unsigned by flipping their top bit (q + 2^(b-1)),
// so both cases decode an unsigned field u and subtract a zero (z, or 2^(b-1)).
// A field placed in the low bits of the mantissa of 2^kMant reads
// 2^kMant + u exactly; one 16-bit subtraction per pair removes the magic and
// the zero, exactly. A pair (2i, 2i+1) comes from one byte: PRMT puts that
// byte of w into the low half and of w >> bits into the high half, one LOP3
// keeps the field, sets the magic and flips the top bit of a symmetric field,
// one HADD2 subtracts (int8 instead takes the magic bytes in its PRMT).
template <class Act, int Bits, bool Asym>
struct IntDequant {
  using H = Half<Act>;
  static constexpr int kFields = 8 / Bits;  // codes per byte
  static constexpr int kWordPairs = 32 / Bits / 2;
  static constexpr float kPostScale = 1.0f;
  static constexpr uint32_t kField = (1u << Bits) - 1;
  static constexpr uint32_t kFlip = repeat_byte(1u << (Bits - 1));  // int8: sign of every byte
  static constexpr float kSymZero = float(1 << (Bits - 1));  // == -Enc::kQmin
  static constexpr float kMagic = float(1 << Half<Act>::kMant);
  // int8 with bf16 (7 mantissa bits) does not fit the 16-bit magic: fp32 route.
  static constexpr bool kViaF32 = Bits == 8 && Half<Act>::kMant < 8;

  struct Zero {
    uint32_t c;   // 16-bit route: -(2^kMant + z) in both halves
    uint32_t c4;  // int2, fields 4 bits up: -(2^kMant / 16 + z)
    float f;      // fp32 route: -(2^23 + z)
  };

  __device__ static __forceinline__ Zero zero(float z) {
    if constexpr (!Asym) z = kSymZero;
    Zero r{};
    if constexpr (kViaF32) {
      r.f = -(8388608.0f + z);
    } else {
      r.c = H::pack(-(kMagic + z), -(kMagic + z));
      if constexpr (Bits == 2) r.c4 = H::pack(-(kMagic / 16 + z), -(kMagic / 16 + z));
    }
    return r;
  }

  __device__ static __forceinline__ void word(uint32_t w, const Zero& zc, uint32_t* out) {
    // Symmetric fields: flip their top bit (inside the LOP3 for int4/int2).
    constexpr uint32_t kTop = Asym ? 0u : (1u << (Bits - 1)) * 0x10001u;
    if constexpr (!Asym && Bits == 8) w ^= kFlip;
    if constexpr (kViaF32) {
      // Byte j into the mantissa of 2^23 (0x4B000000): 2^23 + u, exact in fp32.
      float f[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) f[j] = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7440u | j)) + zc.f;
      out[0] = H::pack(f[0], f[1]);
      out[1] = H::pack(f[2], f[3]);
    } else if constexpr (Bits == 8) {
      // Bytes (0,1) and (2,3) into the low byte of each half, magic above.
      constexpr uint32_t kMagicByte = magic_pair<Act>() >> 8 & 0xffu;
      static_assert((magic_pair<Act>() & 0xffu) == 0, "the magic's low byte must be free");
      const uint32_t m = repeat_byte(kMagicByte);
      out[0] = H::add(__byte_perm(w, m, 0x4140u), zc.c);
      out[1] = H::add(__byte_perm(w, m, 0x4342u), zc.c);
    } else if constexpr (Bits == 4) {
      // Byte j of w (field 2j at bit 0) in the low half, of w >> 4 (field 2j+1) in the high half.
      const uint32_t w4 = w >> 4;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t v = __byte_perm(w, w4, uint32_t(j) * 0x11u | uint32_t(4 + j) * 0x1100u);
        out[j] = H::add(and_xor<kField * 0x10001u>(v, magic_pair<Act>() | kTop), zc.c);
      }
    } else {
      // Byte j of w (fields 4j..4j+3 at bits 0,2,4,6) in the low half, of
      // w >> 2 (fields 4j+1.. at bits 0,2,4) in the high half: pair (4j, 4j+1)
      // at bit 0, pair (4j+2, 4j+3) at bit 4 (16 u, fits the mantissa; *1/16 exact).
      const uint32_t w2 = w >> 2;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t v = __byte_perm(w, w2, uint32_t(j) * 0x11u | uint32_t(4 + j) * 0x1100u);
        out[2 * j] = H::add(and_xor<kField * 0x10001u>(v, magic_pair<Act>() | kTop), zc.c);
        out[2 * j + 1] =
            H::fma(and_xor<(kField << 4) * 0x10001u>(v, magic_pair<Act>() | kTop << 4), pow2_pair<Act>(-4, -4), zc.c4);
      }
    }
  }
  __device__ static __forceinline__ uint32_t exact(uint32_t p) { return p; }
};

template <class Act, int Bits, bool Asym>
struct Dequant<Act, IntEncoding<Bits, Asym>> : IntDequant<Act, Bits, Asym> {
  using Enc = IntEncoding<Bits, Asym>;
  static_assert(Enc::kPerByte == 8 / Bits && Enc::kMask == (1u << Bits) - 1, "trait mismatch");
  static_assert(Asym || Enc::kQmin == -(1 << (Bits - 1)), "symmetric codes are two's complement");
};

// FP8 (OCP E4M3FN / E5M2) into f16 or bf16 by moving the sign, exponent and
// mantissa fields into place: the result is the fp8 value times
// 2^(fp8 bias - 16-bit bias), exactly (fp8 subnormals land on 16-bit
// subnormals of the same value). For bf16 the power of two is multiplied back
// at once (exact); for f16 e4m3 it is left to the caller (kPostScale), which
// keeps the tensor-core operands inside f16's range without a multiply.
template <class Act, class Format>
struct Fp8Dequant {
  using H = Half<Act>;
  static constexpr int kWordPairs = 2;
  static constexpr int kShift = H::kMant - Format::kManBits;  // bit of the fp8 mantissa LSB
  static constexpr int kGap = H::kBias - Format::kBias;        // exponent bias difference
  static constexpr bool kFixNow = H::kMant < 10;               // bf16: multiply 2^kGap now
  static constexpr float kPostScale = kFixNow ? 1.0f : float(1ull << kGap);
  struct Zero {};
  __device__ static __forceinline__ Zero zero(float) { return {}; }

  __device__ static __forceinline__ uint32_t pair(uint32_t y) {  // y: fp8 codes in bits 8..15 of each half
    uint32_t r;
    if constexpr (kShift == 8) {
      r = y;
    } else {
      constexpr uint32_t kMag = (0x7fu << kShift) * 0x10001u;
      r = ((y >> (8 - kShift)) & kMag) | (y & 0x80008000u);
    }
    if constexpr (kFixNow) r = H::mul(r, pow2_pair<Act>(kGap, kGap));
    return r;
  }
  __device__ static __forceinline__ void word(uint32_t w, const Zero&, uint32_t* out) {
    out[0] = pair(__byte_perm(w, 0u, 0x1404u));
    out[1] = pair(__byte_perm(w, 0u, 0x3424u));
  }
  __device__ static __forceinline__ uint32_t exact(uint32_t p) {
    if constexpr (kFixNow || kGap == 0) return p;
    else return H::mul(p, pow2_pair<Act>(kGap, kGap));
  }
};

template <class Act, class Format, WeightType Type>
struct Dequant<Act, Fp8Encoding<Format, Type>> : Fp8Dequant<Act, Format> {
  static_assert(Format::kExpBits + Format::kManBits == 7, "fp8: 1 sign, 7 exponent+mantissa bits");
};

}  // namespace qmoe::cuda
