// Public entry points: argument checks, then dispatch to a backend.
#include <string>

#include "core/backend.h"
#include "core/encoding.h"
#include "cpu/thread_pool.h"

namespace qmoe {
namespace {

std::string str(int64_t v) { return std::to_string(v); }

bool valid_enum(ActType a) { return a == ActType::f16 || a == ActType::bf16; }
bool valid_enum(WeightType w) { return int32_t(w) >= 0 && int32_t(w) <= 5; }
bool is_int(WeightType w) {
  return w == WeightType::int8 || w == WeightType::int4 || w == WeightType::int2;
}

Status dispatch(const MoeGemmParams& p, const Device& device, Phase phase) {
  if (Status s = validate(p, device); !s.ok()) return s;
  if (device.type == DeviceType::cuda) return cuda::run(p, phase, device);
  if (Status s = cpu::check_counts(p); !s.ok()) return s;
  return cpu::run(p, phase);
}

}  // namespace

int weight_bits(WeightType t) {
  switch (t) {
    case WeightType::native16: return 16;
    case WeightType::int4: return 4;
    case WeightType::int2: return 2;
    default: return 8;
  }
}

int64_t packed_k(WeightType t, int64_t k) {
  return t == WeightType::native16 ? k : k * weight_bits(t) / 8;
}

int64_t weight_bytes_per_expert(const MoeGemmParams& p) {
  const int64_t wbytes = p.n * p.k * weight_bits(p.weight_type) / 8;
  if (p.weight_type == WeightType::native16)
    return wbytes + ((p.layout == WeightLayout::EKN && p.scales) ? 2 * p.n : 0);
  const int64_t groups = p.group_size > 0 ? p.k / p.group_size : 0;
  return wbytes + p.n * groups * 2 * (p.asym ? 2 : 1);
}

const char* to_string(WeightType t) {
  switch (t) {
    case WeightType::native16: return "native16";
    case WeightType::int8: return "int8";
    case WeightType::int4: return "int4";
    case WeightType::int2: return "int2";
    case WeightType::fp8_e4m3: return "fp8_e4m3";
    case WeightType::fp8_e5m2: return "fp8_e5m2";
  }
  return "unknown";
}

const char* to_string(ActType t) { return t == ActType::f16 ? "float16" : "bfloat16"; }

Status validate(const MoeGemmParams& p, const Device& device) {
  if (!valid_enum(p.act_type)) return Status::invalid("act_type: must be f16 or bf16");
  if (!valid_enum(p.weight_type)) return Status::invalid("weight_type: unknown encoding");
  if (p.num_experts < 1) return Status::invalid("num_experts must be >= 1, got " + str(p.num_experts));
  if (p.n < 1) return Status::invalid("N (output features) must be >= 1, got " + str(p.n));
  if (p.k < 1) return Status::invalid("K (input features) must be >= 1, got " + str(p.k));
  if (p.total_tokens < 0) return Status::invalid("total_tokens must be >= 0, got " + str(p.total_tokens));
  if (!p.weights) return Status::invalid("weights: null pointer");
  if (!p.tokens_per_expert) return Status::invalid("num_tokens_per_expert: null pointer");
  if (p.total_tokens > 0 && !p.activations) return Status::invalid("activations: null pointer");
  if (p.total_tokens > 0 && !p.out) return Status::invalid("out: null pointer");

  if (p.layout == WeightLayout::EKN) {
    if (p.weight_type != WeightType::native16)
      return Status::invalid("weights: the [E, K, N] layout (moe_gemm) takes 16-bit weights only");
    if (p.asym || p.zeros) return Status::invalid("zeros: moe_gemm takes no zero points");
  } else if (p.layout != WeightLayout::ENK) {
    return Status::invalid("layout: unknown weight layout");
  } else if (p.weight_type == WeightType::native16) {
    if (p.scales || p.zeros)
      return Status::invalid("scales/zeros must be None for unquantized (16-bit) weights");
    if (p.asym) return Status::invalid("asym: unquantized (16-bit) weights have no zero points");
  } else {
    if (p.group_size <= 0) return Status::invalid("group_size must be > 0, got " + str(p.group_size));
    if (p.k % p.group_size != 0)
      return Status::invalid("group_size (" + str(p.group_size) + ") must divide K (" + str(p.k) + ")");
    if (p.weight_type == WeightType::int4 && p.group_size % 2 != 0)
      return Status::invalid("group_size must be even for int4 weights, got " + str(p.group_size));
    if (p.weight_type == WeightType::int2 && p.group_size % 4 != 0)
      return Status::invalid("group_size must be a multiple of 4 for int2 weights, got " +
                             str(p.group_size));
    if (!p.scales) return Status::invalid(std::string("scales is required for ") + to_string(p.weight_type) + " weights");
    if (p.asym && !is_int(p.weight_type))
      return Status::invalid("asym: fp8 weights have no zero points (asym must be false)");
    if (p.asym && !p.zeros) return Status::invalid("zeros is required when asym=True");
    if (!p.asym && p.zeros) return Status::invalid("zeros must be None when asym=False");
  }

  if (device.type == DeviceType::cuda) {
    if (!built_with_cuda())
      return Status::unsupported("device: qmoe was built without CUDA (configure with QMOE_CUDA=ON)");
    if (device.index < 0) return Status::invalid("device: negative CUDA device index");
  } else if (device.type != DeviceType::cpu) {
    return Status::invalid("device: unknown device type");
  }
  return Status::success();
}

Phase choose_phase(const MoeGemmParams& p, int64_t decode_threshold) {
  return p.total_tokens <= decode_threshold * p.num_experts ? Phase::decode : Phase::prefill;
}

Status moe_gemm_decode(const MoeGemmParams& p, const Device& device) {
  if (p.layout != WeightLayout::ENK) return Status::invalid("moe_gemm_decode: weights must be [E, N, K_packed]");
  return dispatch(p, device, Phase::decode);
}

Status moe_gemm_prefill(const MoeGemmParams& p, const Device& device) {
  if (p.layout != WeightLayout::ENK) return Status::invalid("moe_gemm_prefill: weights must be [E, N, K_packed]");
  return dispatch(p, device, Phase::prefill);
}

Status moe(const MoeGemmParams& p, const Device& device, Phase phase, int64_t decode_threshold) {
  if (phase != Phase::automatic && phase != Phase::decode && phase != Phase::prefill)
    return Status::invalid("phase must be 'auto', 'decode' or 'prefill'");
  if (decode_threshold < 0) return Status::invalid("decode_threshold must be >= 0");
  if (p.layout != WeightLayout::ENK) return Status::invalid("moe: weights must be [E, N, K_packed]");
  return dispatch(p, device, phase == Phase::automatic ? choose_phase(p, decode_threshold) : phase);
}

Status moe_gemm(const MoeGemmParams& p, const Device& device) {
  if (p.layout != WeightLayout::EKN) return Status::invalid("moe_gemm: weights must be [E, K, N] (layout EKN)");
  return dispatch(p, device, Phase::prefill);
}

Status moe_gemm_reference(const MoeGemmParams& p) {
  if (Status s = validate(p, Device{}); !s.ok()) return s;
  if (Status s = cpu::check_counts(p); !s.ok()) return s;
  return cpu::run_reference(p);
}

uint16_t float_to_f16_bits(float v) { return float_to_f16(v); }
float f16_bits_to_float(uint16_t h) { return f16_to_float(h); }
uint16_t float_to_bf16_bits(float v) { return float_to_bf16(v); }
float bf16_bits_to_float(uint16_t h) { return bf16_to_float(h); }

void set_num_threads(int n) { cpu::set_pool_size(n); }
int num_threads() { return cpu::pool_size(); }

const char* version() { return QMOE_VERSION_STRING; }

}  // namespace qmoe
