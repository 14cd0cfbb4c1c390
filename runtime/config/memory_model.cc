// The memory model (runtime/config/memory_model.h).
#include "runtime/config/memory_model.h"

#include <sys/statvfs.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "runtime/config/config.h"

namespace moe {
namespace {

constexpr int64_t kFloat = 4;

// Floats and tensors of one FFN of hidden size h on model dim m.
struct FfnSize {
  int64_t floats = 0, tensors = 0;
};
FfnSize Ffn(const config::ExpertConfig& ex, int64_t m, int64_t h) {
  const bool swiglu = ex.kind() == config::SWIGLU;
  FfnSize f;
  f.floats = 2 * m * h + (swiglu ? m * h : 0) + (ex.bias() ? h + m : 0);
  f.tensors = 2 + (swiglu ? 1 : 0) + (ex.bias() ? 2 : 0);
  return f;
}

// Per local group and layer call: the plan's per-(group, expert) counts and row bases (4 + 8 bytes
// each), the loss sums (two E-vectors of doubles) and a group's fixed bookkeeping.
int64_t PerGroupBytes(const config::LayerConfig& l) {
  return static_cast<int64_t>(l.num_experts()) * (4 + 8 + 16) + 256;
}

// Floats of a token-row's hidden activations saved by the forward (h, a, and u for SwiGLU).
int64_t HiddenPerRow(const config::ExpertConfig& ex, int64_t h) {
  return (ex.kind() == config::SWIGLU ? 3 : 2) * h;
}

// Expert rows a call on s tokens in g groups can hold: at capacity (the larger of the train and
// eval factors' C per (group, expert)), every slot when dropless; expert choice G·E·C, Soft MoE
// G·E·p.
int64_t RowsOfCall(const config::LayerConfig& l, int64_t s) {
  const auto& r = l.router();
  const int64_t e = l.num_experts(), g = std::max<int64_t>(1, r.num_local_groups());
  if (r.gate() == config::SOFT) return g * e * r.slots_per_expert();
  const int64_t c = std::max(ComputeCapacity(r, e, s, g, true), ComputeCapacity(r, e, s, g, false));
  if (r.gate() == config::EXPERT_CHOICE) return g * e * c;
  const int64_t slots = s * TopK(r);
  return c > 0 ? std::min(slots, g * e * c) : slots;
}

std::string Fixed(double v, int digits) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.*f", digits, v);
  return buf;
}

}  // namespace

int64_t MemoryEstimate::total() const {
  int64_t t = 0;
  for (const MemoryTerm& m : terms) t += m.bytes;
  return t;
}

void MemoryEstimate::Add(std::string what, int64_t bytes, std::string field) {
  if (bytes <= 0) return;
  for (MemoryTerm& m : terms) {
    if (m.what == what) {
      m.bytes += bytes;
      return;
    }
  }
  terms.push_back({std::move(what), bytes, std::move(field)});
}

void MemoryEstimate::AddAll(const MemoryEstimate& other, int64_t times) {
  for (const MemoryTerm& m : other.terms) Add(m.what, m.bytes * times, m.field);
}

std::string MemoryEstimate::Summary(int largest) const {
  std::vector<MemoryTerm> sorted = terms;
  std::stable_sort(sorted.begin(), sorted.end(),
                   [](const MemoryTerm& a, const MemoryTerm& b) { return a.bytes > b.bytes; });
  std::string out = FormatBytes(static_cast<double>(total())) + " (largest: ";
  for (int i = 0; i < largest && i < static_cast<int>(sorted.size()); ++i) {
    if (i > 0) out += ", ";
    out += sorted[static_cast<size_t>(i)].what + " " +
           FormatBytes(static_cast<double>(sorted[static_cast<size_t>(i)].bytes)) + " [" +
           sorted[static_cast<size_t>(i)].field + "]";
  }
  return out + ")";
}

std::string FormatBytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  int u = 0;
  while (bytes >= 1024.0 && u < 5) {
    bytes /= 1024.0;
    ++u;
  }
  return u == 0 ? Fixed(bytes, 0) + " B" : Fixed(bytes, bytes < 10 ? 2 : 1) + " " + units[u];
}

