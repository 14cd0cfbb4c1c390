// moe_simulate: runs an N-rank expert-parallel training job as N threads (loopback backend, CPU)
// with the same Trainer, model and config as moe_train, records what it measured and predicts the
// step time on a target cluster with the alpha-beta cost model (runtime/cost_model.h).
//
//   moe_simulate --config configs/tiny_lm.textproto --ranks 4 [--steps 20]
//                [--topology configs/topologies/dgx_h100_8x8.textproto] --out DIR
//   moe_simulate --config configs/tiny_lm.textproto --validate --out DIR
//
// --topology reads a standalone moe.config.TopologyConfig text file (configs/topologies/). The N
// simulated ranks are placed node-major on that cluster's link parameters: min(gpus_per_node, N)
// ranks per node (override with --gpus-per-node), N / that many nodes.
//
// Measurement: the world communicator is wrapped in a recording decorator; its first Split (the
// Trainer's expert-parallel communicator) records, per rank, the bytes of every float all-to-all
// per destination. Calls alternate dispatch / combine (forward then backward, per layer); the
// EP communicator's one AllReduce per step (the gradient norm) closes a step. Evaluation is
// switched off in the simulated run so every step has the same exchange pattern (it does not
// change the training loss). Per-rank compute and all-to-all time come from each rank's
// Trainer::history() (the executors' ExchangeStats of that rank).
//
// Outputs: DIR/measured.json, DIR/expert_load.svg, DIR/rank_time.svg, and with --topology
// DIR/predicted.json (+ a table on stdout); --validate writes DIR/validate.json.
#include <CLI/CLI.hpp>
#include <google/protobuf/text_format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <optional>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "comm/loopback/loopback_world.h"
#include "experts/cpu/blas.h"
#include "runtime/base/clock.h"
#include "runtime/base/file.h"
#include "runtime/config.h"
#include "runtime/cost_model.h"
#include "runtime/trainer.h"

namespace {

using moe::Status;
using moe::StatusOr;
using moe::TrafficMatrix;

int Fail(const std::string& message, int code) {
  std::fprintf(stderr, "moe_simulate: %s\n", message.c_str());
  return code;
}


// ---- Recording communicator -------------------------------------------------------------------

struct RankRecord {
  // steps[s][call][dst] = bytes this rank sent to dst in float all-to-all `call` of step s.
  std::vector<std::vector<std::vector<double>>> steps;
  std::vector<std::vector<double>> current;
  bool ep_assigned = false;
};

class RecordingComm : public moe::comm::Communicator {
 public:
  RecordingComm(moe::comm::Communicator* inner, std::unique_ptr<moe::comm::Communicator> owned, RankRecord* rec,
                bool record)
      : Communicator(inner->options()), inner_(inner), owned_(std::move(owned)), rec_(rec), record_(record) {}
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  moe::comm::MemorySpace memory_space() const override { return inner_->memory_space(); }
  std::string_view backend() const override { return inner_->backend(); }

