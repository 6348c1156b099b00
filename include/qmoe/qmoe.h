// qmoe — quantized Mixture-of-Experts grouped products (public C++ API).
//
// One call describes one grouped product: activations sorted by expert
// (rows [0, n_0) belong to expert 0, the next n_1 rows to expert 1, ...),
// times the weights of each expert, written to `out`. The layouts are those
// of AutoRound's ARK extension (see DESIGN.md §2), bit for bit.
//
// Every entry point validates its arguments and returns a Status; none
// aborts, throws across the API, or writes outside `out`. CUDA entry points
// are asynchronous on the given stream, allocate nothing per call, never
// synchronise with the host and can be captured in a CUDA graph.
#pragma once

#include <cstdint>
#include <string>

namespace qmoe {

// Activation (and output, scale, zero) element type.
enum class ActType : int32_t { f16 = 0, bf16 = 1 };

// How the weights are stored. `native16` means the weights are in the
// activation dtype (ARK's weight_bits=16).
enum class WeightType : int32_t {
  native16 = 0,
  int8 = 1,
  int4 = 2,
  int2 = 3,
  fp8_e4m3 = 4,
  fp8_e5m2 = 5,
};

// Weight tensor layout. ENK is ARK's quantized layout [E, N, K_packed];
// EKN is the 16-bit layout [E, K, N] of ARK's moe_gemm.
enum class WeightLayout : int32_t { ENK = 0, EKN = 1 };

enum class Phase : int32_t { automatic = 0, decode = 1, prefill = 2 };

enum class DeviceType : int32_t { cpu = 0, cuda = 1 };

struct Device {
  DeviceType type = DeviceType::cpu;
  int index = 0;            // CUDA device ordinal
  void* stream = nullptr;   // cudaStream_t (nullptr: the legacy default stream)
};

enum class StatusCode : int32_t {
  ok = 0,
  invalid_argument = 1,  // bad shape, dtype, pointer, group size, counts
  unsupported = 2,       // valid request this build or device cannot run
  runtime_error = 3,     // CUDA error or similar
};

struct Status {
  StatusCode code = StatusCode::ok;
  std::string message;

  bool ok() const noexcept { return code == StatusCode::ok; }
  static Status success() { return {}; }
  static Status invalid(std::string m) { return {StatusCode::invalid_argument, std::move(m)}; }
  static Status unsupported(std::string m) { return {StatusCode::unsupported, std::move(m)}; }
  static Status runtime(std::string m) { return {StatusCode::runtime_error, std::move(m)}; }
};

// One grouped product. Pointers are on the device named by the call.
struct MoeGemmParams {
  ActType act_type = ActType::bf16;
  WeightType weight_type = WeightType::int4;
  bool asym = false;                 // int8/int4/int2 only: zeros present
  WeightLayout layout = WeightLayout::ENK;

  int64_t num_experts = 0;           // E
  int64_t n = 0;                     // output features N
  int64_t k = 0;                     // input features K (unpacked)
  int64_t total_tokens = 0;          // T
  int64_t group_size = 128;          // along K; ignored for native16

  const void* activations = nullptr;        // [T, K] act_type
  const void* weights = nullptr;            // ENK: [E, N, K_packed]; EKN: [E, K, N]
  const void* scales = nullptr;             // ENK: [E, N, K/group_size]; EKN: optional [E, N]
  const void* zeros = nullptr;              // ENK asym: [E, N, K/group_size]
  const int32_t* tokens_per_expert = nullptr;  // [E], sum == T
  void* out = nullptr;                      // [T, N] act_type
};

// Quantized (or 16-bit) grouped product tuned for few tokens per expert.
Status moe_gemm_decode(const MoeGemmParams& p, const Device& device = {});
// The same product tuned for many tokens per expert.
Status moe_gemm_prefill(const MoeGemmParams& p, const Device& device = {});
// Chooses decode or prefill from T and E alone (host-known: no device sync):
// decode when T <= decode_threshold * E. The default is ARK's 4; the measured
// crossover on an H200 is 16 for quantized weights (docs/PERFORMANCE.md).
Status moe(const MoeGemmParams& p, const Device& device = {}, Phase phase = Phase::automatic,
           int64_t decode_threshold = 4);
// ARK's 16-bit grouped GEMM: weights [E, K, N] in the activation dtype,
// optional per-output-column scales [E, N]. p.layout must be EKN.
Status moe_gemm(const MoeGemmParams& p, const Device& device = {});

// The phase `moe` would pick.
Phase choose_phase(const MoeGemmParams& p, int64_t decode_threshold = 4);

// The exact, simple CPU kernel every faster path is tested against.
Status moe_gemm_reference(const MoeGemmParams& p);

// Argument checks shared by every entry point (also usable by bindings).
// Checks what the host can see: it does not read device memory.
Status validate(const MoeGemmParams& p, const Device& device);

// Layout helpers.
int weight_bits(WeightType t);                        // 16, 8, 4, 2, 8, 8
int64_t packed_k(WeightType t, int64_t k);            // K_packed of the ENK layout
int64_t weight_bytes_per_expert(const MoeGemmParams& p);  // weights + scales + zeros
const char* to_string(WeightType t);
const char* to_string(ActType t);

// CPU thread pool size used by the CPU kernels (default: QMOE_NUM_THREADS,
// else the number of hardware threads). Values < 1 restore the default.
void set_num_threads(int n);
int num_threads();

// 16-bit float conversions (round to nearest even) for callers that hold
// activations as raw bits.
uint16_t float_to_f16_bits(float v);
float f16_bits_to_float(uint16_t h);
uint16_t float_to_bf16_bits(float v);
float bf16_bits_to_float(uint16_t h);

// Which build features are present.
bool built_with_cuda();
const char* version();

}  // namespace qmoe