MemoryEstimate LayerCallMemory(const config::LayerConfig& l, int64_t s, bool backward) {
  MemoryEstimate est;
  const int64_t m = l.model_dim(), e = l.num_experts(), h = l.expert().hidden_dim();
  const int64_t hs = SharedHidden(l), ns = l.num_shared_experts(), rc = RouterColumns(l);
  const bool noisy = l.router().gate() == config::NOISY_TOPK;
  const FfnSize expert = Ffn(l.expert(), m, h), shared = Ffn(l.expert(), m, hs);
  const int64_t copies = backward ? 2 : 1;  // parameters, and their gradients
  est.Add("router weights", copies * kFloat * m * (rc + (noisy ? e : 0)), "moe.num_experts");
  est.Add("routed experts' parameters",
          copies * e * (kFloat * expert.floats + kTensorOverheadBytes * expert.tensors),
          "moe.num_experts, moe.expert.hidden_dim");
  est.Add("shared experts' parameters",
          copies * ns * (kFloat * shared.floats + kTensorOverheadBytes * shared.tensors),
          "moe.num_shared_experts");
  est.Add("selection bias", kFloat * e, "moe.num_experts");
  // x (read and copied), y; dy and dx.
  est.Add("token tensors", kFloat * s * m * (backward ? 5 : 3), "--input rows");
  // logits, probs (noisy: eps and noise inputs; Soft MoE: dispatch weights); backward: dlogits,
  // dprobs, dscores (noisy: dnoise).
  const int64_t router_arrays = 2 + (noisy ? 2 : 0) + (l.router().gate() == config::SOFT ? 1 : 0) +
                                (backward ? 3 + (noisy ? 1 : 0) : 0);
  est.Add("router activations", kFloat * s * rc * router_arrays, "moe.num_experts");
  // Per expert row: the gathered input and the output (M each) and the hidden activations; the
  // backward adds dY and dX rows and the hidden scratch.
  const int64_t rows = RowsOfCall(l, s);
  const int64_t per_row = 2 * m + HiddenPerRow(l.expert(), h) + (backward ? 2 * m + 2 * h : 0);
  est.Add("expert rows", kFloat * rows * per_row, "moe.router.capacity_factor_*");
  est.Add("shared expert activations", kFloat * ns * s * HiddenPerRow(l.expert(), hs),
          "moe.num_shared_experts");
  // Plan: per slot expert/row/gate/raw/final/selected (6 words), per row token/expert/gate, per
  // token row offsets.
  const int64_t k = l.router().gate() == config::EXPERT_CHOICE || l.router().gate() == config::SOFT
                        ? 1
                        : TopK(l.router());
  est.Add("routing plan", 4 * (6 * s * k + 3 * rows) + 8 * s, "--input rows");
  est.Add("per-group routing state",
          std::max<int64_t>(1, l.router().num_local_groups()) * PerGroupBytes(l),
          "moe.router.num_local_groups");
  return est;
}

