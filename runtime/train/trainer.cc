// The training job (runtime/train/trainer.h).
#include "runtime/train/trainer.h"

#include <google/protobuf/util/json_util.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <filesystem>
#include <functional>
#include <map>
#include <set>

#include "base/file.h"
#include "base/npy.h"
#include "base/clock.h"
#include "runtime/train/checkpoint.h"
#include "runtime/config/config.h"
#include "runtime/device/compute.h"
#include "runtime/layer/make_moe_layer.h"
#include "runtime/config/memory_model.h"
#include "runtime/exchange/expert_moves.h"
#include "runtime/train/flops.h"
#include "base/tensor.h"

namespace moe {
namespace {


std::string FormatDuration(double seconds) {
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%lld:%02lld:%02lld", static_cast<long long>(s / 3600),
                static_cast<long long>((s / 60) % 60), static_cast<long long>(s % 60));
  return buf;
}

// "12.3 GFLOP/s", "1.05 TFLOP/s" from TFLOP/s.
std::string FlopRate(double tflops) {
  char buf[32];
  if (tflops >= 1.0) {
    std::snprintf(buf, sizeof(buf), "%.2f TFLOP/s", tflops);
  } else {
    std::snprintf(buf, sizeof(buf), "%.1f GFLOP/s", tflops * 1e3);
  }
  return buf;
}

std::string HumanCount(double v) {
  char buf[32];
  if (v >= 1e9) std::snprintf(buf, sizeof(buf), "%.2fB", v / 1e9);
  else if (v >= 1e6) std::snprintf(buf, sizeof(buf), "%.2fM", v / 1e6);
  else if (v >= 1e3) std::snprintf(buf, sizeof(buf), "%.1fk", v / 1e3);
  else std::snprintf(buf, sizeof(buf), "%.0f", v);
  return buf;
}

// Concatenates the gradients of `params` selected by `pick` into one buffer and back. The buffer
// is float64: a sum of a few float32 values is exact in float64, so the reduced gradient does not
// depend on the order in which a backend adds the ranks' parts (MPI trees, loopback in rank order)
// and runs on different backends stay bit-identical.
template <typename Pick>
std::vector<double> Flatten(const std::vector<ParamRef>& params, Pick pick) {
  std::vector<double> out;
  for (const ParamRef& p : params) {
    if (pick(p)) out.insert(out.end(), p.grad->data(), p.grad->data() + p.grad->size());
  }
  return out;
}
template <typename Pick>
void Unflatten(const std::vector<double>& flat, const std::vector<ParamRef>& params, Pick pick) {
  size_t off = 0;
  for (const ParamRef& p : params) {
    if (!pick(p)) continue;
    for (int64_t i = 0; i < p.grad->size(); ++i) (*p.grad)[i] = static_cast<float>(flat[off + static_cast<size_t>(i)]);
    off += static_cast<size_t>(p.grad->size());
  }
}

}  // namespace

Trainer::Trainer(const config::MoeConfig& cfg, comm::Communicator* world, const TrainOptions& options)
    : cfg_(cfg), world_(world), options_(options) {}

StatusOr<std::unique_ptr<Trainer>> Trainer::Create(const config::MoeConfig& cfg, comm::Communicator* world,
                                                   const TrainOptions& options) {
  std::unique_ptr<Trainer> t(new Trainer(cfg, world, options));
  MOE_RETURN_IF_ERROR(t->Init());
  return t;
}