 protected:
  static double Bytes(moe::comm::DataType t) {
    switch (t) {
      case moe::comm::DataType::kFloat64: case moe::comm::DataType::kInt64: return 8;
      case moe::comm::DataType::kUint8: return 1;
      default: return 4;
    }
  }
  Status DoAllToAll(uint64_t, const void* send, void* recv, int64_t count, moe::comm::DataType dtype) override {
    if (record_ && dtype == moe::comm::DataType::kFloat32) {
      rec_->current.push_back(std::vector<double>(static_cast<size_t>(size()), static_cast<double>(count) * 4));
    }
    return inner_->AllToAll(send, recv, count, dtype);
  }
  StatusOr<std::unique_ptr<moe::comm::Request>> DoStartAllToAllV(uint64_t, const AllToAllVArgs& a) override {
    if (record_ && a.dtype == moe::comm::DataType::kFloat32) {
      std::vector<double> row;
      for (int64_t c : a.send_counts) row.push_back(static_cast<double>(c) * Bytes(a.dtype));
      rec_->current.push_back(std::move(row));
    }
    return inner_->StartAllToAllV(a.send, a.send_counts, a.send_displs, a.recv, a.recv_counts, a.recv_displs,
                                  a.dtype);
  }
  Status DoAllReduce(uint64_t, const void* send, void* recv, int64_t count, moe::comm::DataType dtype,
                     moe::comm::ReduceOp op) override {
    if (record_) {  // the gradient norm: the step's exchanges are complete
      rec_->steps.push_back(std::move(rec_->current));
      rec_->current.clear();
    }
    return inner_->AllReduce(send, recv, count, dtype, op);
  }
  Status DoAllGather(uint64_t, const void* send, void* recv, int64_t count, moe::comm::DataType dtype) override {
    return inner_->AllGather(send, recv, count, dtype);
  }
  Status DoBroadcast(uint64_t, void* buffer, int64_t count, moe::comm::DataType dtype, int root) override {
    return inner_->Broadcast(buffer, count, dtype, root);
  }
  Status DoBarrier(uint64_t) override { return inner_->Barrier(); }
  StatusOr<std::unique_ptr<moe::comm::Communicator>> DoSplit(uint64_t, int color, int key) override {
    MOE_ASSIGN_OR_RETURN(std::unique_ptr<moe::comm::Communicator> child, inner_->Split(color, key));
    if (child == nullptr) return std::unique_ptr<moe::comm::Communicator>();
    const bool record = !rec_->ep_assigned;  // Trainer::Init splits the EP communicator first
    rec_->ep_assigned = true;
    moe::comm::Communicator* raw = child.get();
    return std::unique_ptr<moe::comm::Communicator>(new RecordingComm(raw, std::move(child), rec_, record));
  }

