// Register decode of packed weight codes for the prefill tensor-core kernel.
//
// The prefill kernel (prefill_mma.cuh) gives every lane 8 contiguous k values
// of a weight row per 32-wide k chunk (see the k mapping there), so a lane's
// codes are `Enc::kBits` contiguous bytes: int2 2 bytes, int4 4, int8/fp8 8,
// 16-bit 16. PrefillDecode<Act, Enc>::decode turns them into the four 32-bit
// B-fragment registers of two m16n8k16 steps: b[0] = (k0,k1), b[1] = (k2,k3)
// for the first step, b[2] = (k4,k5), b[3] = (k6,k7) for the second, low half
// = lower k, each the dequantized weight (value - zero) * scale in the
// activation dtype.
//
// Every decoder is exact up to the final rounding of (value - zero) * scale:
// the code is turned into an exact small integer or float in 16 bits (magic
// number tricks: 0x6400 | n is 1024 + n in f16, 0x4300 | n is 128 + n in
// bf16), the zero point (and the magic) is subtracted exactly, and one
// multiply by the scale rounds once. The per-group constants (scale pair, and
// zero-point bias for asym) are prepared once per group by the loader
// (scale_word / bias_word) and kept in shared memory.
//
// Constants (bits, signedness, packing) come from the encoding traits of
// core/encoding.h; the decoders are tested against Enc::value through the
// float64 reference of the tests.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "core/encoding.h"

