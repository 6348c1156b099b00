// wgmma.mma_async wrappers (sm_90a) for the prefill grouped GEMM: D[64 x N]
// += A[64 x 16] * B[16 x N], f32 accumulators, A (the decoded weights) from
// four 32-bit registers per thread in the m16n8k16 A-fragment layout (warp w
// of the warpgroup holds rows 16w..16w+15), B (the tokens) from shared memory
// through a matrix descriptor, K-major (no transpose). mma_bf16 / mma_f16,
// one overload per N (picked by the accumulator array, N / 2 floats): N =
// 32, 64, 96, 128, 256 (the wgmma widths the kernel uses). One macro writes both
// types' functions of an N; inline asm needs literal operand lists, so they
// are built from macros of eight.
//
// Accumulator d[4j + 2h + i] of lane (g = lane / 4, c = lane % 4) is row
// 16w + 8h + g, column 8j + 2c + i, as in the m16n8k16 C fragment.
#pragma once

#include <cstdint>

namespace qmoe::cuda::prefill::wgmma {

// NAME(d, a, desc) for wgmma m64<N>k16 with TY (bf16 or f16) operands:
// OUTS the accumulator placeholders, REST the a and desc placeholders, then
// the accumulator constraints (variadic: they contain commas).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define QMOE_WGMMA_FN(NAME, N, R, TY, OUTS, REST, ...)                                        \
  __device__ __forceinline__ void NAME(float(&d)[R], const uint32_t(&a)[4], uint64_t desc) {   \
    asm volatile("{\nwgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " {" OUTS "}, " \
                 REST ", 1, 1, 1, 0;\n}\n"                                                    \
                 : __VA_ARGS__                                                                \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));                     \
  }
#else
#define QMOE_WGMMA_FN(NAME, N, R, TY, OUTS, REST, ...) \
  __device__ __forceinline__ void NAME(float(&)[R], const uint32_t(&)[4], uint64_t) {}
#endif
#define QMOE_WGMMA_N(N, R, OUTS, REST, ...)                     \
  QMOE_WGMMA_FN(mma_bf16, N, R, "bf16", OUTS, REST, __VA_ARGS__) \
  QMOE_WGMMA_FN(mma_f16, N, R, "f16", OUTS, REST, __VA_ARGS__)

// Accumulator placeholders, eight at a time, and their constraints.
#define QMOE_PH0 "%0, %1, %2, %3, %4, %5, %6, %7"
#define QMOE_PH1 "%8, %9, %10, %11, %12, %13, %14, %15"
#define QMOE_PH2 "%16, %17, %18, %19, %20, %21, %22, %23"
#define QMOE_PH3 "%24, %25, %26, %27, %28, %29, %30, %31"
#define QMOE_PH4 "%32, %33, %34, %35, %36, %37, %38, %39"
#define QMOE_PH5 "%40, %41, %42, %43, %44, %45, %46, %47"
#define QMOE_PH6 "%48, %49, %50, %51, %52, %53, %54, %55"
#define QMOE_PH7 "%56, %57, %58, %59, %60, %61, %62, %63"
#define QMOE_PH8 "%64, %65, %66, %67, %68, %69, %70, %71"
#define QMOE_PH9 "%72, %73, %74, %75, %76, %77, %78, %79"
#define QMOE_PH10 "%80, %81, %82, %83, %84, %85, %86, %87"
#define QMOE_PH11 "%88, %89, %90, %91, %92, %93, %94, %95"
#define QMOE_PH12 "%96, %97, %98, %99, %100, %101, %102, %103"
#define QMOE_PH13 "%104, %105, %106, %107, %108, %109, %110, %111"
#define QMOE_PH14 "%112, %113, %114, %115, %116, %117, %118, %119"
#define QMOE_PH15 "%120, %121, %122, %123, %124, %125, %126, %127"
#define QMOE_D8(i) \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define QMOE_D16(i) QMOE_D8(i), QMOE_D8(i + 8)
#define QMOE_D32(i) QMOE_D16(i), QMOE_D16(i + 16)
#define QMOE_D64(i) QMOE_D32(i), QMOE_D32(i + 32)
#define QMOE_D128(i) QMOE_D64(i), QMOE_D64(i + 64)
#define QMOE_PH16 QMOE_PH0 ", " QMOE_PH1
#define QMOE_PH32 QMOE_PH16 ", " QMOE_PH2 ", " QMOE_PH3
#define QMOE_PH64 QMOE_PH32 ", " QMOE_PH4 ", " QMOE_PH5 ", " QMOE_PH6 ", " QMOE_PH7
#define QMOE_PH128 \
  QMOE_PH64 ", " QMOE_PH8 ", " QMOE_PH9 ", " QMOE_PH10 ", " QMOE_PH11 ", " QMOE_PH12 ", " QMOE_PH13 ", " QMOE_PH14 ", " QMOE_PH15

QMOE_WGMMA_N(32, 16, QMOE_PH16, "{%16, %17, %18, %19}, %20", QMOE_D16(0))
QMOE_WGMMA_N(64, 32, QMOE_PH32, "{%32, %33, %34, %35}, %36", QMOE_D32(0))
QMOE_WGMMA_N(96, 48, QMOE_PH32 ", " QMOE_PH4 ", " QMOE_PH5, "{%48, %49, %50, %51}, %52", QMOE_D32(0), QMOE_D16(32))
QMOE_WGMMA_N(128, 64, QMOE_PH64, "{%64, %65, %66, %67}, %68", QMOE_D64(0))
QMOE_WGMMA_N(256, 128, QMOE_PH128, "{%128, %129, %130, %131}, %132", QMOE_D128(0))

#undef QMOE_WGMMA_N
#undef QMOE_WGMMA_FN
#undef QMOE_PH0
#undef QMOE_PH1
#undef QMOE_PH2
#undef QMOE_PH3
#undef QMOE_PH4
#undef QMOE_PH5
#undef QMOE_PH6
#undef QMOE_PH7
#undef QMOE_PH8
#undef QMOE_PH9
#undef QMOE_PH10
#undef QMOE_PH11
#undef QMOE_PH12
#undef QMOE_PH13
#undef QMOE_PH14
#undef QMOE_PH15
#undef QMOE_PH16
#undef QMOE_PH32
#undef QMOE_PH64
#undef QMOE_PH128
#undef QMOE_D8
#undef QMOE_D16
#undef QMOE_D32
#undef QMOE_D64
#undef QMOE_D128

}  // namespace qmoe::cuda::prefill::wgmma