Status Trainer::Init() {
  const int world = world_->size(), rank = world_->rank();
  MOE_RETURN_IF_ERROR(ValidateForWorld(cfg_, world));
  memory_ = TrainRankMemory(cfg_, world, options_.account_padding);
  // The peak for the utilization figure: the config's, or on CPU a one-thread GEMM probe on rank 0
  // while the others wait (so it is not shared with them), sent to every rank.
  peak_tflops_ = cfg_.compute().peak_tflops();
  peak_source_ = "compute.peak_tflops";
  if (peak_tflops_ <= 0 && cfg_.compute().device() == config::CPU) {
    double probe = rank == 0 ? ProbeGemmGflops() / 1e3 : 0.0;
    MOE_RETURN_IF_ERROR(world_->AllReduce(&probe, &probe, 1, comm::DataType::kFloat64,
                                          comm::ReduceOp::kMax));
    peak_tflops_ = probe;
    peak_source_ = "one-thread 512^3 SGEMM probe";
  }
  if (std::string(world_->backend()) != "loopback") {
    // One rank per process (MPI): what the process holds before the model (code, libraries, the
    // communicator, BLAS after the probe's GEMM) — measured, not modeled; 20-25 MiB with Open MPI
    // here.
    memory_.Add("process baseline (resident at start)", ResidentBytes(), "-");
  }
  {
    const int64_t all = options_.max_memory > 0 ? options_.max_memory : AvailableMemoryBytes();
    const int sharing = std::max(1, options_.ranks_sharing_memory);
    MOE_RETURN_IF_ERROR(CheckMemory(
        memory_, all / sharing, "one rank of this job",
        (options_.max_memory > 0 ? std::string("--max-memory") : std::string("the available memory")) +
            (sharing > 1 ? " / " + std::to_string(sharing) + " ranks on this machine" : ""),
        "--max-memory"));
  }
  if (cfg_.train().data_path().empty()) {
    return InvalidArgument("train.data_path must be set (a text file to train on)");
  }
  ep_size_ = cfg_.parallel().ep_size() > 0 ? cfg_.parallel().ep_size() : world;
  replicas_count_ = world / ep_size_;
  ep_rank_ = rank % ep_size_;
  const int replica = rank / ep_size_;
  MOE_ASSIGN_OR_RETURN(ep_, world_->Split(replica, ep_rank_));
  MOE_ASSIGN_OR_RETURN(replicas_, world_->Split(ep_rank_, replica));
  groups_ = cfg_.moe().router().num_local_groups();
  tokens_per_rank_ = cfg_.train().global_batch_tokens() / world;
  const int experts = cfg_.moe().num_experts();
  int local = experts / ep_size_;
  // The MoE layers: on the CPU, expert-parallel over the EP group; with compute.device=CUDA on
  // this rank's GPU, over a device-memory communicator of the same ranks.
  MoeLayerOptions layer_options;
  layer_options.ep = ep_.get();
  layer_options.balance = world_;
  MOE_ASSIGN_OR_RETURN(const int ep_ranks_per_node,
                       EpRanksPerNode(cfg_.comm().ranks_per_node(), world, ep_size_));
  layer_options.exchange = ExchangeOptionsOf(cfg_, ep_ranks_per_node);
  layer_options.exchange.account_padding = options_.account_padding;
  layer_options.local_rank = world_->local_rank();
  ep_ranks_per_node_ = ep_ranks_per_node;
  if (const int redundant = cfg_.parallel().num_redundant_experts(); redundant > 0) {
    // Replicas round-robin until the first rebalance measures the loads.
    MOE_ASSIGN_OR_RETURN(layer_options.placement,
                         IdentityPlacement(experts, redundant, ep_size_));
    local = layer_options.placement.per_rank;
    placements_.assign(static_cast<size_t>(cfg_.model().num_layers()), layer_options.placement);
    rebalance_load_.assign(placements_.size(),
                           std::vector<double>(static_cast<size_t>(ep_size_ * experts), 0.0));
  }
  if (cfg_.compute().device() == config::CUDA) {
    MOE_ASSIGN_OR_RETURN(layer_options.ep, DeviceEpCommunicator(replica));
  }
  MOE_ASSIGN_OR_RETURN(model_, ByteLm::Create(
                                   cfg_,
                                   [&](int) {
                                     return MakeMoeLayer(cfg_.moe(), cfg_.compute(), layer_options);
                                   },
                                   ep_rank_ * local, local));
  for (size_t l = 0; l < placements_.size(); ++l) {
    std::vector<int> ids;
    for (int s = 0; s < local; ++s) ids.push_back(placements_[l].logical_at(ep_rank_, s));
    model_->SetExpertIds(l, ids);
  }
  model_->Init();
  optimizer_ = std::make_unique<AdamW>(cfg_.train());
  MOE_ASSIGN_OR_RETURN(TextData data, TextData::Load(cfg_.train().data_path(), cfg_.train().eval_fraction(),
                                                     cfg_.model().context(), world * groups_));
  data_ = std::make_unique<TextData>(std::move(data));
  if (options_.resume) {
    if (cfg_.train().checkpoint_dir().empty()) {
      return InvalidArgument("--resume needs train.checkpoint_dir to be set");
    }
    StatusOr<std::string> latest = FindLatestCheckpoint(cfg_.train().checkpoint_dir());
    if (!latest.ok()) return latest.status().WithContext("--resume");
    MOE_RETURN_IF_ERROR(LoadCheckpoint(*latest));
  } else if (!cfg_.train().checkpoint_dir().empty()) {
    // A fresh run never writes over an earlier run's checkpoints.
    const std::string& root = cfg_.train().checkpoint_dir();
    for (const std::string& name : CheckpointDirNames(root)) {
      std::error_code ec;
      if (std::filesystem::exists(root + "/" + name + "/manifest.textproto", ec)) {
        return FailedPrecondition("train.checkpoint_dir=" + cfg_.train().checkpoint_dir() +
                                  " already holds checkpoints (" + name +
                                  "); pass --resume to continue from the newest, or choose another directory");
      }
    }
  }
  MOE_RETURN_IF_ERROR(world_->Barrier());
  if (rank == 0 && !options_.quiet) PrintStart();
  return Status::Ok();
}

StatusOr<comm::Communicator*> Trainer::DeviceEpCommunicator(int replica) {
  if (ep_size_ == 1) return nullptr;  // every expert on this rank: no exchange
  if (ep_->memory_space() == MemorySpace::kDevice) {
    // A device-memory world (the nccl backend) put this rank on the GPU of its local rank.
    if (cfg_.compute().gpu() >= 0 && cfg_.compute().gpu() != world_->local_rank()) {
      return InvalidArgument("compute.gpu=" + std::to_string(cfg_.compute().gpu()) + ": the " +
                             std::string(ep_->backend()) + " world put rank " +
                             std::to_string(world_->rank()) + " on GPU " +
                             std::to_string(world_->local_rank()) +
                             "; leave compute.gpu at -1 (each rank on its own GPU)");
    }
    return ep_.get();
  }
  if (!options_.device_communicators) {
    return FailedPrecondition(
        "compute.device=CUDA with expert parallelism over " + std::string(ep_->backend()) +
        " (host memory) needs device-memory communicators (TrainOptions::device_communicators)");
  }
  MOE_ASSIGN_OR_RETURN(const int gpu, ComputeGpu(cfg_.compute(), world_->local_rank()));
  MOE_ASSIGN_OR_RETURN(device_ep_, options_.device_communicators(*ep_, replica, ep_rank_, gpu));
  return device_ep_.get();
}

std::vector<ExchangeStats*> Trainer::LayerExchangeStats() const {
  std::vector<ExchangeStats*> out;
  for (MoeLayer* layer : model_->MoeLayers()) {
    if (ExchangeStats* stats = layer->exchange_stats(); stats != nullptr) out.push_back(stats);
  }
  return out;
}