namespace qmoe::cuda::prefill {

// ---------------------------------------------------------------------------
// 16-bit pair arithmetic per activation type (one instruction each on sm_80
// and sm_90; bf16 add/mul go through fma, which sm_80 has).
// ---------------------------------------------------------------------------
template <class Act>
struct Pair;

template <>
struct Pair<ActF16> {
  static constexpr uint32_t kMagic = 0x6400u;  // 1024.0
  static constexpr float kMagicF = 1024.0f;
  static constexpr uint32_t kOne = 0x3c00u, kQuarter = 0x3400u;
  __device__ static __forceinline__ uint32_t add(uint32_t a, uint32_t b) {
    uint32_t d;
    asm("add.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
  }
  __device__ static __forceinline__ uint32_t mul(uint32_t a, uint32_t b) {
    uint32_t d;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
  }
  __device__ static __forceinline__ uint32_t fma(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
  }
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    uint32_t d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
  }
  __device__ static __forceinline__ float to_float(uint16_t h) {
    return __half2float(__ushort_as_half(h));
  }
  __device__ static __forceinline__ uint16_t from_float(float f) {
    return __half_as_ushort(__float2half_rn(f));
  }
};

template <>
struct Pair<ActBF16> {
  static constexpr uint32_t kMagic = 0x4300u;  // 128.0
  static constexpr float kMagicF = 128.0f;
  static constexpr uint32_t kOne = 0x3f80u, kQuarter = 0x3e80u;
  __device__ static __forceinline__ uint32_t fma(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
  }
  __device__ static __forceinline__ uint32_t add(uint32_t a, uint32_t b) {
    return fma(a, 0x3f803f80u, b);  // a * 1 + b: exact product, one rounding
  }
  __device__ static __forceinline__ uint32_t mul(uint32_t a, uint32_t b) {
    return fma(a, b, 0x80008000u);  // a * b + (-0): one rounding, keeps -0
  }
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    uint32_t d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
  }
  __device__ static __forceinline__ float to_float(uint16_t h) { return __uint_as_float(uint32_t(h) << 16); }
  __device__ static __forceinline__ uint16_t from_float(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
};

// (a & b) ^ c in one instruction.
__device__ __forceinline__ uint32_t and_xor(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0x6a;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ uint32_t dup16(uint16_t h) { return uint32_t(h) * 0x10001u; }

// ---------------------------------------------------------------------------
// Decoders. Common members:
//   raw_t                      what a lane reads from shared memory per chunk
//   kBias                      a per-group bias word is kept (asym encodings)
//   kSymBias                   the bias word of symmetric encodings
//   bias_word(z)               the per-group bias word from the zero point
//   decode(raw, s2, bias, b)   the four B registers (see the top of the file)
// ---------------------------------------------------------------------------
template <class Act, class Enc>
struct PrefillDecode;

// 16-bit weights: the codes are the B registers.
template <class Act>
struct PrefillDecode<Act, Native16Encoding<Act>> {
  using raw_t = uint4;
  static constexpr bool kBias = false;
  static constexpr uint32_t kSymBias = 0;
  __device__ static __forceinline__ uint32_t bias_word(float) { return 0; }
  __device__ static __forceinline__ void decode(raw_t r, uint32_t, uint32_t, uint32_t (&b)[4]) {
    b[0] = r.x;
    b[1] = r.y;
    b[2] = r.z;
    b[3] = r.w;
  }
};

// int4: byte i of the word holds k = 2i (low nibble) and 2i+1 (high nibble).
// Both nibbles go to bits 0..3 of the two halves (the word and the word >> 4
// through one byte permute), the magic exponent is or-ed in (and, for sym,
// bit 3 flipped: two's complement -> offset binary), then (x - magic - zero)
// is exact and the scale multiply rounds once.
template <class Act, bool Asym>
struct PrefillDecode<Act, IntEncoding<4, Asym>> {
  using Enc = IntEncoding<4, Asym>;
  using P = Pair<Act>;
  using raw_t = uint32_t;
  static constexpr bool kBias = Asym;
  static constexpr uint32_t kMagic2 = P::kMagic * 0x10001u;
  static constexpr uint32_t kSymFlip = uint32_t(-Enc::kQmin);  // 8: two's complement -> offset
  static constexpr uint32_t kXor = Asym ? kMagic2 : (kMagic2 | (kSymFlip * 0x10001u));
  __device__ static __forceinline__ uint32_t bias_word(float z) {
    return dup16(P::from_float(-(P::kMagicF + z)));
  }
  static constexpr uint32_t kSymBias =
      Act::type == ActType::f16 ? 0xe408e408u /* -1032 */ : 0xc308c308u /* -136 */;
  __device__ static __forceinline__ void decode(raw_t w, uint32_t s2, uint32_t bias, uint32_t (&b)[4]) {
    const uint32_t w4 = w >> 4;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t sel = uint32_t(i) | (uint32_t(i) << 4) | (uint32_t(4 + i) << 8) | (uint32_t(4 + i) << 12);
      const uint32_t x = and_xor(__byte_perm(w, w4, sel), 0x000f000fu, kXor);
      b[i] = P::mul(P::add(x, bias), s2);
    }
  }
};

// int2: byte j holds k = 4j .. 4j+3 in bits 2m..2m+1. The two bytes are
// duplicated into both halves; pair p takes the field of k = 2p at bits 0..1
// of the low half and the field of k = 2p+1 at bits 2..3 of the high half
// (value 4n there), so one fma with (1, 1/4) and the bias makes both exact.
template <class Act, bool Asym>
struct PrefillDecode<Act, IntEncoding<2, Asym>> {
  using Enc = IntEncoding<2, Asym>;
  using P = Pair<Act>;
  using raw_t = uint16_t;
  static constexpr bool kBias = Asym;
  static constexpr uint32_t kMagic2 = P::kMagic * 0x10001u;
  static constexpr uint32_t kSymFlip = uint32_t(-Enc::kQmin);  // 2
  static constexpr uint32_t kXor = Asym ? kMagic2 : (kMagic2 | kSymFlip | ((kSymFlip << 2) << 16));
  static constexpr uint32_t kMul = P::kOne | (P::kQuarter << 16);
  __device__ static __forceinline__ uint32_t bias_word(float z) {
    return uint32_t(P::from_float(-(P::kMagicF + z))) |
           (uint32_t(P::from_float(-(P::kMagicF * 0.25f + z))) << 16);
  }
  static constexpr uint32_t kSymBias =
      Act::type == ActType::f16 ? 0xdc08e402u /* (-1026, -258) */ : 0xc208c302u /* (-130, -34) */;
  __device__ static __forceinline__ void decode(raw_t r, uint32_t s2, uint32_t bias, uint32_t (&b)[4]) {
    const uint32_t u = __byte_perm(uint32_t(r), 0u, 0x1010u);
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const uint32_t x = and_xor(u >> (4 * p), 0x000c0003u, kXor);
      b[p] = P::mul(P::fma(x, kMul, bias), s2);
    }
  }
};

