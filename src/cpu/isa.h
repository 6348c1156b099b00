// CPU instruction-set levels and their run-time selection.
//
// One binary carries every level (files in src/cpu/simd/ are compiled with
// their level's flags) and picks at run time:
//   portable  the blocked kernel in plain C++ (any x86-64 or other CPU)
//   avx2      AVX2 + FMA + F16C: fp32 FMA kernels
//   avx512    AVX-512 F/BW/VL/DQ + AVX512_BF16 (vdpbf16ps), with OS support
//             of the ZMM state (XCR0). A CPU with AVX-512 but no BF16
//             (Skylake-X, Ice Lake) runs the avx2 level.
//
// QMOE_CPU_ISA=portable|avx2|avx512 (or auto) forces a level; it is read on
// every call, so a test may change it between calls. Asking for a level this
// CPU lacks is not an error: qmoe prints one line to stderr (once per value)
// and runs the best level the CPU has. An unknown value is reported the same
// way and ignored.
#pragma once

namespace qmoe::cpu {

enum class Isa : int { portable = 0, avx2 = 1, avx512 = 2 };

const char* to_string(Isa isa);
// The best level this CPU and OS support (detected once).
Isa best_isa();
bool isa_supported(Isa isa);
// The level the next call will use: the override below if set, else
// QMOE_CPU_ISA if set and supported, else best_isa().
Isa selected_isa();
// Internal override for tests and benchmarks (takes precedence over the
// environment); level < 0 clears it. An unsupported level is clamped down.
void set_isa_override(int level);
// The level whose kernel ran the last CPU call of this process (a fast level
// that cannot take a shape, e.g. an odd group size, hands it to the portable
// kernel, and this then says portable).
Isa last_isa();
void note_isa_used(Isa isa);

}  // namespace qmoe::cpu