 private:
  moe::comm::Communicator* inner_;
  std::unique_ptr<moe::comm::Communicator> owned_;
  RankRecord* rec_;
  bool record_;
};

// ---- One simulated run ------------------------------------------------------------------------

struct RunResult {
  int ranks = 0;
  std::vector<std::vector<moe::report::StepMetrics>> history;  // [rank][step]
  std::vector<RankRecord> records;                             // [rank]
  double replicated_params = 0;
  int steps() const { return history.empty() ? 0 : static_cast<int>(history[0].size()); }
  // Full matrix of call c in step s.
  TrafficMatrix Matrix(int s, size_t c) const {
    TrafficMatrix m;
    for (const RankRecord& r : records) m.push_back(r.steps[static_cast<size_t>(s)][c]);
    return m;
  }
  size_t calls(int s) const { return records[0].steps[static_cast<size_t>(s)].size(); }
};

StatusOr<RunResult> Simulate(const moe::MoeConfig& cfg, int ranks, bool quiet) {
  moe::comm::LoopbackOptions opts;
  opts.options.deadline_seconds = cfg.comm().deadline_seconds();
  MOE_ASSIGN_OR_RETURN(moe::comm::LoopbackWorld world, moe::comm::LoopbackWorld::Create(ranks, opts));
  RunResult out;
  out.ranks = ranks;
  out.history.resize(static_cast<size_t>(ranks));
  out.records.resize(static_cast<size_t>(ranks));
  std::vector<Status> status(static_cast<size_t>(ranks));
  std::mutex mu;
  world.RunPerRank([&](moe::comm::Communicator& base) {
    const size_t r = static_cast<size_t>(base.rank());
    RecordingComm comm(&base, nullptr, &out.records[r], false);
    moe::TrainOptions options;
    options.quiet = quiet;
    options.log_every = 5;
    options.run_label = "(moe_simulate)";
    auto trainer = moe::Trainer::Create(cfg, &comm, options);
    Status s = trainer.ok() ? (*trainer)->Run() : trainer.status();
    std::lock_guard<std::mutex> lock(mu);
    status[r] = s;
    if (s.ok()) {
      out.history[r] = (*trainer)->history();
      if (r == 0) {
        for (const moe::ParamRef& p : (*trainer)->model().Params()) {
          if (p.expert_id < 0) out.replicated_params += static_cast<double>(p.value->size());
        }
      }
    }
  });
  for (int r = 0; r < ranks; ++r) {
    if (!status[static_cast<size_t>(r)].ok()) return status[static_cast<size_t>(r)].WithContext("rank " + std::to_string(r));
  }
  for (const RankRecord& rec : out.records) {
    if (rec.steps.size() != static_cast<size_t>(out.steps())) {
      return moe::Internal("recorded " + std::to_string(rec.steps.size()) + " steps of exchanges, trainer ran " +
                           std::to_string(out.steps()));
    }
  }
  return out;
}

// Traffic, FLOPs and all-reduce bytes of step s, as the cost model wants them.
moe::StepTraffic StepInputs(const RunResult& run, const moe::MoeConfig& cfg, int s) {
  moe::StepTraffic t;
  const double m = cfg.moe().model_dim(), h = cfg.moe().expert().hidden_dim();
  const double mats = cfg.moe().expert().kind() == moe::config::SWIGLU ? 3 : 2;
  const double fwd_per_row = 2 * m * h * mats;
  t.expert_flops.assign(static_cast<size_t>(run.ranks), 0.0);
  for (size_t c = 0; c < run.calls(s); ++c) {
    TrafficMatrix mat = run.Matrix(s, c);
    if (c % 2 == 0) {
      // Dispatch: forward (x1 GEMM work) and backward (x2: dX and dW) alternate per layer;
      // average 1.5 x forward per dispatch.
      for (size_t d = 0; d < mat.size(); ++d) {
        double rows = 0;
        for (size_t src = 0; src < mat.size(); ++src) rows += mat[src][d] / (m * 4);
        t.expert_flops[d] += rows * fwd_per_row * 1.5;
      }
      t.dispatch.push_back(std::move(mat));
    } else {
      t.combine.push_back(std::move(mat));
    }
  }
  const double tokens = static_cast<double>(cfg.train().global_batch_tokens()) / run.ranks;
  const double other = tokens * 3 * (2 * m * 256 + cfg.model().num_layers() * 2 * m * cfg.moe().num_experts());
  t.other_flops.assign(static_cast<size_t>(run.ranks), other);
  t.allreduce_bytes = run.replicated_params * 4;
  return t;
}

// ---- Output helpers -----------------------------------------------------------------------------

std::string Color(double f) {  // white -> dark red
  f = std::clamp(f, 0.0, 1.0);
  char buf[16];
  std::snprintf(buf, sizeof(buf), "#%02x%02x%02x", 255, static_cast<int>(255 * (1 - f)), static_cast<int>(255 * (1 - f)));
  return buf;
}

std::string ExpertLoadSvg(const RunResult& run) {
  const auto& h = run.history[0];
  const int steps = run.steps(), e = h.empty() ? 0 : h[0].tokens_per_expert_size();
  double mx = 1;
  for (const auto& m : h) for (int64_t v : m.tokens_per_expert()) mx = std::max(mx, static_cast<double>(v));
  const int cw = std::max(4, 600 / std::max(1, steps)), ch = 20, x0 = 70, y0 = 30;
  std::ostringstream o;
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << x0 + cw * steps + 120 << "\" height=\""
    << y0 + ch * e + 40 << "\" font-family=\"sans-serif\" font-size=\"11\">\n";
  o << "<text x=\"" << x0 << "\" y=\"18\">expert load (tokens routed, all ranks and layers) per step; max "
    << mx << "</text>\n";
  for (int x = 0; x < e; ++x) {
    o << "<text x=\"5\" y=\"" << y0 + ch * x + 14 << "\">expert " << x << "</text>\n";
    for (int s = 0; s < steps; ++s) {
      const double v = static_cast<double>(h[static_cast<size_t>(s)].tokens_per_expert(x));
      o << "<rect x=\"" << x0 + cw * s << "\" y=\"" << y0 + ch * x << "\" width=\"" << cw << "\" height=\"" << ch
        << "\" fill=\"" << Color(v / mx) << "\"><title>step " << s << " expert " << x << ": " << v
        << "</title></rect>\n";
    }
  }
  o << "<text x=\"" << x0 << "\" y=\"" << y0 + ch * e + 16 << "\">step 0 .. " << steps - 1 << " &#8594;</text>\n";
  o << "</svg>\n";
  return o.str();
}

struct RankTimes { double experts = 0, a2a = 0, other = 0; };

std::vector<RankTimes> MeanRankTimes(const RunResult& run) {
  std::vector<RankTimes> out(static_cast<size_t>(run.ranks));
  for (int r = 0; r < run.ranks; ++r) {
    for (const auto& m : run.history[static_cast<size_t>(r)]) {
      out[static_cast<size_t>(r)].experts += m.expert_seconds() / run.steps();
      out[static_cast<size_t>(r)].a2a += m.alltoall_seconds() / run.steps();
      out[static_cast<size_t>(r)].other +=
          std::max(0.0, m.step_seconds() - m.expert_seconds() - m.alltoall_seconds()) / run.steps();
    }
  }
  return out;
}

std::string RankTimeSvg(const std::vector<RankTimes>& t) {
  double mx = 1e-9;
  for (const auto& x : t) mx = std::max(mx, x.experts + x.a2a + x.other);
  const int bw = 60, gap = 30, x0 = 60, y0 = 40, hgt = 300;
  std::ostringstream o;
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << x0 + (bw + gap) * t.size() + 160
    << "\" height=\"" << y0 + hgt + 40 << "\" font-family=\"sans-serif\" font-size=\"11\">\n";
  o << "<text x=\"" << x0 << "\" y=\"18\">mean step time per rank (ms): experts / all-to-all / other; top = "
    << mx * 1e3 << " ms</text>\n";
  const char* colors[3] = {"#4c78a8", "#f58518", "#9d9d9d"};
  const char* names[3] = {"experts", "all-to-all", "other"};
  for (size_t r = 0; r < t.size(); ++r) {
    const double v[3] = {t[r].experts, t[r].a2a, t[r].other};
    double y = y0 + hgt;
    for (int k = 0; k < 3; ++k) {
      const double hh = v[k] / mx * hgt;
      y -= hh;
      o << "<rect x=\"" << x0 + (bw + gap) * r << "\" y=\"" << y << "\" width=\"" << bw << "\" height=\"" << hh
        << "\" fill=\"" << colors[k] << "\"><title>rank " << r << " " << names[k] << ": " << v[k] * 1e3
        << " ms</title></rect>\n";
    }
    o << "<text x=\"" << x0 + (bw + gap) * r << "\" y=\"" << y0 + hgt + 16 << "\">rank " << r << "</text>\n";
  }
  for (int k = 0; k < 3; ++k) {
    const size_t lx = x0 + (bw + gap) * t.size() + 10;
    o << "<rect x=\"" << lx << "\" y=\"" << y0 + 20 * k << "\" width=\"12\" height=\"12\" fill=\"" << colors[k]
      << "\"/><text x=\"" << lx + 16 << "\" y=\"" << y0 + 20 * k + 10 << "\">" << names[k] << "</text>\n";
  }
  o << "</svg>\n";
  return o.str();
}

template <typename T>
std::string JsonArray(const std::vector<T>& v) {
  std::ostringstream o;
  o.precision(9);
  o << "[";
  for (size_t i = 0; i < v.size(); ++i) o << (i ? "," : "") << v[i];
  o << "]";
  return o.str();
}

std::string MatrixJson(const TrafficMatrix& m) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < m.size(); ++i) o << (i ? "," : "") << JsonArray(m[i]);
  o << "]";
  return o.str();
}

