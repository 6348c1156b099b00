// qmoe._ext: the thin nanobind layer under the Python package `qmoe`.
//
// It mirrors the C++ API of include/qmoe/ one to one: the Python side fills a
// MoeGemmParams or a FusedMoeParams (with its RoutingParams and ExpertWeights;
// raw data pointers as integers, sizes, enums) and a Device (type, index, CUDA
// stream as an integer), and calls an entry point (grouped products, the fused
// MoE layer, its routing, the quantizers). All
// checks of framework objects (tensor types, dtypes, shapes, devices) live in
// python/qmoe/; the C++ library checks again what it can see and reports a
// Status, which becomes an exception here:
//   invalid_argument -> ValueError
//   unsupported      -> qmoe.UnsupportedError (a NotImplementedError)
//   runtime_error    -> RuntimeError
// The GIL is released while a kernel or quantizer runs.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "qmoe/fused_moe.h"
#include "qmoe/qmoe.h"
#include "qmoe/quantize.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

// Translated to a Python exception class derived from NotImplementedError.
struct Unsupported : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void raise_if_error(const qmoe::Status& s) {
  switch (s.code) {
    case qmoe::StatusCode::ok: return;
    case qmoe::StatusCode::invalid_argument: throw nb::value_error(s.message.c_str());
    case qmoe::StatusCode::unsupported: throw Unsupported(s.message);
    case qmoe::StatusCode::runtime_error: throw std::runtime_error(s.message);
  }
  throw std::runtime_error("qmoe: unknown status code " + std::to_string(int(s.code)) + ": " +
                           s.message);
}

// Runs `f` (which returns a Status) without the GIL, then raises on error.
template <class F>
void call(F&& f) {
  qmoe::Status s;
  {
    nb::gil_scoped_release release;
    s = f();
  }
  raise_if_error(s);
}

template <class T>
const void* cptr(uintptr_t a) { return reinterpret_cast<const T*>(a); }

// A pointer field of a parameter struct, seen from Python as an integer address.
template <class Cls, class S, class T>
void def_ptr(Cls& cls, const char* name, T S::*field, const char* doc) {
  cls.def_prop_rw(
      name, [field](const S& p) { return reinterpret_cast<uintptr_t>(p.*field); },
      [field](S& p, uintptr_t a) { p.*field = reinterpret_cast<T>(a); }, doc);
}

}  // namespace

