// qmoe-bench: times qmoe's grouped products on the reference shapes of
// DESIGN.md §5, on the CPU or a CUDA GPU, with the anchors measured in the
// same run, and checks each row against a float64 reference on sampled
// outputs.
//
//   qmoe-bench [--device cpu|cuda] [--quick] [--phase decode|prefill|both]
//              [--encodings int4,int8,int2,fp8_e4m3,bf16,...] [--act bf16|f16]
//              [--shapes ark|layers|all] [--only SUBSTRING] [--markdown FILE] [--threads N]
//
// --only keeps the rows whose shape label contains SUBSTRING (e.g.
// --only "mixtral-8x7b b1": the decode rows with >= 64 MB of weights, for
// interleaved before/after runs).
//
// Columns: ms (median of repeated runs), GFLOP/s, GB/s of weight bytes
// (active experts' weights + scales + zeros), the anchor of the device and
// the row's share of it, and ‖out − ref‖ / ‖ref‖ over sampled outputs.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#include "bench_anchors.h"
#include "cpu_anchors.h"
#include "core/encoding.h"
#include "qmoe/qmoe.h"

#if QMOE_BENCH_CUDA
#include <cuda_runtime.h>
#endif

namespace {

using namespace qmoe;

struct Encoding {
  const char* name;
  WeightType type;
  bool asym;
};

const Encoding kEncodings[] = {
    {"bf16", WeightType::native16, false}, {"int8", WeightType::int8, false},
    {"int8_asym", WeightType::int8, true}, {"int4", WeightType::int4, false},
    {"int4_asym", WeightType::int4, true}, {"int2", WeightType::int2, false},
    {"int2_asym", WeightType::int2, true}, {"fp8_e4m3", WeightType::fp8_e4m3, false},
    {"fp8_e5m2", WeightType::fp8_e5m2, false}};

struct Shape {
  std::string label;
  int64_t E, N, K, T;
  bool uneven;
  int top_k;  // > 0: counts come from routing T/top_k tokens to top_k experts
};

// ARK's grouped-GEMM reference shapes (DESIGN.md §5).
std::vector<Shape> ark_shapes() {
  return {{"ark", 8, 4096, 4096, 252, false, 0},   {"ark", 8, 4096, 14336, 528, false, 0},
          {"ark", 8, 14336, 4096, 528, false, 0},  {"ark", 16, 2048, 2048, 256, false, 0},
          {"ark", 32, 2048, 2048, 256, false, 0},  {"ark", 64, 2048, 2048, 256, false, 0},
          {"ark", 8, 4096, 4096, 610, true, 0}};
}

// The MoE layers of DESIGN.md §5: gate/up [E, 2I, H] and down [E, H, I].
std::vector<Shape> layer_shapes(const std::vector<int64_t>& batches) {
  struct Model {
    const char* name;
    int64_t hidden, inter, experts;
    int top_k;
  };
  const Model models[] = {{"qwen1.5-moe", 2048, 1408, 60, 4},
                          {"deepseek-v2-lite", 2048, 1408, 64, 6},
                          {"mixtral-8x7b", 4096, 14336, 8, 2},
                          {"qwen3-30b-a3b", 2048, 768, 128, 8}};
  std::vector<Shape> out;
  for (const Model& m : models)
    for (int64_t b : batches) {
      const std::string tag = std::string(m.name) + " b" + std::to_string(b);
      out.push_back({tag + " gate_up", m.experts, 2 * m.inter, m.hidden, b * m.top_k, false, m.top_k});
      out.push_back({tag + " down", m.experts, m.hidden, m.inter, b * m.top_k, false, m.top_k});
    }
  return out;
}

std::vector<int32_t> make_counts(const Shape& s, std::mt19937_64& rng) {
  std::vector<int32_t> counts(size_t(s.E), 0);
  if (s.top_k > 0) {  // route each token to top_k distinct experts (fixed seed)
    std::vector<int> ids(size_t(s.E));
    for (int64_t t = 0; t < s.T / s.top_k; ++t) {
      for (int64_t e = 0; e < s.E; ++e) ids[size_t(e)] = int(e);
      for (int j = 0; j < s.top_k; ++j) {
        std::swap(ids[size_t(j)], ids[size_t(j + int64_t(rng() % uint64_t(s.E - j)))]);
        counts[size_t(ids[size_t(j)])]++;
      }
    }
  } else if (s.uneven) {  // skewed split: expert e gets a share proportional to e + 1
    int64_t left = s.T;
    for (int64_t e = 0; e < s.E; ++e) {
      const int64_t c = e + 1 == s.E ? left : s.T * 2 * (e + 1) / (s.E * (s.E + 1));
      counts[size_t(e)] = int32_t(c);
      left -= c;
    }
  } else {
    for (int64_t e = 0; e < s.E; ++e) counts[size_t(e)] = int32_t(s.T / s.E + (e < s.T % s.E));
  }
  return counts;
}

// Fast fill with random bytes (never zeros), avoiding NaN/inf codes for fp8.
void fill_weights(std::vector<uint8_t>& w, WeightType t, ActType at, uint64_t seed) {
  uint64_t x = seed | 1;
  for (size_t i = 0; i < w.size(); i += 8) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    std::memcpy(&w[i], &x, std::min<size_t>(8, w.size() - i));
  }
  if (t == WeightType::fp8_e4m3)
    for (auto& b : w) b = (b & 0x7f) == 0x7f ? b ^ 1 : b;
  if (t == WeightType::fp8_e5m2)
    for (auto& b : w) b = (b & 0x7c) == 0x7c ? b & 0xbb : b;
  if (t == WeightType::native16) {  // small finite 16-bit values
    auto* h = reinterpret_cast<uint16_t*>(w.data());
    for (size_t i = 0; i < w.size() / 2; ++i) {
      const float v = (float(h[i] & 0x3ff) / 1024.0f - 0.5f) * 0.1f;
      h[i] = at == ActType::f16 ? float_to_f16(v) : float_to_bf16(v);
    }
  }
}