std::string MeasuredJson(const RunResult& run, const moe::MoeConfig& cfg) {
  std::ostringstream o;
  o.precision(9);
  o << "{\n  \"ranks\": " << run.ranks << ",\n  \"steps\": " << run.steps() << ",\n  \"model_dim\": "
    << cfg.moe().model_dim() << ",\n  \"num_experts\": " << cfg.moe().num_experts()
    << ",\n  \"bytes_per_element\": 4,\n  \"final_loss\": " << std::setprecision(17) << run.history[0].back().loss()
    << std::setprecision(9)
    << ",\n  \"per_step\": [\n";
  for (int s = 0; s < run.steps(); ++s) {
    const auto& m0 = run.history[0][static_cast<size_t>(s)];
    std::vector<double> a2a, expert, compute, step;
    for (int r = 0; r < run.ranks; ++r) {
      const auto& m = run.history[static_cast<size_t>(r)][static_cast<size_t>(s)];
      a2a.push_back(m.alltoall_seconds());
      expert.push_back(m.expert_seconds());
      compute.push_back(m.step_seconds() - m.alltoall_seconds());
      step.push_back(m.step_seconds());
    }
    TrafficMatrix total(static_cast<size_t>(run.ranks), std::vector<double>(static_cast<size_t>(run.ranks), 0.0));
    std::vector<std::string> calls;
    for (size_t c = 0; c < run.calls(s); ++c) {
      const TrafficMatrix m = run.Matrix(s, c);
      for (size_t i = 0; i < m.size(); ++i)
        for (size_t j = 0; j < m.size(); ++j) total[i][j] += m[i][j];
    }
    std::vector<int64_t> load(m0.tokens_per_expert().begin(), m0.tokens_per_expert().end());
    o << "    {\"step\": " << s << ", \"loss\": " << m0.loss() << ", \"drop_fraction\": " << m0.drop_fraction()
      << ", \"imbalance\": " << m0.imbalance() << ", \"tokens_per_expert\": " << JsonArray(load)
      << ",\n     \"step_seconds\": " << JsonArray(step) << ", \"alltoall_seconds\": " << JsonArray(a2a)
      << ", \"expert_seconds\": " << JsonArray(expert) << ", \"compute_seconds\": " << JsonArray(compute)
      << ",\n     \"alltoall_calls\": " << run.calls(s)
      << ", \"bytes_src_dst\": " << MatrixJson(total) << "}" << (s + 1 < run.steps() ? "," : "") << "\n";
  }
  o << "  ],\n  \"notes\": \"bytes_src_dst: float bytes each rank sent to each rank in all dispatch+combine "
       "all-to-alls of the step (forward and backward, all layers), self block included; compute_seconds = "
       "step - all-to-all per rank; tokens_per_expert summed over ranks and layers\"\n}\n";
  return o.str();
}