MemoryEstimate TrainRankMemory(const config::MoeConfig& cfg, int world, bool account_padding) {
  MemoryEstimate est;
  const config::LayerConfig& l = cfg.moe();
  const int64_t m = l.model_dim(), e = l.num_experts(), h = l.expert().hidden_dim();
  const int64_t hs = SharedHidden(l), ns = l.num_shared_experts(), rc = RouterColumns(l);
  const int64_t layers = cfg.model().num_layers(), t = cfg.model().context();
  const int64_t ep = cfg.parallel().ep_size() > 0 ? cfg.parallel().ep_size() : world;
  // Physical experts per rank: E / W, or (E + R) / W with redundant experts.
  const int64_t local = (e + std::max(0, cfg.parallel().num_redundant_experts())) /
                        std::max<int64_t>(1, ep);
  // Tokens per rank: a training step's, or an evaluation batch's when larger (evaluation runs
  // through the same layers, whose buffers grow to it and stay).
  int64_t s = cfg.train().global_batch_tokens() / std::max(1, world);
  if (cfg.train().eval_every() > 0) {
    const int64_t groups = std::max<int64_t>(1, l.router().num_local_groups());
    s = std::max(s, std::max<int64_t>(groups, cfg.train().eval_tokens() / std::max(1, world)));
  }
  const bool noisy = l.router().gate() == config::NOISY_TOPK;
  const FfnSize expert = Ffn(l.expert(), m, h), shared = Ffn(l.expert(), m, hs);
  // Parameters, gradients, AdamW's two moments: 4 copies.
  constexpr int64_t kCopies = 4;
  est.Add("embeddings and head (+grads, AdamW)",
          kCopies * kFloat * (t * 256 * m + m * 256 + 256 + 2 * m + layers * 2 * m),
          "model.context, moe.model_dim");
  est.Add("routers (+grads, AdamW)", kCopies * kFloat * layers * m * (rc + (noisy ? e : 0)),
          "moe.num_experts");
  est.Add("this rank's experts (+grads, AdamW)",
          kCopies * layers * local * (kFloat * expert.floats + kTensorOverheadBytes * expert.tensors),
          "moe.num_experts / parallel.ep_size, moe.expert.hidden_dim");
  est.Add("shared experts (+grads, AdamW)",
          kCopies * layers * ns * (kFloat * shared.floats + kTensorOverheadBytes * shared.tensors),
          "moe.num_shared_experts");
  // A step's activations, every layer's kept for the backward: the residual stream, the norm's
  // output and the MoE output (M each per token), the layer's token copies and gradients (x, y,
  // dy, dx), the router arrays kept for the backward (logits, probs; noisy: the noise and its
  // draws; Soft MoE: the dispatch weights); the router backward's scratch (dlogits, dprobs,
  // dscores; noisy: dnoise), one set per rank thread; then the head's logits and their gradient.
  const bool soft = l.router().gate() == config::SOFT;
  const int64_t router_arrays = 2 + (noisy ? 2 : 0) + (soft ? 1 : 0);
  const int64_t router_scratch = 3 + (noisy ? 1 : 0);
  est.Add("token activations", kFloat * layers * s * (7 * m + rc * router_arrays) +
                                   kFloat * s * rc * router_scratch + kFloat * s * 2 * 256 +
                                   s * (t + 4),
          "train.global_batch_tokens / world");
  // Expert rows: what this rank sends (its slots at capacity, or all of them dropless) and what it
  // receives for its experts (capacity: every rank's block for each of its experts; dropless: at
  // most every token of the EP group once per local expert it picked), forward and backward.
  int64_t sent = RowsOfCall(l, s);
  const auto& r = l.router();
  const int64_t g = std::max<int64_t>(1, r.num_local_groups());
  const int64_t c = std::max(ComputeCapacity(r, e, s, g, true), ComputeCapacity(r, e, s, g, false));
  const bool bounded = r.gate() == config::SOFT || r.gate() == config::EXPERT_CHOICE || c > 0;
  const int64_t k = r.gate() == config::SOFT || r.gate() == config::EXPERT_CHOICE ? 1 : TopK(r);
  int64_t received =
      bounded ? sent  // the blocks of every rank for this rank's experts: G·(E/W)·C·W = G·E·C
              : ep * s * std::min<int64_t>(k, local);
  const bool token_choice = r.gate() != config::SOFT && r.gate() != config::EXPERT_CHOICE;
  if (account_padding && bounded && token_choice && !cfg.parallel().dropless_exchange()) {
    // Only real rows move: at most this rank's slots, and at most every token of the group once
    // per local expert it picked.
    sent = std::min(sent, s * k);
    received = std::min(received, ep * s * std::min<int64_t>(k, local));
  }
  const int64_t hidden = HiddenPerRow(l.expert(), h);
  // M-wide copies of a received row the engine keeps per layer through the step: the experts'
  // input and output, forward and backward; across ranks also the receive rows and the combine's
  // rows, and with several local experts the expert-major copy of both passes (measured on the
  // 68M config: without these the estimate was 20-27% low on 2 and 4 ranks).
  const int64_t received_copies = ep > 1 ? (local > 1 ? 8 : 6) : 4;
  // Sent rows: the send layout of each pass, into which the combine's rows also return (fp32);
  // on the bf16 wire the 2-byte send and return rows and the float returns (ExchangeHandle).
  const int64_t sent_copies = cfg.parallel().wire_dtype() == config::BF16 ? 4 : 2;
  est.Add(bounded ? "expert rows at capacity" : "expert rows, dropless worst case",
          kFloat * layers * (sent * sent_copies * m + received * (received_copies * m + hidden + 2 * h)),
          bounded ? "moe.router.capacity_factor_*" : "moe.router.capacity_factor_train <= 0");
  est.Add("shared expert activations", kFloat * layers * ns * s * HiddenPerRow(l.expert(), hs),
          "moe.num_shared_experts");
  // Routing state per local group and layer, and each group's data shard bookkeeping.
  est.Add("per-group routing state", layers * g * PerGroupBytes(l) + g * 256,
          "moe.router.num_local_groups");
  return est;
}