void Trainer::PrintStart() {
  const double total = static_cast<double>(model_->TotalParameters());
  const double active = static_cast<double>(model_->ActiveParametersPerToken());
  const int redundant = cfg_.parallel().num_redundant_experts();
  std::printf("moe_train%s: %d ranks (%d-way expert parallel x %d replicas, %s backend), %d experts%s, %d per rank\n",
              options_.run_label.empty() ? "" : (" " + options_.run_label).c_str(), world_->size(), ep_size_,
              replicas_count_, std::string(world_->backend()).c_str(), cfg_.moe().num_experts(),
              redundant > 0 ? (" + " + std::to_string(redundant) + " redundant" +
                               (cfg_.parallel().rebalance_every() > 0
                                    ? " (placement every " + std::to_string(cfg_.parallel().rebalance_every()) + " steps)"
                                    : std::string(" (round-robin placement)")))
                                  .c_str()
                            : "",
              (cfg_.moe().num_experts() + redundant) / ep_size_);
  std::printf("  model: %d layers, M=%d, H=%d, context %d bytes; parameters: %s total, %s active per token (%.1f%%)\n",
              cfg_.model().num_layers(), cfg_.moe().model_dim(), cfg_.moe().expert().hidden_dim(),
              cfg_.model().context(), HumanCount(total).c_str(), HumanCount(active).c_str(), 100.0 * active / total);
  std::printf("  data: %s, %lld training bytes in %d shards, %lld held out; %lld tokens per step (%lld per rank in %d local group(s))\n",
              cfg_.train().data_path().c_str(), static_cast<long long>(data_->train_bytes()), world_->size() * groups_,
              static_cast<long long>(data_->eval_bytes()), static_cast<long long>(cfg_.train().global_batch_tokens()),
              static_cast<long long>(tokens_per_rank_), groups_);
  // Where the ranks run, as the launch placed them, and how the first layer's rows move.
  const int local = world_->local_size();
  const std::vector<MoeLayer*> layers = model_->MoeLayers();
  const std::string exchange = layers.empty() ? "" : layers.front()->exchange_description();
  std::printf("  launch: %s; exchange: %s\n",
              world_->size() % local == 0
                  ? (std::to_string(world_->size() / local) + " node(s) x " +
                     std::to_string(local) + " ranks")
                        .c_str()
                  : (std::to_string(local) + " ranks on this node").c_str(),
              exchange.empty() ? "none (one rank per expert-parallel group)" : exchange.c_str());
  std::printf("  memory estimate per rank: %s\n", memory_.Summary(3).c_str());
  std::printf("  model FLOPs per token: %.3g (forward + backward, at the nominal kept rows); peak "
              "per rank: %s\n",
              NominalFlopsPerToken(cfg_, tokens_per_rank_ / std::max(1, groups_)),
              peak_tflops_ <= 0 ? "unknown (set compute.peak_tflops)"
                                : (FlopRate(peak_tflops_) + " (" + peak_source_ + ")").c_str());
  if (step_ > 0) std::printf("  resumed at step %lld\n", static_cast<long long>(step_));
  std::fflush(stdout);
}

std::vector<bool> Trainer::Trainable(const std::vector<ParamRef>& params) const {
  std::vector<bool> out;
  for (const ParamRef& p : params) {
    switch (cfg_.train().finetune()) {
      case config::FULL: out.push_back(true); break;
      case config::FREEZE_NON_EXPERT: out.push_back(p.expert_id >= 0); break;
      case config::FREEZE_MOE: out.push_back(p.name.find("_moe_") == std::string::npos); break;
    }
  }
  return out;
}

Status Trainer::ReduceGradients() {
  const std::vector<ParamRef> params = model_->Params();
  auto replicated = [](const ParamRef& p) { return p.expert_id < 0; };
  std::vector<double> flat = Flatten(params, replicated);
  MOE_RETURN_IF_ERROR(StepAllReduce(world_, flat.data(), static_cast<int64_t>(flat.size()),
                                    comm::DataType::kFloat64, comm::ReduceOp::kSum));
  Unflatten(flat, params, replicated);
  if (replicas_count_ > 1) {
    auto expert = [](const ParamRef& p) { return p.expert_id >= 0; };
    std::vector<double> ef = Flatten(params, expert);
    MOE_RETURN_IF_ERROR(StepAllReduce(replicas_.get(), ef.data(), static_cast<int64_t>(ef.size()),
                                      comm::DataType::kFloat64, comm::ReduceOp::kSum));
    Unflatten(ef, params, expert);
  }
  return ReduceReplicaGradients();
}

Status Trainer::ReduceReplicaGradients() {
  for (size_t l = 0; l < placements_.size(); ++l) {
    MOE_RETURN_IF_ERROR(
        SumReplicaGradients(*ep_, placements_[l], model_->LayerGrads(l).experts));
  }
  return Status::Ok();
}

Status Trainer::Rebalance(size_t l) {
  std::vector<double>& load = rebalance_load_[l];
  MOE_ASSIGN_OR_RETURN(
      const ExpertPlacement next,
      BalancedPlacement(load, cfg_.moe().num_experts(), cfg_.parallel().num_redundant_experts(),
                        ep_size_, ep_ranks_per_node_));
  std::fill(load.begin(), load.end(), 0.0);
  return MoveExperts(l, next);
}