// ---- main ---------------------------------------------------------------------------------------

struct Flags {
  std::string config, topology, out, data;
  int ranks = 1, steps = -1, gpus_per_node = 0;
  bool validate = false, verbose = false;
  double efficiency = 0.6;
};

StatusOr<moe::config::TopologyConfig> LoadTopology(const std::string& path) {
  std::ifstream in(path);
  if (!in) return moe::NotFound("--topology " + path + ": cannot open");
  std::stringstream ss;
  ss << in.rdbuf();
  moe::config::TopologyConfig t;
  if (!google::protobuf::TextFormat::ParseFromString(ss.str(), &t)) {
    return moe::InvalidArgument("--topology " + path + ": not a moe.config.TopologyConfig text proto");
  }
  MOE_RETURN_IF_ERROR(moe::ValidateTopology(t, 0).WithContext("--topology " + path));
  return t;
}

bool WriteText(const std::string& path, const std::string& text) {
  std::ofstream f(path);
  f << text;
  return static_cast<bool>(f);
}

// Validation: alpha, beta of the loopback backend at `ranks` threads from an all-to-all sweep.
StatusOr<moe::AlphaBetaFit> SweepLoopback(int ranks) {
  std::vector<std::pair<double, double>> pts;
  for (int64_t floats : {256, 4096, 32768, 131072}) {
    moe::comm::LoopbackOptions opts;
    MOE_ASSIGN_OR_RETURN(moe::comm::LoopbackWorld world, moe::comm::LoopbackWorld::Create(ranks, opts));
    const int reps = 20;
    std::vector<double> secs(static_cast<size_t>(ranks));
    world.RunPerRank([&](moe::comm::Communicator& c) {
      std::vector<float> send(static_cast<size_t>(floats * ranks), 1.0f), recv(send.size());
      (void)c.AllToAll(send.data(), recv.data(), floats, moe::comm::DataType::kFloat32);  // warm-up
      const double t0 = moe::WallSeconds();
      for (int i = 0; i < reps; ++i) (void)c.AllToAll(send.data(), recv.data(), floats, moe::comm::DataType::kFloat32);
      secs[static_cast<size_t>(c.rank())] = (moe::WallSeconds() - t0) / reps;
    });
    double mean = 0;
    for (double s : secs) mean += s / ranks;
    // Per message (self block included): time / ranks.
    pts.push_back({static_cast<double>(floats) * 4, mean / ranks});
  }
  return moe::FitAlphaBeta(pts);
}