struct Problem {
  MoeGemmParams p;
  std::vector<uint16_t> act, scales, zeros, out;
  std::vector<uint8_t> weights;
  std::vector<int32_t> counts;
  int64_t active_weight_bytes = 0;
};

Problem make_problem(const Shape& s, const Encoding& enc, ActType at, uint64_t seed) {
  Problem pr;
  std::mt19937_64 rng(seed);
  pr.counts = make_counts(s, rng);
  MoeGemmParams& p = pr.p;
  p.act_type = at;
  p.weight_type = enc.type;
  p.asym = enc.asym;
  p.num_experts = s.E;
  p.n = s.N;
  p.k = s.K;
  p.total_tokens = 0;
  for (int32_t c : pr.counts) p.total_tokens += c;
  p.group_size = enc.type == WeightType::native16 ? 0 : 128;
  const auto to_act = [&](float v) { return at == ActType::f16 ? float_to_f16(v) : float_to_bf16(v); };
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  pr.act.resize(size_t(p.total_tokens * s.K));
  for (auto& v : pr.act) v = to_act(unit(rng));
  const int64_t wbytes = s.E * s.N * packed_k(enc.type, s.K) * (enc.type == WeightType::native16 ? 2 : 1);
  pr.weights.resize(size_t(wbytes));
  fill_weights(pr.weights, enc.type, at, seed);
  if (enc.type != WeightType::native16) {
    const int64_t groups = s.E * s.N * (s.K / 128);
    const float base = enc.type == WeightType::fp8_e4m3 ? 1e-3f : enc.type == WeightType::fp8_e5m2 ? 1e-5f : 1e-2f;
    pr.scales.resize(size_t(groups));
    for (auto& v : pr.scales) v = to_act(base * (0.5f + std::fabs(unit(rng))));
    if (enc.asym) {
      pr.zeros.resize(size_t(groups));
      const int levels = (1 << weight_bits(enc.type)) - 1;
      for (auto& v : pr.zeros) v = to_act(float(rng() % uint64_t(levels + 1)));
    }
  }
  pr.out.assign(size_t(p.total_tokens * s.N), 0x7fff);
  p.activations = pr.act.data();
  p.weights = pr.weights.data();
  p.scales = pr.scales.empty() ? nullptr : pr.scales.data();
  p.zeros = pr.zeros.empty() ? nullptr : pr.zeros.data();
  p.tokens_per_expert = pr.counts.data();
  p.out = pr.out.data();
  int64_t active = 0;
  for (int32_t c : pr.counts) active += c > 0;
  pr.active_weight_bytes = active * weight_bytes_per_expert(p);
  return pr;
}