Status Trainer::MoveExperts(size_t l, const ExpertPlacement& next) {
  const ExpertPlacement& now = placements_[l];
  if (next.physical_to_logical == now.physical_to_logical) return Status::Ok();
  const int me = ep_rank_, per_rank = now.per_rank;
  MoeLayerParams& params = model_->LayerParams(l);
  const std::string prefix = "block_" + std::to_string(l) + "_moe_";
  // An expert's payload: each tensor's values, then its AdamW m and v (zeros before its first
  // update), tensor by tensor.
  std::vector<Tensor*> shapes;
  for (Tensor* t : {&params.experts[0].w1, &params.experts[0].b1, &params.experts[0].w2,
                    &params.experts[0].b2, &params.experts[0].w3}) {
    if (t->size() > 0) shapes.push_back(t);
  }
  int64_t per = 0;
  for (Tensor* t : shapes) per += 3 * t->size();
  std::vector<std::string> tensor_names;
  params.ForEach([&](const std::string& name, Tensor&) {
    if (name.rfind("expert_" + std::to_string(params.expert_id(0)) + "_", 0) == 0) {
      tensor_names.push_back(name.substr(name.find('_', 7)));  // "_w1", "_b1", ...
    }
  });
  const auto tensors = [](experts::FfnParams& x) {
    std::vector<Tensor*> out;
    for (Tensor* t : {&x.w1, &x.b1, &x.w2, &x.b2, &x.w3}) {
      if (t->size() > 0) out.push_back(t);
    }
    return out;
  };
  std::map<std::string, AdamW::Moments>& state = optimizer_->state();
  const auto pack = [&](int slot, float* out) {
    experts::FfnParams& x = params.experts[static_cast<size_t>(slot)];
    const std::string base = prefix + "expert_" + std::to_string(params.expert_id(static_cast<size_t>(slot)));
    size_t name = 0;
    for (Tensor* t : tensors(x)) {
      const int64_t n = t->size();
      std::copy(t->data(), t->data() + n, out);
      auto it = state.find(base + tensor_names[name++]);
      if (it != state.end()) {
        std::copy(it->second.m.data(), it->second.m.data() + n, out + n);
        std::copy(it->second.v.data(), it->second.v.data() + n, out + 2 * n);
      } else {
        std::fill(out + n, out + 3 * n, 0.0f);
      }
      out += 3 * n;
    }
  };
  MOE_ASSIGN_OR_RETURN(const MovedExperts moved, moe::MoveExperts(*ep_, now, next, per, pack));
  // The new slots: the experts that stay on this rank move over from their old slot (their AdamW
  // state keeps its name), the others are unpacked from their payloads; the moments of the
  // experts that left are dropped.
  std::vector<int> ids(static_cast<size_t>(per_rank));
  for (int s = 0; s < per_rank; ++s) ids[static_cast<size_t>(s)] = next.logical_at(me, s);
  for (int s = 0; s < per_rank; ++s) {
    const int old = params.expert_id(static_cast<size_t>(s));
    if (std::find(ids.begin(), ids.end(), old) != ids.end()) continue;
    for (const std::string& t : tensor_names) state.erase(prefix + "expert_" + std::to_string(old) + t);
  }
  std::vector<experts::FfnParams> fresh(static_cast<size_t>(per_rank));
  for (int s = 0; s < per_rank; ++s) {
    experts::FfnParams& x = fresh[static_cast<size_t>(s)];
    if (const int from = moved.kept_from[static_cast<size_t>(s)]; from >= 0) {
      x = std::move(params.experts[static_cast<size_t>(from)]);
      continue;
    }
    x = experts::FfnParams::Zeros(ExpertShape(cfg_.moe()));
    const float* in = moved.payload[static_cast<size_t>(s)];
    const std::string base = prefix + "expert_" + std::to_string(ids[static_cast<size_t>(s)]);
    size_t name = 0;
    for (Tensor* t : tensors(x)) {
      const int64_t n = t->size();
      std::copy(in, in + n, t->data());
      AdamW::Moments& st = state[base + tensor_names[name++]];
      st.m = Tensor(t->rows(), t->cols());
      st.v = Tensor(t->rows(), t->cols());
      std::copy(in + n, in + 2 * n, st.m.data());
      std::copy(in + 2 * n, in + 3 * n, st.v.data());
      in += 3 * n;
    }
  }
  params.experts = std::move(fresh);
  model_->SetExpertIds(l, ids);
  placements_[l] = next;
  RedundantExpertExecutor* executor = RedundantExecutorOf(model_->MoeLayers()[l]);
  if (executor == nullptr) return Internal("MoveExperts: layer " + std::to_string(l) + " has no replicas");
  executor->set_placement(next);
  return Status::Ok();
}

bool Trainer::IsPrimary(const ParamRef& p) const {
  if (p.expert_id < 0 || placements_.empty() || p.layer < 0) return true;
  const ExpertPlacement& pl = placements_[static_cast<size_t>(p.layer)];
  return pl.rank_of(pl.replicas[static_cast<size_t>(p.expert_id)][0]) == ep_rank_;
}

Status Trainer::StepAllReduce(comm::Communicator* comm, void* data, int64_t count, comm::DataType dtype,
                              comm::ReduceOp op) {
  step_allreduce_bytes_.push_back(count * comm::DataTypeSize(dtype));
  return comm->AllReduce(data, data, count, dtype, op);
}

StatusOr<double> Trainer::GlobalGradNorm() {
  double sq[2] = {0.0, 0.0};  // replicated (same on all ranks), this rank's experts
  for (const ParamRef& p : model_->Params()) {
    double s = 0.0;
    for (int64_t i = 0; i < p.grad->size(); ++i) s += static_cast<double>((*p.grad)[i]) * (*p.grad)[i];
    if (!IsPrimary(p)) continue;  // a replica's gradient counts once
    sq[p.expert_id >= 0 ? 1 : 0] += s;
  }
  MOE_RETURN_IF_ERROR(StepAllReduce(ep_.get(), &sq[1], 1, comm::DataType::kFloat64, comm::ReduceOp::kSum));
  return std::sqrt(sq[0] + sq[1]);
}

