#include "cpu/simd/simd.h"
namespace qmoe::cpu::simd {
bool run_avx2(const MoeGemmParams&, Phase) { return false; }
}