// int8 with f16 activations: 0x6400 | byte is 1024 + byte, exact.
template <bool Asym>
struct PrefillDecode<ActF16, IntEncoding<8, Asym>> {
  using P = Pair<ActF16>;
  using raw_t = uint2;
  static constexpr bool kBias = Asym;
  __device__ static __forceinline__ uint32_t bias_word(float z) { return dup16(P::from_float(-(1024.0f + z))); }
  static constexpr uint32_t kSymBias = 0xe480e480u;  // -1152 = -(1024 + 128)
  __device__ static __forceinline__ void decode(raw_t r, uint32_t s2, uint32_t bias, uint32_t (&b)[4]) {
    const uint32_t flip = Asym ? 0u : 0x80808080u;  // sym: two's complement -> offset binary
    const uint32_t w0 = r.x ^ flip, w1 = r.y ^ flip;
    b[0] = P::mul(P::add(__byte_perm(w0, 0x64646464u, 0x4140u), bias), s2);
    b[1] = P::mul(P::add(__byte_perm(w0, 0x64646464u, 0x4342u), bias), s2);
    b[2] = P::mul(P::add(__byte_perm(w1, 0x64646464u, 0x4140u), bias), s2);
    b[3] = P::mul(P::add(__byte_perm(w1, 0x64646464u, 0x4342u), bias), s2);
  }
};

// int8 with bf16 activations. Symmetric: a two's complement code q = l -
// 128 h (l its low 7 bits, h its sign bit) placed under the exponent byte
// 0x43 without its sign bit is 0x43:l = 128 + l, exact, and the sign bit
// picks the bias, -128 (0xC300) or -256 (0xC380): their sum is q exactly,
// then the scale rounds once. sm_90a wgmma k-tile loop 195 -> 187
// instructions (wide items; 256-row items 337 -> 321); H200, three rounds
// (16:03 UTC): Mixtral 4096 int8 0.98-0.99 of the time, ARK rows within +-2%.
template <>
struct PrefillDecode<ActBF16, IntEncoding<8, false>> {
  using P = Pair<ActBF16>;
  using raw_t = uint2;
  static constexpr bool kBias = false;
  __device__ static __forceinline__ uint32_t bias_word(float) { return 0; }
  static constexpr uint32_t kSymBias = 0;  // (the bias comes from each code's sign)
  __device__ static __forceinline__ void decode(raw_t r, uint32_t s2, uint32_t, uint32_t (&b)[4]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t w = h ? r.y : r.x;
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        // Bytes 2p, 2p + 1 of w to the low bytes of the halves (with zero
        // bytes, not 0x43: a second constant operand cost each permute a
        // register move of its selector), then 0x43:l and the bias.
        const uint32_t x = __byte_perm(w, 0u, p ? 0x4342u : 0x4140u);
        const uint32_t v = (x & 0x007f007fu) | 0x43004300u;           // 128 + l
        const uint32_t bias = and_xor(x, 0x00800080u, 0xc300c300u);  // -128 or -256
        b[2 * h + p] = P::mul(P::add(v, bias), s2);
      }
    }
  }
};