Status Trainer::Evaluate(double* loss) {
  const int world = world_->size();
  const int64_t n = std::max<int64_t>(groups_, cfg_.train().eval_tokens() / world);
  const LmBatch batch = data_->EvalBatch(cfg_.seed(), world_->rank() * n, n);
  RouteContext ctx;
  ctx.train = false;
  ctx.seed = cfg_.seed();
  ctx.step = static_cast<uint64_t>(step_);
  ctx.token_offset = world_->rank() * n;
  LmStepStats stats;
  MOE_RETURN_IF_ERROR(model_->Forward(batch, ctx, n * world, 1.0 / world, &stats));
  double ce = stats.ce_sum;
  MOE_RETURN_IF_ERROR(world_->AllReduce(&ce, &ce, 1, comm::DataType::kFloat64, comm::ReduceOp::kSum));
  *loss = ce / static_cast<double>(n * world);
  return Status::Ok();
}

namespace {

// <dir>/rank_<r>/step_<N>.npy: one training step's router selections of one rank.
std::string RouterRecordPath(const std::string& dir, int rank, int64_t step) {
  char name[64];
  std::snprintf(name, sizeof(name), "/rank_%d/step_%06lld.npy", rank, static_cast<long long>(step));
  return dir + name;
}

}  // namespace

Status Trainer::ReadRouterReplay(std::vector<int32_t>* out) const {
  const std::string path =
      RouterRecordPath(cfg_.train().router_replay_dir(), world_->rank(), step_);
  StatusOr<NpyArray> arr = ReadNpy(path);
  if (!arr.ok()) return arr.status().WithContext("train.router_replay_dir");
  const int64_t layers = cfg_.model().num_layers(), k = TopK(cfg_.moe().router());
  const std::vector<int64_t> want = {layers, tokens_per_rank_, k};
  if (arr->dtype != NpyDtype::kInt32 || arr->shape != want) {
    return InvalidArgument("train.router_replay_dir: " + path + " must be int32 of shape [" +
                           std::to_string(layers) + ", " + std::to_string(tokens_per_rank_) + ", " +
                           std::to_string(k) +
                           "] (model.num_layers, tokens per rank, top_k): was it recorded with "
                           "this config and world size?");
  }
  out->resize(static_cast<size_t>(layers * tokens_per_rank_ * k));
  std::memcpy(out->data(), arr->bytes.data(), out->size() * sizeof(int32_t));
  return Status::Ok();
}

Status Trainer::RecordRouterSelections() {
  const std::string path = RouterRecordPath(cfg_.train().router_record_dir(), world_->rank(), step_);
  if (std::filesystem::exists(path)) {
    return InvalidArgument("train.router_record_dir: " + path +
                           " exists; record into an empty directory (nothing is overwritten)");
  }
  std::vector<int32_t> all;
  const std::vector<MoeLayer*> layers = model_->MoeLayers();
  for (MoeLayer* layer : layers) {
    MOE_RETURN_IF_ERROR(layer->FetchPlan());
    const std::vector<int32_t>& sel = layer->plan().selected;
    all.insert(all.end(), sel.begin(), sel.end());
  }
  const int64_t k = TopK(cfg_.moe().router());
  MOE_RETURN_IF_ERROR(MakeDirs(std::filesystem::path(path).parent_path().string()));
  return WriteNpy(path, NpyDtype::kInt32,
                  {static_cast<int64_t>(layers.size()), tokens_per_rank_, k}, all.data());
}

std::vector<double> Trainer::WorldStats::Flatten() const {
  std::vector<double> flat = {ce_sum, aux, z, dropped_slots, total_slots, inter_node_bytes,
                              forward_dispatch_inter_node_bytes};
  flat.insert(flat.end(), tokens_per_expert.begin(), tokens_per_expert.end());
  for (const std::vector<double>& l : layer_loads) flat.insert(flat.end(), l.begin(), l.end());
  return flat;
}

void Trainer::WorldStats::Unflatten(const std::vector<double>& flat) {
  size_t at = 0;
  for (double* v : {&ce_sum, &aux, &z, &dropped_slots, &total_slots, &inter_node_bytes,
                    &forward_dispatch_inter_node_bytes}) {
    *v = flat[at++];
  }
  for (double& v : tokens_per_expert) v = flat[at++];
  for (std::vector<double>& l : layer_loads) {
    for (double& v : l) v = flat[at++];
  }
}

Status Trainer::Step(report::StepMetrics* m) {
  const double t0 = WallSeconds();
  for (ExchangeStats* stats : LayerExchangeStats()) stats->Reset();
  step_allreduce_bytes_.clear();
  LmStepStats local;
  MOE_RETURN_IF_ERROR(ForwardBackward(&local));
  MOE_RETURN_IF_ERROR(ReduceGradients());
  MOE_ASSIGN_OR_RETURN(last_grad_norm_, GlobalGradNorm());
  MOE_ASSIGN_OR_RETURN(const WorldStats world, SumStepStats(local));
  MOE_RETURN_IF_ERROR(Update(world, last_grad_norm_, m));
  RecordLoads(world, m);
  RecordExchangeTimes(m);
  ++step_;
  MOE_RETURN_IF_ERROR(Rebalance(m));
  MOE_RETURN_IF_ERROR(MaybeEvaluate(m));
  RecordThroughput(WallSeconds() - t0, m);
  return Status::Ok();
}