NB_MODULE(_ext, m) {
  m.doc() = "qmoe C++ bindings (thin; use the `qmoe` package API instead)";

  nb::exception<Unsupported>(m, "UnsupportedError", PyExc_NotImplementedError);

  nb::enum_<qmoe::ActType>(m, "ActType")
      .value("f16", qmoe::ActType::f16)
      .value("bf16", qmoe::ActType::bf16);
  nb::enum_<qmoe::WeightType>(m, "WeightType")
      .value("native16", qmoe::WeightType::native16)
      .value("int8", qmoe::WeightType::int8)
      .value("int4", qmoe::WeightType::int4)
      .value("int2", qmoe::WeightType::int2)
      .value("fp8_e4m3", qmoe::WeightType::fp8_e4m3)
      .value("fp8_e5m2", qmoe::WeightType::fp8_e5m2);
  nb::enum_<qmoe::WeightLayout>(m, "WeightLayout")
      .value("ENK", qmoe::WeightLayout::ENK)
      .value("EKN", qmoe::WeightLayout::EKN);
  nb::enum_<qmoe::Phase>(m, "Phase")
      .value("automatic", qmoe::Phase::automatic)
      .value("decode", qmoe::Phase::decode)
      .value("prefill", qmoe::Phase::prefill);
  nb::enum_<qmoe::DeviceType>(m, "DeviceType")
      .value("cpu", qmoe::DeviceType::cpu)
      .value("cuda", qmoe::DeviceType::cuda);

  nb::class_<qmoe::Device>(m, "Device")
      .def(nb::init<>())
      .def(
          "__init__",
          [](qmoe::Device* d, qmoe::DeviceType type, int index, uintptr_t stream) {
            new (d) qmoe::Device{type, index, reinterpret_cast<void*>(stream)};
          },
          "type"_a, "index"_a = 0, "stream"_a = 0)
      .def_rw("type", &qmoe::Device::type)
      .def_rw("index", &qmoe::Device::index)
      .def_prop_rw(
          "stream", [](const qmoe::Device& d) { return reinterpret_cast<uintptr_t>(d.stream); },
          [](qmoe::Device& d, uintptr_t s) { d.stream = reinterpret_cast<void*>(s); },
          "cudaStream_t as an integer (0: the legacy default stream)");

  auto params = nb::class_<qmoe::MoeGemmParams>(m, "MoeGemmParams")
                    .def(nb::init<>())
                    .def_rw("act_type", &qmoe::MoeGemmParams::act_type)
                    .def_rw("weight_type", &qmoe::MoeGemmParams::weight_type)
                    .def_rw("asym", &qmoe::MoeGemmParams::asym)
                    .def_rw("layout", &qmoe::MoeGemmParams::layout)
                    .def_rw("num_experts", &qmoe::MoeGemmParams::num_experts)
                    .def_rw("n", &qmoe::MoeGemmParams::n)
                    .def_rw("k", &qmoe::MoeGemmParams::k)
                    .def_rw("total_tokens", &qmoe::MoeGemmParams::total_tokens)
                    .def_rw("group_size", &qmoe::MoeGemmParams::group_size);
  def_ptr(params, "activations", &qmoe::MoeGemmParams::activations, "[T, K] data pointer");
  def_ptr(params, "weights", &qmoe::MoeGemmParams::weights, "weights data pointer");
  def_ptr(params, "scales", &qmoe::MoeGemmParams::scales, "scales data pointer (0: none)");
  def_ptr(params, "zeros", &qmoe::MoeGemmParams::zeros, "zeros data pointer (0: none)");
  def_ptr(params, "tokens_per_expert", &qmoe::MoeGemmParams::tokens_per_expert,
          "int32 [E] data pointer");
  def_ptr(params, "out", &qmoe::MoeGemmParams::out, "[T, N] output data pointer");

  m.def(
      "moe_gemm_decode",
      [](const qmoe::MoeGemmParams& p, const qmoe::Device& d) {
        call([&] { return qmoe::moe_gemm_decode(p, d); });
      },
      "params"_a, "device"_a);
  m.def(
      "moe_gemm_prefill",
      [](const qmoe::MoeGemmParams& p, const qmoe::Device& d) {
        call([&] { return qmoe::moe_gemm_prefill(p, d); });
      },
      "params"_a, "device"_a);
  m.def(
      "moe",
      [](const qmoe::MoeGemmParams& p, const qmoe::Device& d, qmoe::Phase phase,
         int64_t decode_threshold) {
        call([&] { return qmoe::moe(p, d, phase, decode_threshold); });
      },
      "params"_a, "device"_a, "phase"_a = qmoe::Phase::automatic, "decode_threshold"_a = 4);
  m.def(
      "moe_gemm",
      [](const qmoe::MoeGemmParams& p, const qmoe::Device& d) {
        call([&] { return qmoe::moe_gemm(p, d); });
      },
      "params"_a, "device"_a);
  m.def(
      "moe_gemm_reference",
      [](const qmoe::MoeGemmParams& p) { call([&] { return qmoe::moe_gemm_reference(p); }); },
      "params"_a, "The exact, simple CPU kernel (the oracle); CPU pointers only.");
  m.def(
      "validate",
      [](const qmoe::MoeGemmParams& p, const qmoe::Device& d) {
        raise_if_error(qmoe::validate(p, d));
      },
      "params"_a, "device"_a);
  m.def("choose_phase", &qmoe::choose_phase, "params"_a, "decode_threshold"_a = 4);
  m.def("packed_k", &qmoe::packed_k, "weight_type"_a, "k"_a);
  m.def("weight_bits", &qmoe::weight_bits, "weight_type"_a);

  nb::class_<qmoe::QuantSpec>(m, "QuantSpec")
      .def(nb::init<>())
      .def_rw("weight_type", &qmoe::QuantSpec::weight_type)
      .def_rw("asym", &qmoe::QuantSpec::asym)
      .def_rw("act_type", &qmoe::QuantSpec::act_type)
      .def_rw("group_size", &qmoe::QuantSpec::group_size);

  m.def(
      "quantize",
      [](const qmoe::QuantSpec& spec, int64_t E, int64_t N, int64_t K, uintptr_t w,
         uintptr_t qweights, uintptr_t scales, uintptr_t zeros) {
        call([&] {
          return qmoe::quantize(spec, E, N, K, reinterpret_cast<const float*>(w),
                                reinterpret_cast<void*>(qweights),
                                reinterpret_cast<void*>(scales), reinterpret_cast<void*>(zeros));
        });
      },
      "spec"_a, "E"_a, "N"_a, "K"_a, "w"_a, "qweights"_a, "scales"_a, "zeros"_a,
      "float32 [E, N, K] at `w` -> qweights/scales/zeros (CPU pointers).");
  m.def(
      "dequantize",
      [](const qmoe::QuantSpec& spec, int64_t E, int64_t N, int64_t K, uintptr_t qweights,
         uintptr_t scales, uintptr_t zeros, uintptr_t w) {
        call([&] {
          return qmoe::dequantize(spec, E, N, K, cptr<uint8_t>(qweights), cptr<uint16_t>(scales),
                                  cptr<uint16_t>(zeros), reinterpret_cast<float*>(w));
        });
      },
      "spec"_a, "E"_a, "N"_a, "K"_a, "qweights"_a, "scales"_a, "zeros"_a, "w"_a,
      "qweights/scales/zeros -> float32 [E, N, K] at `w` (CPU pointers).");

  // ---- the fused MoE layer (include/qmoe/fused_moe.h) ----
  nb::enum_<qmoe::Scoring>(m, "Scoring")
      .value("softmax", qmoe::Scoring::softmax)
      .value("sigmoid", qmoe::Scoring::sigmoid);
  nb::enum_<qmoe::GroupScore>(m, "GroupScore")
      .value("max", qmoe::GroupScore::max)
      .value("top2_sum", qmoe::GroupScore::top2_sum);

  auto ew = nb::class_<qmoe::ExpertWeights>(m, "ExpertWeights")
                .def(nb::init<>())
                .def_rw("weight_type", &qmoe::ExpertWeights::weight_type)
                .def_rw("asym", &qmoe::ExpertWeights::asym)
                .def_rw("group_size", &qmoe::ExpertWeights::group_size);
  def_ptr(ew, "weights", &qmoe::ExpertWeights::weights, "[E, N, K_packed] data pointer");
  def_ptr(ew, "scales", &qmoe::ExpertWeights::scales, "scales data pointer (0: none)");
  def_ptr(ew, "zeros", &qmoe::ExpertWeights::zeros, "zeros data pointer (0: none)");

  auto rp = nb::class_<qmoe::RoutingParams>(m, "RoutingParams")
                .def(nb::init<>())
                .def_rw("scoring", &qmoe::RoutingParams::scoring)
                .def_rw("renormalize", &qmoe::RoutingParams::renormalize)
                .def_rw("num_groups", &qmoe::RoutingParams::num_groups)
                .def_rw("topk_groups", &qmoe::RoutingParams::topk_groups)
                .def_rw("group_score", &qmoe::RoutingParams::group_score)
                .def_rw("scaling_factor", &qmoe::RoutingParams::scaling_factor);
  def_ptr(rp, "correction_bias", &qmoe::RoutingParams::correction_bias,
          "float32 [E] data pointer (0: none)");

  // Struct members (routing, gate_up, ...) are copied in and out as values:
  // assign a whole RoutingParams / ExpertWeights to change them.
  auto fp = nb::class_<qmoe::FusedMoeParams>(m, "FusedMoeParams")
                .def(nb::init<>())
                .def_rw("act_type", &qmoe::FusedMoeParams::act_type)
                .def_rw("num_tokens", &qmoe::FusedMoeParams::num_tokens)
                .def_rw("hidden", &qmoe::FusedMoeParams::hidden)
                .def_rw("intermediate", &qmoe::FusedMoeParams::intermediate)
                .def_rw("num_experts", &qmoe::FusedMoeParams::num_experts)
                .def_rw("top_k", &qmoe::FusedMoeParams::top_k)
                .def_rw("logits_f32", &qmoe::FusedMoeParams::logits_f32)
                .def_rw("shared_intermediate", &qmoe::FusedMoeParams::shared_intermediate)
                .def_rw("workspace_bytes", &qmoe::FusedMoeParams::workspace_bytes);
  const auto def_value = [&fp](const char* name, auto field) {
    using S = qmoe::FusedMoeParams;
    using V = std::remove_reference_t<decltype(std::declval<S&>().*field)>;
    fp.def_prop_rw(
        name, [field](const S& p) { return V(p.*field); },
        [field](S& p, const V& v) { p.*field = v; });
  };
  def_value("routing", &qmoe::FusedMoeParams::routing);
  def_value("gate_up", &qmoe::FusedMoeParams::gate_up);
  def_value("down", &qmoe::FusedMoeParams::down);
  def_value("shared_gate_up", &qmoe::FusedMoeParams::shared_gate_up);
  def_value("shared_down", &qmoe::FusedMoeParams::shared_down);
  def_ptr(fp, "hidden_states", &qmoe::FusedMoeParams::hidden_states, "[T, H] data pointer");
  def_ptr(fp, "router_logits", &qmoe::FusedMoeParams::router_logits, "[T, E] data pointer (0: none)");
  def_ptr(fp, "topk_ids", &qmoe::FusedMoeParams::topk_ids, "int32 [T, k] data pointer (0: none)");
  def_ptr(fp, "topk_weights", &qmoe::FusedMoeParams::topk_weights,
          "float32 [T, k] data pointer (0: none)");
  def_ptr(fp, "shared_gate", &qmoe::FusedMoeParams::shared_gate, "[H] data pointer (0: none)");
  def_ptr(fp, "out", &qmoe::FusedMoeParams::out, "[T, H] output data pointer");
  def_ptr(fp, "workspace", &qmoe::FusedMoeParams::workspace, "workspace data pointer (0: none)");

  m.def(
      "fused_moe",
      [](const qmoe::FusedMoeParams& p, const qmoe::Device& d) {
        call([&] { return qmoe::fused_moe(p, d); });
      },
      "params"_a, "device"_a);
  m.def(
      "moe_route",
      [](const qmoe::FusedMoeParams& p, uintptr_t topk_ids, uintptr_t topk_weights,
         const qmoe::Device& d) {
        call([&] {
          return qmoe::moe_route(p, reinterpret_cast<int32_t*>(topk_ids),
                                 reinterpret_cast<float*>(topk_weights), d);
        });
      },
      "params"_a, "topk_ids"_a, "topk_weights"_a, "device"_a);
  m.def("fused_moe_workspace_size", &qmoe::fused_moe_workspace_size, "params"_a,
        "Bytes of workspace fused_moe needs for these sizes (pointers are not read).");

  m.def("set_num_threads", &qmoe::set_num_threads, "n"_a);
  m.def("num_threads", &qmoe::num_threads);
  m.def("built_with_cuda", &qmoe::built_with_cuda);
  m.def("version", [] { return std::string(qmoe::version()); });
}
