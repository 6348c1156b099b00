#include "cpu/isa.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define QMOE_X86 1
#endif

namespace qmoe::cpu {
namespace {

#if QMOE_X86
unsigned long long xgetbv0() {
  unsigned eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}

Isa detect() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return Isa::portable;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12),
             f16c = c & (1u << 29);
  if (!osxsave || !avx) return Isa::portable;
  const unsigned long long xcr0 = xgetbv0();
  if ((xcr0 & 0x6) != 0x6) return Isa::portable;  // XMM + YMM state
  if (__get_cpuid_max(0, nullptr) < 7) return Isa::portable;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b & (1u << 5), f = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30),
             vl = b & (1u << 31);
  unsigned a1, b1, c1, d1;
  __cpuid_count(7, 1, a1, b1, c1, d1);
  const bool bf16 = a1 & (1u << 5);
  if (!(avx2 && fma && f16c)) return Isa::portable;
  const bool zmm_state = (xcr0 & 0xe6) == 0xe6;  // opmask, ZMM_Hi256, Hi16_ZMM
  if (f && dq && bw && vl && bf16 && zmm_state) return Isa::avx512;
  return Isa::avx2;
}
#else
Isa detect() { return Isa::portable; }
#endif

std::atomic<int> g_override{-1};
std::atomic<int> g_last{0};

void warn_once(const std::string& key, const std::string& msg) {
  static std::mutex mu;
  static std::set<std::string> seen;
  std::lock_guard<std::mutex> lock(mu);
  if (seen.insert(key).second) std::fprintf(stderr, "qmoe: %s\n", msg.c_str());
}

}  // namespace

const char* to_string(Isa isa) {
  switch (isa) {
    case Isa::portable: return "portable";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
  }
  return "?";
}

Isa best_isa() {
  static const Isa best = detect();
  return best;
}

bool isa_supported(Isa isa) { return int(isa) <= int(best_isa()); }

Isa selected_isa() {
  const int o = g_override.load(std::memory_order_relaxed);
  if (o >= 0) return isa_supported(Isa(o)) ? Isa(o) : best_isa();
  const char* env = std::getenv("QMOE_CPU_ISA");
  if (!env || !*env || std::strcmp(env, "auto") == 0) return best_isa();
  for (Isa isa : {Isa::portable, Isa::avx2, Isa::avx512}) {
    if (std::strcmp(env, to_string(isa)) != 0) continue;
    if (isa_supported(isa)) return isa;
    warn_once(env, std::string("QMOE_CPU_ISA=") + env + " asks for a level this CPU/OS lacks; using " +
                       to_string(best_isa()));
    return best_isa();
  }
  warn_once(env, std::string("QMOE_CPU_ISA=") + env +
                     " is not one of portable, avx2, avx512, auto; ignored (using " +
                     to_string(best_isa()) + ")");
  return best_isa();
}

void set_isa_override(int level) {
  g_override.store(level < 0 ? -1 : (level > 2 ? 2 : level), std::memory_order_relaxed);
}

Isa last_isa() { return Isa(g_last.load(std::memory_order_relaxed)); }
void note_isa_used(Isa isa) { g_last.store(int(isa), std::memory_order_relaxed); }

}  // namespace qmoe::cpu