Status Trainer::ForwardBackward(LmStepStats* stats) {
  const int world = world_->size(), rank = world_->rank();
  const int64_t offset = rank * tokens_per_rank_;
  const LmBatch batch = data_->TrainBatch(cfg_.seed(), static_cast<uint64_t>(step_), offset,
                                          tokens_per_rank_, rank * groups_, groups_);
  RouteContext ctx;
  ctx.train = true;
  ctx.seed = cfg_.seed();
  ctx.step = static_cast<uint64_t>(step_);
  ctx.token_offset = offset;
  std::vector<int32_t> replay;
  if (!cfg_.train().router_replay_dir().empty()) {
    MOE_RETURN_IF_ERROR(ReadRouterReplay(&replay));
    ctx.replay_selected = replay.data();
  }
  model_->ZeroGrad();
  MOE_RETURN_IF_ERROR(model_->Forward(batch, ctx, tokens_per_rank_ * world, 1.0 / world, stats));
  if (!cfg_.train().router_record_dir().empty()) MOE_RETURN_IF_ERROR(RecordRouterSelections());
  MOE_RETURN_IF_ERROR(model_->Backward());
  if (options_.after_backward) MOE_RETURN_IF_ERROR(options_.after_backward(*this));
  return Status::Ok();
}

StatusOr<Trainer::WorldStats> Trainer::SumStepStats(const LmStepStats& local) {
  WorldStats w;
  w.ce_sum = local.ce_sum;
  w.aux = local.aux;
  w.z = local.z;
  w.dropped_slots = static_cast<double>(local.dropped_slots);
  w.total_slots = static_cast<double>(local.total_slots);
  for (int64_t v : local.tokens_per_expert) w.tokens_per_expert.push_back(static_cast<double>(v));
  for (const ExchangeStats* layer : LayerExchangeStats()) {
    for (const ExchangeCall& call : layer->calls) {
      w.inter_node_bytes += static_cast<double>(call.inter_node_bytes);
      if (call.kind == ExchangeCall::Kind::kDispatch && !call.backward) {
        w.forward_dispatch_inter_node_bytes += static_cast<double>(call.inter_node_bytes);
      }
    }
  }
  // Redundant experts: per layer, the selected slots of every (EP rank, expert) — this rank's row
  // — for the placement's statistics and the next rebalance.
  if (!placements_.empty()) {
    const int e = cfg_.moe().num_experts();
    for (MoeLayer* layer : model_->MoeLayers()) {
      std::vector<double>& loads = w.layer_loads.emplace_back(static_cast<size_t>(ep_size_ * e), 0.0);
      const std::vector<int64_t>& load = layer->plan().load_per_expert;
      for (int i = 0; i < e; ++i) {
        loads[static_cast<size_t>(ep_rank_ * e + i)] = static_cast<double>(load[static_cast<size_t>(i)]);
      }
    }
  }
  std::vector<double> flat = w.Flatten();
  MOE_RETURN_IF_ERROR(StepAllReduce(world_, flat.data(), static_cast<int64_t>(flat.size()),
                                    comm::DataType::kFloat64, comm::ReduceOp::kSum));
  w.Unflatten(flat);
  return w;
}

Status Trainer::Update(const WorldStats& world, double norm, report::StepMetrics* m) {
  const int ranks = world_->size();
  const double loss = world.ce_sum / static_cast<double>(tokens_per_rank_ * ranks);
  const double aux = world.aux / ranks, z = world.z / ranks;
  const auto& router = cfg_.moe().router();
  const double objective = loss + router.aux_loss_weight() * aux + router.z_loss_weight() * z;
  m->set_step(step_);
  m->set_loss(loss);
  m->set_aux_loss(aux);
  m->set_z_loss(z);
  m->set_grad_norm(norm);
  const double lr = optimizer_->LearningRate(step_);
  m->set_lr(lr);
  if (!std::isfinite(objective) || !std::isfinite(norm)) {
    if (cfg_.train().nan_policy() == config::STOP) {
      return FailedPrecondition("step " + std::to_string(step_) + ": non-finite " +
                                (std::isfinite(objective) ? "gradient norm" : "loss") +
                                " (loss=" + std::to_string(loss) + ", grad_norm=" + std::to_string(norm) +
                                "); stopping (train.nan_policy=STOP); the last checkpoint is intact");
    }
    ++skipped_steps_;
    m->set_skipped(true);
    return Status::Ok();
  }
  const double clip = cfg_.train().grad_clip();
  const double scale = clip > 0 && norm > clip ? clip / norm : 1.0;
  const std::vector<ParamRef> params = model_->Params();
  optimizer_->Step(params, Trainable(params), lr, scale);
  // Aux-loss-free balancing from the load over all ranks, per layer.
  if (router.bias_update_rate() > 0) {
    for (MoeLayer* layer : model_->MoeLayers()) {
      std::vector<int64_t> load = layer->plan().load_per_expert;
      MOE_RETURN_IF_ERROR(StepAllReduce(world_, load.data(), static_cast<int64_t>(load.size()),
                                        comm::DataType::kInt64, comm::ReduceOp::kSum));
      layer->UpdateRouterBias(load);
    }
  }
  return Status::Ok();
}

void Trainer::RecordLoads(const WorldStats& world, report::StepMetrics* m) {
  const int e = cfg_.moe().num_experts();
  double max_load = 0.0, sum_load = 0.0;
  for (const double v : world.tokens_per_expert) {
    m->add_tokens_per_expert(static_cast<int64_t>(v));
    max_load = std::max(max_load, v);
    sum_load += v;
  }
  m->set_imbalance(sum_load > 0 ? max_load / (sum_load / e) : 0.0);
  if (!placements_.empty()) {
    double with = 0.0, without = 0.0;
    for (size_t l = 0; l < placements_.size(); ++l) {
      const std::vector<double>& block = world.layer_loads[l];
      std::vector<double> logical(static_cast<size_t>(e), 0.0);
      for (int r = 0; r < ep_size_; ++r) {
        for (int i = 0; i < e; ++i) logical[static_cast<size_t>(i)] += block[static_cast<size_t>(r * e + i)];
      }
      std::vector<double>& acc = rebalance_load_[l];
      for (size_t i = 0; i < acc.size(); ++i) acc[i] += block[i];
      with += MaxOverMean(RankLoads(placements_[l], logical)) / static_cast<double>(placements_.size());
      if (e % ep_size_ == 0) {
        StatusOr<ExpertPlacement> blocks = IdentityPlacement(e, 0, ep_size_);
        if (blocks.ok()) {
          without += MaxOverMean(RankLoads(*blocks, logical)) / static_cast<double>(placements_.size());
        }
      }
    }
    m->set_rank_load_imbalance(with);
    m->set_rank_load_imbalance_without_replicas(without);
  }
  m->set_drop_fraction(world.total_slots > 0 ? world.dropped_slots / world.total_slots : 0.0);
  m->set_inter_node_bytes(static_cast<int64_t>(world.inter_node_bytes));
  m->set_forward_dispatch_inter_node_bytes(
      static_cast<int64_t>(world.forward_dispatch_inter_node_bytes));
  kept_rows_ = static_cast<int64_t>(sum_load);
}