// ‖out − ref‖ / ‖ref‖ over up to `samples` random outputs, in float64.
double sampled_error(const Problem& pr, const std::vector<uint16_t>& out, int samples, uint64_t seed) {
  const MoeGemmParams& p = pr.p;
  if (p.total_tokens == 0) return 0;
  std::vector<int64_t> expert_of(size_t(p.total_tokens));
  for (int64_t e = 0, t = 0; e < p.num_experts; ++e)
    for (int32_t i = 0; i < pr.counts[size_t(e)]; ++i) expert_of[size_t(t++)] = e;
  const auto half = [&](uint16_t h) -> double { return p.act_type == ActType::f16 ? f16_to_float(h) : bf16_to_float(h); };
  std::mt19937_64 rng(seed);
  double num = 0, den = 0;
  for (int i = 0; i < samples; ++i) {
    const int64_t t = int64_t(rng() % uint64_t(p.total_tokens)), n = int64_t(rng() % uint64_t(p.n));
    const int64_t e = expert_of[size_t(t)];
    double ref = 0;
    visit_encoding(p.act_type, p.weight_type, p.asym, [&](auto, auto enc) {
      using Enc = decltype(enc);
      const uint8_t* row = pr.weights.data() + (e * p.n + n) * row_bytes<Enc>(p.k);
      for (int64_t k = 0; k < p.k; ++k) {
        double w = Enc::value(Enc::code(row, k));
        if constexpr (Enc::kScaled) {
          const int64_t g = (e * p.n + n) * (p.k / p.group_size) + k / p.group_size;
          if constexpr (Enc::kAsym) w -= half(pr.zeros[size_t(g)]);
          w *= half(pr.scales[size_t(g)]);
        }
        ref += half(pr.act[size_t(t * p.k + k)]) * w;
      }
    });
    const double o = half(out[size_t(t * p.n + n)]);
    if (!std::isfinite(o)) return INFINITY;
    num += (o - ref) * (o - ref);
    den += ref * ref;
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

std::string fmt1(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f", v);
  return b;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

struct Options {
  bool cuda = false, quick = false;
  std::string phase = "both", shapes = "all", markdown, only;
  std::vector<Encoding> encodings;
  ActType act = ActType::bf16;
  int threads = 0;
};

[[noreturn]] void usage(const char* msg) {
  std::fprintf(stderr,
               "qmoe-bench: %s\nusage: qmoe-bench [--device cpu|cuda] [--quick] [--phase decode|prefill|both]\n"
               "                  [--encodings int4,int8,int2,fp8_e4m3,bf16,...] [--act bf16|f16]\n"
               "                  [--shapes ark|layers|all] [--only SUBSTRING] [--markdown FILE] [--threads N]\n",
               msg);
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  bool device_given = false;
  std::string encs = "int4,int8,int2,fp8_e4m3,bf16";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(("missing value after " + a).c_str());
      return argv[++i];
    };
    if (a == "--device") {
      const std::string d = value();
      if (d != "cpu" && d != "cuda") usage("--device takes cpu or cuda");
      o.cuda = d == "cuda";
      device_given = true;
    } else if (a == "--quick") {
      o.quick = true;
    } else if (a == "--phase") {
      o.phase = value();
      if (o.phase != "decode" && o.phase != "prefill" && o.phase != "both") usage("--phase takes decode, prefill or both");
    } else if (a == "--encodings") {
      encs = value();
    } else if (a == "--act") {
      const std::string v = value();
      if (v != "bf16" && v != "f16") usage("--act takes bf16 or f16");
      o.act = v == "f16" ? ActType::f16 : ActType::bf16;
    } else if (a == "--shapes") {
      o.shapes = value();
      if (o.shapes != "ark" && o.shapes != "layers" && o.shapes != "all") usage("--shapes takes ark, layers or all");
    } else if (a == "--only") {
      o.only = value();
    } else if (a == "--markdown") {
      o.markdown = value();
    } else if (a == "--threads") {
      o.threads = std::atoi(value().c_str());
    } else if (a == "-h" || a == "--help") {
      usage("help");
    } else {
      usage(("unknown argument " + a).c_str());
    }
  }
  std::stringstream ss(encs);
  for (std::string tok; std::getline(ss, tok, ',');) {
    const Encoding* found = nullptr;
    for (const Encoding& e : kEncodings)
      if (tok == e.name) found = &e;
    if (!found) usage(("unknown encoding " + tok).c_str());
    o.encodings.push_back(*found);
  }
  if (!device_given) o.cuda = built_with_cuda() && bench::cuda_device_count() > 0;
  if (o.cuda && !(built_with_cuda() && bench::cuda_device_count() > 0))
    usage("--device cuda: this build has no CUDA or no GPU is present");
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse(argc, argv);
  if (opt.threads > 0) set_num_threads(opt.threads);

  // Anchors of this run.
  std::fprintf(stderr, "measuring anchors...\n");
  const bench::Anchors anchors = opt.cuda ? bench::measure_cuda_anchors() : bench::measure_cpu_anchors(opt.act);

  struct Job {
    Shape shape;
    const char* phase;
  };
  std::vector<Job> jobs;
  const bool want_decode = opt.phase != "prefill", want_prefill = opt.phase != "decode";
  if (opt.quick) {
    if (want_prefill) jobs.push_back({{"ark", 16, 2048, 2048, 256, false, 0}, "prefill"});
    if (want_decode) jobs.push_back({layer_shapes({1})[0], "decode"});
  } else {
    if (want_prefill && opt.shapes != "layers")
      for (const Shape& s : ark_shapes()) jobs.push_back({s, "prefill"});
    if (want_decode && opt.shapes != "ark")
      for (const Shape& s : layer_shapes({1, 8, 64})) jobs.push_back({s, "decode"});
    if (want_prefill && opt.shapes != "ark")
      for (const Shape& s : layer_shapes(opt.cuda ? std::vector<int64_t>{512, 4096} : std::vector<int64_t>{512}))
        jobs.push_back({s, "prefill"});
  }
  if (!opt.only.empty())  // rows whose shape label contains the substring (e.g. "mixtral-8x7b b1")
    jobs.erase(std::remove_if(jobs.begin(), jobs.end(),
                              [&](const Job& j) { return j.shape.label.find(opt.only) == std::string::npos; }),
               jobs.end());

  std::printf("# qmoe-bench — %s, %s, qmoe %s, activations %s\n", anchors.device_name.c_str(),
              opt.cuda ? "CUDA" : "CPU", version(), to_string(opt.act));
  std::printf("# anchors: %s\n", anchors.describe().c_str());
  // CPU: the read bandwidth of this machine drifts by 2x over minutes (a
  // shared host), so each decode row's floor uses the all-threads read
  // bandwidth measured just before and after it (the larger), shown in its
  // own column.
  const bool row_bw = !opt.cuda;
  std::string table =
      "| phase | shape | E | N | K | T | active experts | weights | ms | GFLOP/s | weight GB/s | floor ms | % of floor | rel err |" +
      std::string(row_bw ? " read GB/s (row) |" : "") + "\n" +
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + (row_bw ? "---|" : "") + "\n";
  std::printf("%s", table.c_str());
  const size_t total = jobs.size() * opt.encodings.size();
  const bool progress_tty = isatty(2);
  size_t done = 0;
  bool all_ok = true;
  for (const Job& job : jobs) {
    for (const Encoding& enc : opt.encodings) {
      ++done;
      std::fprintf(stderr, progress_tty ? "\r[%zu/%zu] %s %s %s ...        " : "[%zu/%zu] %s %s %s\n", done, total,
                   job.phase, job.shape.label.c_str(), enc.name);
      const uint64_t seed = 0x9e3779b97f4a7c15ull * done + uint64_t(std::time(nullptr));
      Problem pr = make_problem(job.shape, enc, opt.act, seed);
      const Phase phase = std::strcmp(job.phase, "decode") == 0 ? Phase::decode : Phase::prefill;
      bench::Anchors row_anchors = anchors;
      const bool bw_row = row_bw && phase == Phase::decode;
      const double bw_before = bw_row ? bench::cpu_read_bandwidth_gbs(size_t(1) << 30, 0, 3) : 0;
      bench::Timing tm = opt.cuda ? bench::time_cuda(pr.p, phase, pr.out, opt.quick)
                                  : bench::time_cpu(pr.p, phase, opt.quick);
      if (bw_row)
        row_anchors.bandwidth_gbps = std::max(bw_before, bench::cpu_read_bandwidth_gbs(size_t(1) << 30, 0, 3));
      if (!tm.status.ok()) {
        std::fprintf(stderr, "\nerror: %s\n", tm.status.message.c_str());
        all_ok = false;
        continue;
      }
      const double err = sampled_error(pr, pr.out, opt.quick ? 64 : 256, seed ^ 0x5555);
      const double tol = opt.act == ActType::f16 ? 2e-3 : 1e-2;
      if (!(err < tol)) all_ok = false;
      const MoeGemmParams& p = pr.p;
      const double flops = 2.0 * double(p.total_tokens) * double(p.n) * double(p.k);
      const double io_bytes = double(pr.active_weight_bytes) + 2.0 * double(p.total_tokens) * double(p.k + p.n);
      const double floor_ms = row_anchors.floor_ms(io_bytes, flops);
      int active = 0;
      for (int32_t c : pr.counts) active += c > 0;
      char line[512];
      std::snprintf(line, sizeof line,
                    "| %s | %s | %lld | %lld | %lld | %lld | %d | %s | %.4f | %.1f | %.1f | %.4f | %.0f%% | %.1e%s |%s\n",
                    job.phase, job.shape.label.c_str(), (long long)p.num_experts, (long long)p.n,
                    (long long)p.k, (long long)p.total_tokens, active, enc.name, tm.ms, flops / tm.ms * 1e-6,
                    double(pr.active_weight_bytes) / tm.ms * 1e-6, floor_ms, 100.0 * floor_ms / tm.ms, err,
                    err < tol ? "" : " FAIL",
                    !row_bw ? "" : bw_row ? (" " + fmt1(row_anchors.bandwidth_gbps) + " |").c_str() : " |");
      if (progress_tty) std::fprintf(stderr, "\r");
      std::printf("%s", line);
      std::fflush(stdout);
      table += line;
    }
  }
  if (progress_tty) std::fprintf(stderr, "\n");
  if (!opt.markdown.empty()) {
    std::ofstream f(opt.markdown);
    f << "qmoe-bench on " << anchors.device_name << " (" << (opt.cuda ? "CUDA" : "CPU") << "), activations "
      << to_string(opt.act) << ". Anchors: " << anchors.describe() << "\n\n" << table;
  }
  if (!all_ok) {
    std::fprintf(stderr, "qmoe-bench: some rows failed (error above tolerance or a call failed)\n");
    return 1;
  }
  return 0;
}