// Asymmetric: bf16 holds 8 significant bits but no 8-bit magic window for a
// code and a zero point, so the bytes go through fp32 (0x4b0000xx = 2^23 +
// byte), the bias (a float here) is subtracted exactly and the pair packed to
// bf16 (exact: |q| <= 255), then scaled.
template <>
struct PrefillDecode<ActBF16, IntEncoding<8, true>> {
  using P = Pair<ActBF16>;
  using raw_t = uint2;
  static constexpr bool kBias = true;
  __device__ static __forceinline__ uint32_t bias_word(float z) { return __float_as_uint(-(8388608.0f + z)); }
  static constexpr uint32_t kSymBias = 0;  // (unused: the bias word comes with the zero point)
  __device__ static __forceinline__ void decode(raw_t r, uint32_t s2, uint32_t bias, uint32_t (&b)[4]) {
    const float nb = __uint_as_float(bias);
    const uint32_t w[2] = {r.x, r.y};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float f0 = __uint_as_float(__byte_perm(w[h], 0x4b000000u, 0x7540u)) + nb;
      const float f1 = __uint_as_float(__byte_perm(w[h], 0x4b000000u, 0x7541u)) + nb;
      const float f2 = __uint_as_float(__byte_perm(w[h], 0x4b000000u, 0x7542u)) + nb;
      const float f3 = __uint_as_float(__byte_perm(w[h], 0x4b000000u, 0x7543u)) + nb;
      b[2 * h] = P::mul(P::pack(f0, f1), s2);
      b[2 * h + 1] = P::mul(P::pack(f2, f3), s2);
    }
  }
};

// Two fp8 codes (low byte = lower k) to an exact f16 pair. sm_89+ converts in
// hardware; older chips place the bits in an f16 (e5m2 is the top byte of an
// f16; e4m3 shifted right by one is value * 2^-8, fixed by one exact multiply).
template <class Format>
__device__ __forceinline__ uint32_t fp8x2_to_f16x2(uint32_t w, int byte) {
  constexpr bool e5m2 = Format::kExpBits == 5;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  const uint16_t x = uint16_t(w >> (8 * byte));
  uint32_t d;
  if constexpr (e5m2)
    asm("cvt.rn.f16x2.e5m2x2 %0, %1;" : "=r"(d) : "h"(x));
  else
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(d) : "h"(x));
  return d;
#else
  const uint32_t sel = 4u | (uint32_t(byte) << 4) | (4u << 8) | (uint32_t(byte + 1) << 12);
  const uint32_t t = __byte_perm(w, 0u, sel);  // bytes at bits 8..15 and 24..31
  if constexpr (e5m2) return t;
  const uint32_t h = (t & 0x80008000u) | ((t & 0x7f007f00u) >> 1);
  return Pair<ActF16>::mul(h, 0x5c005c00u);  // * 256, exact
#endif
}

template <class Act, class Format, WeightType Type>
struct PrefillDecode<Act, Fp8Encoding<Format, Type>> {
  using P = Pair<Act>;
  using raw_t = uint2;
  static constexpr bool kBias = false;
  static constexpr uint32_t kSymBias = 0;
  __device__ static __forceinline__ uint32_t bias_word(float) { return 0; }
  __device__ static __forceinline__ uint32_t to_act(uint32_t h) {
    if constexpr (Act::type == ActType::f16) {
      return h;
    } else {  // exact: fp8 values have at most 4 significant bits, bf16's range
      const __half2 v = *reinterpret_cast<const __half2*>(&h);
      return P::pack(__low2float(v), __high2float(v));
    }
  }
  __device__ static __forceinline__ void decode(raw_t r, uint32_t s2, uint32_t, uint32_t (&b)[4]) {
    b[0] = P::mul(to_act(fp8x2_to_f16x2<Format>(r.x, 0)), s2);
    b[1] = P::mul(to_act(fp8x2_to_f16x2<Format>(r.x, 2)), s2);
    b[2] = P::mul(to_act(fp8x2_to_f16x2<Format>(r.y, 0)), s2);
    b[3] = P::mul(to_act(fp8x2_to_f16x2<Format>(r.y, 2)), s2);
  }
};

}  // namespace qmoe::cuda::prefill