void Trainer::RecordExchangeTimes(report::StepMetrics* m) {
  double a2a = 0.0, expert = 0.0;
  for (const ExchangeStats* layer : LayerExchangeStats()) {
    a2a += layer->AllToAllSeconds();
    expert += layer->expert_seconds;
  }
  m->set_alltoall_seconds(a2a);
  m->set_expert_seconds(expert);
}

Status Trainer::Rebalance(report::StepMetrics* m) {
  const int n = cfg_.parallel().rebalance_every();
  if (n <= 0 || step_ % n != 0 || m->skipped()) return Status::Ok();
  for (size_t l = 0; l < placements_.size(); ++l) MOE_RETURN_IF_ERROR(Rebalance(l));
  m->set_rebalanced(true);
  return Status::Ok();
}

Status Trainer::MaybeEvaluate(report::StepMetrics* m) {
  const int every = cfg_.train().eval_every();
  if (every <= 0 || (step_ % every != 0 && step_ != cfg_.train().steps())) return Status::Ok();
  double eval_loss = 0.0;
  MOE_RETURN_IF_ERROR(Evaluate(&eval_loss));
  m->set_eval_loss(eval_loss);
  return Status::Ok();
}

void Trainer::RecordThroughput(double seconds, report::StepMetrics* m) {
  const int world = world_->size();
  m->set_step_seconds(seconds);
  m->set_tokens_per_second(static_cast<double>(tokens_per_rank_ * world) / seconds);
  // Model FLOP/s per rank over the step (its kept expert rows, every rank's tokens) and their
  // fraction of the peak.
  const StepFlops flops = ModelFlops(cfg_, tokens_per_rank_ * world, kept_rows_);
  const double tflops = flops.total() / world / seconds / 1e12;
  m->set_model_tflops_per_rank(tflops);
  if (peak_tflops_ > 0) m->set_utilization(tflops / peak_tflops_);
}

void Trainer::PrintProgress(const report::StepMetrics& m, double elapsed) {
  const int64_t total = cfg_.train().steps();
  const double eta = step_ > 0 ? elapsed / static_cast<double>(history_.size()) *
                                     static_cast<double>(total - step_)
                               : 0.0;
  std::printf("step %5lld/%lld | loss %.4f | aux %.3f | %s tok/s | %s/rank%s | drop %.1f%% | imbalance %.2f | a2a %.0f%% | ETA %s%s",
              static_cast<long long>(m.step() + 1), static_cast<long long>(total), m.loss(), m.aux_loss(),
              HumanCount(m.tokens_per_second()).c_str(), FlopRate(m.model_tflops_per_rank()).c_str(),
              m.utilization() > 0 ? (" " + std::to_string(static_cast<int>(std::lround(100.0 * m.utilization()))) + "%").c_str() : "",
              100.0 * m.drop_fraction(), m.imbalance(),
              m.step_seconds() > 0 ? 100.0 * m.alltoall_seconds() / m.step_seconds() : 0.0,
              FormatDuration(eta).c_str(), m.skipped() ? " | SKIPPED (non-finite)" : "");
  if (m.rank_load_imbalance() > 0) {
    std::printf(" | EP load %.2f->%.2f%s", m.rank_load_imbalance_without_replicas(),
                m.rank_load_imbalance(), m.rebalanced() ? " (rebalanced)" : "");
  }
  if (m.eval_loss() > 0) std::printf(" | eval %.4f", m.eval_loss());
  std::printf("\n");
  std::fflush(stdout);
}

Status Trainer::Run() {
  const double start = WallSeconds();
  const int rank = world_->rank();
  std::FILE* metrics = nullptr;
  if (rank == 0 && !cfg_.train().metrics_path().empty()) {
    metrics = std::fopen(cfg_.train().metrics_path().c_str(), step_ > 0 ? "a" : "w");
    if (metrics == nullptr) {
      return IoError("cannot open train.metrics_path=" + cfg_.train().metrics_path() + ": " + std::strerror(errno));
    }
  }
  Status status;
  while (step_ < cfg_.train().steps()) {
    report::StepMetrics m;
    status = Step(&m);
    if (!status.ok()) break;
    history_.push_back(m);
    if (rank == 0) {
      const int every = std::max(1, options_.log_every);
      if (!options_.quiet && (step_ % every == 0 || step_ == cfg_.train().steps() || step_ == 1)) {
        PrintProgress(m, WallSeconds() - start);
      }
      if (metrics != nullptr) {
        std::string json;
        google::protobuf::util::JsonPrintOptions opts;
        opts.preserve_proto_field_names = true;
        (void)google::protobuf::util::MessageToJsonString(m, &json, opts);
        std::fprintf(metrics, "%s\n", json.c_str());
        std::fflush(metrics);
      }
    }
    if (options_.on_step) {
      status = options_.on_step(*this, m);
      if (!status.ok()) break;
    }
    const int every = cfg_.train().checkpoint_every();
    // With a checkpoint_dir the last step is always saved; checkpoint_every > 0 adds periodic saves.
    if (!cfg_.train().checkpoint_dir().empty() &&
        ((every > 0 && step_ % every == 0) || step_ == cfg_.train().steps())) {
      status = SaveCheckpoint();
      if (!status.ok()) break;
    }
  }
  if (metrics != nullptr) std::fclose(metrics);
  return status;
}