int Validate(const Flags& f, const moe::MoeConfig& base) {
  std::printf("validation: loopback alpha-beta fit per world size, then the trainer's measured all-to-all time\n");
  std::printf("%6s %12s %12s %16s %16s %9s\n", "ranks", "alpha_us", "beta_GB/s", "predicted_ms/step",
              "measured_ms/step", "error%");
  std::ostringstream js;
  js << "{\"rows\": [";
  int i = 0;
  for (int ranks : {1, 2, 4}) {
    auto fit = SweepLoopback(ranks);
    if (!fit.ok()) return Fail(fit.status().ToString(), 1);
    moe::config::TopologyConfig t;
    t.set_name("cpu_local_fitted");
    t.set_nodes(1);
    t.set_gpus_per_node(ranks);
    t.set_intra_latency_us(std::max(0.0, fit->alpha_seconds) * 1e6);
    t.set_intra_bandwidth_gbps(fit->beta_bytes_per_second / 1e9);
    t.set_inter_latency_us(t.intra_latency_us());
    t.set_inter_bandwidth_gbps(t.intra_bandwidth_gbps());
    t.set_gpu_tflops(0.04);
    moe::CostModelOptions o;
    o.count_self = true;
    auto model = moe::CostModel::Create(t, ranks, o);
    if (!model.ok()) return Fail(model.status().ToString(), 1);
    auto run = Simulate(base, ranks, true);
    if (!run.ok()) return Fail(run.status().ToString(), 1);
    double pred = 0, meas = 0;
    int n = 0;
    for (int s = 1; s < run->steps(); ++s, ++n) {  // step 0 is warm-up
      for (size_t c = 0; c < run->calls(s); ++c) pred += *model->FlatAllToAllSeconds(run->Matrix(s, c));
      double m = 0;
      for (int r = 0; r < ranks; ++r) m += run->history[static_cast<size_t>(r)][static_cast<size_t>(s)].alltoall_seconds() / ranks;
      meas += m;
    }
    pred /= std::max(1, n);
    meas /= std::max(1, n);
    const double err = meas > 0 ? 100.0 * (pred - meas) / meas : 0.0;
    std::printf("%6d %12.3f %12.3f %16.4f %16.4f %+9.1f\n", ranks, fit->alpha_seconds * 1e6,
                fit->beta_bytes_per_second / 1e9, pred * 1e3, meas * 1e3, err);
    js << (i++ ? "," : "") << "{\"ranks\": " << ranks << ", \"alpha_us\": " << fit->alpha_seconds * 1e6
       << ", \"beta_gbps\": " << fit->beta_bytes_per_second / 1e9 << ", \"predicted_seconds_per_step\": " << pred
       << ", \"measured_seconds_per_step\": " << meas << ", \"error_percent\": " << err << "}";
  }
  js << "]}\n";
  if (!WriteText(f.out + "/validate.json", js.str())) return Fail("cannot write " + f.out + "/validate.json", 1);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Simulates an N-rank expert-parallel MoE training job on threads and predicts it on a cluster."};
  Flags f;
  app.add_option("--config", f.config, "training config (.textproto)")->required();
  app.add_option("--ranks", f.ranks, "simulated ranks (loopback threads)")->check(CLI::Range(1, 1024));
  app.add_option("--steps", f.steps, "override train.steps")->check(CLI::PositiveNumber);
  app.add_option("--topology", f.topology, "target cluster: a moe.config.TopologyConfig text file");
  app.add_option("--gpus-per-node", f.gpus_per_node, "ranks per node on the target (default min(gpus_per_node, N))")
      ->check(CLI::Range(1, 1 << 20));
  app.add_option("--efficiency", f.efficiency, "expert GEMM efficiency (fraction of gpu_tflops)");
  app.add_option("--data", f.data, "override train.data_path");
  app.add_option("--out", f.out, "output directory")->required();
  app.add_flag("--validate", f.validate, "fit alpha/beta of this machine's loopback and check the prediction for 1, 2, 4 ranks");
  app.add_flag("--verbose", f.verbose, "progress lines of the trainer");
  CLI11_PARSE(app, argc, argv);
  moe::blas::SetThreads(1);

  auto cfg = moe::LoadConfig(f.config);
  if (!cfg.ok()) return Fail(cfg.status().ToString(), 2);
  if (f.steps > 0) cfg->mutable_train()->set_steps(f.steps);
  if (!f.data.empty()) cfg->mutable_train()->set_data_path(f.data);
  cfg->mutable_train()->set_eval_every(0);  // see the header comment
  cfg->mutable_train()->clear_metrics_path();
  cfg->mutable_train()->set_checkpoint_every(0);
  if (Status s = moe::ValidateConfig(*cfg); !s.ok()) return Fail(s.WithContext("config " + f.config).ToString(), 2);
  if (!(f.efficiency > 0 && f.efficiency <= 1)) return Fail("--efficiency=" + std::to_string(f.efficiency) + " must be in (0, 1]", 2);
  std::error_code ec;
  std::filesystem::create_directories(f.out, ec);
  if (ec) return Fail("--out " + f.out + ": " + ec.message(), 2);
  if (f.validate) return Validate(f, *cfg);

  moe::config::TopologyConfig target;
  std::optional<moe::CostModel> model;
  if (!f.topology.empty()) {
    auto t = LoadTopology(f.topology);
    if (!t.ok()) return Fail(t.status().ToString(), 2);
    target = *t;
    const int p = f.gpus_per_node > 0 ? f.gpus_per_node : std::min(target.gpus_per_node(), f.ranks);
    if (f.ranks % p != 0) {
      return Fail("--ranks=" + std::to_string(f.ranks) + " must be a multiple of the ranks per node (" +
                  std::to_string(p) + ", topology.gpus_per_node or --gpus-per-node)", 2);
    }
    if (f.ranks > target.nodes() * target.gpus_per_node()) {
      return Fail("--ranks=" + std::to_string(f.ranks) + " exceeds topology " + target.name() + " (nodes * gpus_per_node = " +
                  std::to_string(target.nodes() * target.gpus_per_node()) + ")", 2);
    }
    target.set_gpus_per_node(p);
    target.set_nodes(f.ranks / p);
    moe::CostModelOptions o;
    o.gemm_efficiency = f.efficiency;
    auto m = moe::CostModel::Create(target, f.ranks, o);
    if (!m.ok()) return Fail(m.status().ToString(), 2);
    model.emplace(*m);
  }

  auto run = Simulate(*cfg, f.ranks, !f.verbose);
  if (!run.ok()) return Fail(run.status().ToString(), run.status().code() == moe::StatusCode::kInvalidArgument ? 2 : 1);
  const auto times = MeanRankTimes(*run);
  if (!WriteText(f.out + "/measured.json", MeasuredJson(*run, *cfg)) ||
      !WriteText(f.out + "/expert_load.svg", ExpertLoadSvg(*run)) ||
      !WriteText(f.out + "/rank_time.svg", RankTimeSvg(times))) {
    return Fail("cannot write to --out " + f.out, 1);
  }
  const auto& last = run->history[0].back();
  std::printf("moe_simulate: %d ranks, %d steps, final loss %.6f, drop %.1f%%, imbalance %.2f\n", f.ranks,
              run->steps(), last.loss(), 100 * last.drop_fraction(), last.imbalance());
  std::printf("measured (mean per step, this machine):\n%6s %12s %12s %12s\n", "rank", "experts_ms", "a2a_ms", "other_ms");
  for (size_t r = 0; r < times.size(); ++r) {
    std::printf("%6zu %12.3f %12.3f %12.3f\n", r, times[r].experts * 1e3, times[r].a2a * 1e3, times[r].other * 1e3);
  }
  std::printf("wrote %s/measured.json, expert_load.svg, rank_time.svg\n", f.out.c_str());
  if (!model) return 0;

  moe::StepPrediction flat, hier;
  for (int s = 0; s < run->steps(); ++s) {
    const moe::StepTraffic in = StepInputs(*run, *cfg, s);
    auto a = model->PredictStep(in, false);
    auto b = model->PredictStep(in, true);
    if (!a.ok() || !b.ok()) return Fail((a.ok() ? b.status() : a.status()).ToString(), 1);
    const double k = 1.0 / run->steps();
    flat.dispatch_seconds += k * a->dispatch_seconds; flat.combine_seconds += k * a->combine_seconds;
    flat.experts_seconds += k * a->experts_seconds; flat.other_seconds += k * a->other_seconds;
    hier.dispatch_seconds += k * b->dispatch_seconds; hier.combine_seconds += k * b->combine_seconds;
    hier.experts_seconds += k * b->experts_seconds; hier.other_seconds += k * b->other_seconds;
  }
  std::printf("predicted on %s as %d node(s) x %d GPU(s) (mean per step, microseconds; dispatch and combine "
              "are the sums over forward + backward and all layers):\n",
              target.name().c_str(), target.nodes(), target.gpus_per_node());
  std::printf("%-14s %12s %12s %12s %12s %12s\n", "all-to-all", "dispatch", "combine", "experts", "other", "step");
  for (const auto& [name, p] : {std::pair<const char*, moe::StepPrediction>{"flat", flat}, {"hierarchical", hier}}) {
    std::printf("%-14s %12.3f %12.3f %12.3f %12.3f %12.3f\n", name, p.dispatch_seconds * 1e6, p.combine_seconds * 1e6,
                p.experts_seconds * 1e6, p.other_seconds * 1e6, p.total() * 1e6);
  }
  std::ostringstream js;
  js.precision(9);
  auto pj = [&](const moe::StepPrediction& p) {
    std::ostringstream o;
    o.precision(9);
    o << "{\"dispatch_seconds\": " << p.dispatch_seconds << ", \"combine_seconds\": " << p.combine_seconds
      << ", \"experts_seconds\": " << p.experts_seconds << ", \"other_seconds\": " << p.other_seconds
      << ", \"step_seconds\": " << p.total() << "}";
    return o.str();
  };
  js << "{\n  \"topology\": \"" << target.name() << "\",\n  \"ranks\": " << f.ranks << ",\n  \"nodes\": "
     << target.nodes() << ",\n  \"gpus_per_node\": " << target.gpus_per_node() << ",\n  \"gemm_efficiency\": "
     << f.efficiency << ",\n  \"flat\": " << pj(flat) << ",\n  \"hierarchical\": " << pj(hier)
     << ",\n  \"notes\": \"mean over steps; dispatch/combine summed over forward+backward and layers; other = "
        "router/norm/head FLOPs + ring all-reduce of the replicated gradients (fp32)\"\n}\n";
  if (!WriteText(f.out + "/predicted.json", js.str())) return Fail("cannot write " + f.out + "/predicted.json", 1);
  std::printf("wrote %s/predicted.json\n", f.out.c_str());
  return 0;
}