MemoryEstimate SimulatorMemory(const config::MoeConfig& cfg, int ranks) {
  MemoryEstimate est;
  const int64_t w = ranks, steps = cfg.train().steps(), layers = cfg.model().num_layers();
  const int64_t d = std::max(1, cfg.parallel().pipeline_degree());
  // Per layer and step: forward and backward dispatch and combine per chunk, a counts call when
  // dropless; an ExchangeCall is ~160 bytes plus its W-long int64 vector.
  const int64_t calls = layers * (4 * d + (cfg.parallel().dropless_exchange() ? 1 : 0));
  est.Add("simulator: exchange records", steps * w * calls * (160 + 8 * w), "train.steps, --ranks");
  // measured.json as text (~12 bytes a number), and the string it is built in.
  constexpr int64_t kText = 2 * 12;
  const int64_t matrices = 1 + (w <= 64 ? calls : 0);
  est.Add("simulator: measured.json", kText * steps * (matrices * w * w + 8 * w), "train.steps, --ranks");
  return est;
}

int64_t LayerWeightFileBytes(const config::LayerConfig& l, int64_t* files) {
  constexpr int64_t kHeader = 128;
  const int64_t m = l.model_dim(), e = l.num_experts(), h = l.expert().hidden_dim();
  const FfnSize expert = Ffn(l.expert(), m, h), shared = Ffn(l.expert(), m, SharedHidden(l));
  const bool noisy = l.router().gate() == config::NOISY_TOPK;
  const int64_t n = 1 + (noisy ? 1 : 0) + e * expert.tensors + l.num_shared_experts() * shared.tensors;
  if (files != nullptr) *files = n;
  return n * kHeader + kFloat * (m * (RouterColumns(l) + (noisy ? e : 0)) + e * expert.floats +
                                 l.num_shared_experts() * shared.floats);
}

Status CheckMemory(const MemoryEstimate& estimate, int64_t limit, const std::string& what,
                   const std::string& limit_name, const std::string& flag) {
  if (limit <= 0 || estimate.total() <= limit) return Status::Ok();
  return InvalidArgument(what + " needs an estimated " + estimate.Summary(3) + ", above " +
                         limit_name + " " + FormatBytes(static_cast<double>(limit)) +
                         "; lower the fields in brackets or raise " + flag);
}

int64_t AvailableMemoryBytes() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  int64_t kb = 0;
  std::string unit;
  while (in >> key >> kb >> unit) {
    if (key == "MemAvailable:") return kb * 1024;
  }
  return 0;
}

int64_t ResidentBytes() {
  std::ifstream in("/proc/self/status");
  std::string key;
  while (in >> key) {
    if (key == "VmRSS:") {
      int64_t kb = 0;
      in >> kb;
      return kb * 1024;
    }
  }
  return 0;
}

int64_t FreeDiskBytes(const std::string& path) {
  std::filesystem::path p = std::filesystem::absolute(path.empty() ? "." : path);
  std::error_code ec;
  while (!p.empty() && !std::filesystem::exists(p, ec)) {
    if (p == p.parent_path()) break;
    p = p.parent_path();
  }
  struct statvfs st {};
  if (statvfs(p.c_str(), &st) != 0) return -1;
  return static_cast<int64_t>(st.f_bavail) * static_cast<int64_t>(st.f_frsize);
}

StatusOr<int64_t> ParseByteSize(const std::string& flag, const std::string& text) {
  std::string t = text;
  if (!t.empty() && (t.back() == 'B' || t.back() == 'b')) t.pop_back();
  double scale = 1.0;
  if (!t.empty()) {
    switch (t.back()) {
      case 'K': case 'k': scale = 1024.0; break;
      case 'M': case 'm': scale = 1024.0 * 1024; break;
      case 'G': case 'g': scale = 1024.0 * 1024 * 1024; break;
      case 'T': case 't': scale = 1024.0 * 1024 * 1024 * 1024; break;
      default: break;
    }
    if (scale != 1.0) t.pop_back();
  }
  char* end = nullptr;
  const double v = t.empty() ? -1.0 : std::strtod(t.c_str(), &end);
  if (t.empty() || end != t.c_str() + t.size() || !std::isfinite(v) || v <= 0 ||
      v * scale > 9.0e18) {
    return InvalidArgument(flag + "='" + text +
                           "' must be a positive size (bytes, or a number with K, M, G or T)");
  }
  return static_cast<int64_t>(v * scale);
}

}  // namespace moe