Status Trainer::SaveCheckpoint() {
  namespace fs = std::filesystem;
  const std::string root = cfg_.train().checkpoint_dir();
  const std::string final_dir = root + "/" + CheckpointDirName(step_);
  const std::string tmp_dir = final_dir + ".tmp";
  const int rank = world_->rank();
  // Every step that can fail on one rank ends with an agreement, so no rank waits for a peer that
  // gave up (the save fails on all ranks with the failing rank's reason where it is known).
  Status prep = rank == 0 ? PrepareCheckpointDir(root, final_dir, tmp_dir) : Status::Ok();
  MOE_RETURN_IF_ERROR(AgreeOk(prep, "saving checkpoint " + final_dir + ": rank 0 could not prepare it"));
  std::map<std::string, const Tensor*> tensors;
  std::vector<Tensor> biases;
  const bool writes_experts = rank < ep_size_;  // replica 0 writes each expert once
  for (const ParamRef& p : model_->Params()) {
    // Experts are saved by logical id, once: by the rank of their first replica.
    const bool mine = p.expert_id >= 0 ? writes_experts && IsPrimary(p) : rank == 0;
    if (!mine) continue;
    tensors[p.name] = p.value;
    auto it = optimizer_->state().find(p.name);
    if (it != optimizer_->state().end()) {
      tensors[p.name + ".adam_m"] = &it->second.m;
      tensors[p.name + ".adam_v"] = &it->second.v;
    }
  }
  if (rank == 0) {
    const auto layers = model_->MoeLayers();
    biases.resize(layers.size());
    for (size_t l = 0; l < layers.size(); ++l) {
      biases[l] = Tensor(1, static_cast<int64_t>(layers[l]->router_bias().size()));
      std::copy(layers[l]->router_bias().begin(), layers[l]->router_bias().end(), biases[l].data());
      tensors["block_" + std::to_string(l) + "_moe_router_bias"] = &biases[l];
    }
  }
  Status write = WriteCheckpointTensors(tmp_dir, tensors);
  MOE_RETURN_IF_ERROR(AgreeOk(write.WithContext("saving checkpoint " + final_dir),
                              "saving checkpoint " + final_dir + ": another rank failed to write its tensors"));
  Status fin;
  if (rank == 0) {
    checkpoint::Manifest manifest;
    manifest.set_step(step_);
    manifest.set_optimizer_steps(optimizer_->steps());
    manifest.set_saved_world_size(world_->size());
    *manifest.mutable_config() = cfg_;
    fin = FinalizeCheckpoint(tmp_dir, final_dir, manifest);
  }
  return AgreeOk(fin, "saving checkpoint " + final_dir + ": rank 0 could not finalize it");
}

Status Trainer::AgreeOk(const Status& local, const std::string& remote_failure) {
  int32_t failed = local.ok() ? 0 : 1;
  MOE_RETURN_IF_ERROR(world_->AllReduce(&failed, &failed, 1, comm::DataType::kInt32, comm::ReduceOp::kMax));
  if (!local.ok()) return local;
  if (failed != 0) return IoError(remote_failure);
  return Status::Ok();
}

Status Trainer::LoadCheckpoint(const std::string& dir) {
  MOE_ASSIGN_OR_RETURN(checkpoint::Manifest manifest, VerifyCheckpoint(dir));
  const auto& saved = manifest.config();
  const auto& now = cfg_.moe();
  if (saved.moe().model_dim() != now.model_dim() || saved.moe().num_experts() != now.num_experts() ||
      saved.moe().expert().hidden_dim() != now.expert().hidden_dim() ||
      saved.model().num_layers() != cfg_.model().num_layers() || saved.model().context() != cfg_.model().context()) {
    return InvalidArgument("checkpoint " + dir + " was saved for a different model shape (moe.model_dim, "
                           "moe.num_experts, moe.expert.hidden_dim, model.num_layers, model.context must match)");
  }
  std::set<std::string> names;
  for (const auto& tf : manifest.tensors()) names.insert(tf.name());
  for (const ParamRef& p : model_->Params()) {
    MOE_RETURN_IF_ERROR(LoadCheckpointTensor(dir, manifest, p.name, p.value));
    if (names.count(p.name + ".adam_m") != 0) {
      AdamW::Moments& st = optimizer_->state()[p.name];
      st.m = Tensor(p.value->rows(), p.value->cols());
      st.v = Tensor(p.value->rows(), p.value->cols());
      MOE_RETURN_IF_ERROR(LoadCheckpointTensor(dir, manifest, p.name + ".adam_m", &st.m));
      MOE_RETURN_IF_ERROR(LoadCheckpointTensor(dir, manifest, p.name + ".adam_v", &st.v));
    }
  }
  const auto layers = model_->MoeLayers();
  for (size_t l = 0; l < layers.size(); ++l) {
    Tensor b(1, static_cast<int64_t>(layers[l]->router_bias().size()));
    MOE_RETURN_IF_ERROR(LoadCheckpointTensor(dir, manifest, "block_" + std::to_string(l) + "_moe_router_bias", &b));
    layers[l]->router_bias().assign(b.data(), b.data() + b.size());
  }
  step_ = manifest.step();
  optimizer_->set_steps(manifest.optimizer_steps());
  return Status::Ok();
}

}  // namespace moe
