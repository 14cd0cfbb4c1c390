// CheckedDevice and its communicator (runtime/device/checked_device.h).
#include "runtime/device/checked_device.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "base/check.h"
#include "runtime/device/cpu_expert_compute.h"
#include "runtime/device/expert_compute.h"
#include "runtime/device/staged_routing.h"

namespace moe {

struct CheckedDevice::Op {
  uint64_t id = 0;
  std::string name;
  int stream = kCompute;
  Clock clock{};  // what the operation knows of every stream, itself included
  std::vector<Access> accesses;
  std::function<Status()> run;
  bool done = false;
  Status status;
};

namespace {

constexpr int64_t kFloat = sizeof(float);
constexpr unsigned char kPoison = 0xFF;

const char* StreamName(int s) {
  return s == CheckedDevice::kCompute ? "compute" : "communication";
}

bool Overlap(const CheckedDevice::Access& a, const CheckedDevice::Access& b) {
  const char* ab = static_cast<const char*>(a.begin);
  const char* bb = static_cast<const char*>(b.begin);
  return a.bytes > 0 && b.bytes > 0 && ab < bb + b.bytes && bb < ab + a.bytes;
}

CheckedDevice::Access Read(const void* p, int64_t bytes) { return {p, bytes, false}; }
CheckedDevice::Access Write(const void* p, int64_t bytes) { return {p, bytes, true}; }

// What reading the exchange's returned rows of `plan_rows` plan rows touches.
void ReadReturned(const ReturnedRows& r, int64_t plan_rows, int64_t cols,
                  std::vector<CheckedDevice::Access>* accesses) {
  accesses->push_back(Read(r.rows, r.num_rows * cols * kFloat));
  accesses->push_back(Read(r.self_rows, r.num_self_rows * cols * kFloat));
  if (r.return_row != nullptr) accesses->push_back(Read(r.return_row, plan_rows * 4));
}

}  // namespace

// Host memory that says it is device memory: poisoned when handed out and when freed; a free is
// checked against the work the host has not waited for.
class CheckedDevice::Memory final : public MemoryResource {
 public:
  explicit Memory(CheckedDevice* device) : device_(device) {}
  MemorySpace space() const override { return MemorySpace::kDevice; }
  StatusOr<void*> Allocate(int64_t bytes) override {
    MOE_RETURN_IF_ERROR(device_->CheckAllocation(bytes));
    const int64_t rounded = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, static_cast<size_t>(rounded));
    if (p == nullptr) return Internal("checked device: out of memory for " + std::to_string(bytes));
    std::memset(p, kPoison, static_cast<size_t>(bytes));
    device_->allocations_[static_cast<const char*>(p)] = bytes;
    return p;
  }
  void Free(void* p, int64_t bytes) override { device_->OnFree(p, bytes); }

 private:
  CheckedDevice* device_;
};

CheckedDevice::CheckedDevice() : memory_(std::make_unique<Memory>(this)) {}

CheckedDevice::~CheckedDevice() {
  (void)Synchronize();
  // What a failure left unfreed: frees queued behind it (never run) and memory kept from reuse.
  for (auto& [p, bytes] : pending_frees_) std::free(p);
  for (auto& [p, bytes] : kept_) std::free(p);
}

MemoryResource* CheckedDevice::memory() { return memory_.get(); }

std::string CheckedDevice::Describe(const Op& op) const {
  return op.name + " (operation " + std::to_string(op.id) + ", " + StreamName(op.stream) +
         " stream)";
}

const char* CheckedDevice::AllocationEnd(const void* p) const {
  const char* c = static_cast<const char*>(p);
  auto it = allocations_.upper_bound(c);
  if (it == allocations_.begin()) return c;
  --it;
  return c < it->first + it->second ? it->first + it->second : c;
}

CheckedDevice::Access CheckedDevice::ToEnd(const void* p) const {
  return Read(p, p == nullptr ? 0 : AllocationEnd(p) - static_cast<const char*>(p));
}

Status CheckedDevice::Check(const Op& op) const {
  for (const std::shared_ptr<Op>& prior : live_) {
    // Ordered when the new operation knows the prior one's position on its stream.
    if (prior->clock[prior->stream] <= op.clock[prior->stream]) continue;
    for (const Access& a : op.accesses) {
      for (const Access& b : prior->accesses) {
        if (!(a.write || b.write) || !Overlap(a, b)) continue;
        return FailedPrecondition(
            "checked device: " + Describe(op) + (a.write ? " writes " : " reads ") +
            std::to_string(a.bytes) + " bytes that " + Describe(*prior) +
            (b.write ? " writes" : " reads") +
            ", with no stream order, event or host wait between them");
      }
    }
  }
  return Status::Ok();
}

StatusOr<uint64_t> CheckedDevice::Enqueue(StreamId stream, std::string name,
                                          std::vector<Access> accesses,
                                          std::function<Status()> run) {
  MOE_RETURN_IF_ERROR(failed_);
  Clock& c = clocks_[stream];
  for (int s = 0; s < kStreams; ++s) c[s] = std::max(c[s], host_[s]);  // what the host knows
  ++c[stream];
  auto op = std::make_shared<Op>();
  op->id = next_id_++;
  op->name = std::move(name);
  op->stream = stream;
  op->clock = c;
  op->accesses = std::move(accesses);
  op->run = std::move(run);
  MOE_RETURN_IF_ERROR(Check(*op));
  live_.push_back(op);
  queues_[stream].push_back(op);
  ops_[op->id] = op;
  return op->id;
}

CheckedDevice::Clock CheckedDevice::EventAfter(uint64_t id) const {
  auto it = ops_.find(id);
  return it == ops_.end() ? host_ : it->second->clock;
}

void CheckedDevice::WaitEvent(StreamId stream, const Clock& event) {
  for (int s = 0; s < kStreams; ++s) clocks_[stream][s] = std::max(clocks_[stream][s], event[s]);
}

Status CheckedDevice::RunUntil(int stream, uint64_t position) {
  std::deque<std::shared_ptr<Op>>& q = queues_[stream];
  while (!q.empty() && q.front()->clock[stream] <= position) {
    const std::shared_ptr<Op> op = q.front();
    // Everything the operation waits for on the other streams runs first.
    for (int s = 0; s < kStreams; ++s) {
      if (s != stream) MOE_RETURN_IF_ERROR(RunUntil(s, op->clock[s]));
    }
    q.pop_front();
    MOE_RETURN_IF_ERROR(failed_);
    op->status = op->run();
    op->done = true;
    if (!op->status.ok() && failed_.ok()) failed_ = op->status.WithContext(Describe(*op));
  }
  return failed_;
}

void CheckedDevice::Prune() {
  std::erase_if(live_, [&](const std::shared_ptr<Op>& op) {
    return op->clock[op->stream] <= host_[op->stream];
  });
  std::erase_if(ops_, [&](const auto& kv) {
    return kv.second->clock[kv.second->stream] <= host_[kv.second->stream];
  });
}

Status CheckedDevice::WaitFor(uint64_t id) {
  auto it = ops_.find(id);
  if (it == ops_.end()) return failed_;  // waited for before
  const std::shared_ptr<Op> op = it->second;
  MOE_RETURN_IF_ERROR(RunUntil(op->stream, op->clock[op->stream]));
  for (int s = 0; s < kStreams; ++s) host_[s] = std::max(host_[s], op->clock[s]);
  Prune();
  return op->status;
}

Status CheckedDevice::Flush(StreamId stream) {
  MOE_RETURN_IF_ERROR(RunUntil(stream, clocks_[stream][stream]));
  for (int s = 0; s < kStreams; ++s) host_[s] = std::max(host_[s], clocks_[stream][s]);
  Prune();
  return failed_;
}

Status CheckedDevice::Synchronize() {
  for (int s = 0; s < kStreams; ++s) MOE_RETURN_IF_ERROR(Flush(static_cast<StreamId>(s)));
  return failed_;
}

Status CheckedDevice::HostAccess(std::string_view name, const std::vector<Access>& accesses) {
  MOE_RETURN_IF_ERROR(failed_);
  Op host;
  host.name = std::string(name);
  host.stream = -1;
  host.clock = host_;
  host.accesses = accesses;
  for (const std::shared_ptr<Op>& prior : live_) {
    for (const Access& a : accesses) {
      for (const Access& b : prior->accesses) {
        if ((a.write || b.write) && Overlap(a, b)) {
          return FailedPrecondition("checked device: the host's " + host.name +
                                    (a.write ? " writes " : " reads ") + std::to_string(a.bytes) +
                                    " bytes that " + Describe(*prior) +
                                    (b.write ? " writes" : " reads") +
                                    ", which the host has not waited for");
        }
      }
    }
  }
  return Status::Ok();
}

Status CheckedDevice::CheckAllocation(int64_t bytes) {
  MOE_RETURN_IF_ERROR(failed_);
  for (const std::shared_ptr<Op>& op : live_) {
    if (op->stream != kComm) continue;
    // A GPU allocation may wait for the whole device, the exchange and its peers included (and
    // cudaMalloc next to NCCL kernels can hang): workspaces are sized before a call's first one.
    failed_ = FailedPrecondition("checked device: an allocation of " + std::to_string(bytes) +
                                 " bytes while " + Describe(*op) +
                                 " is in flight; size workspaces before the first exchange");
    return failed_;
  }
  return Status::Ok();
}

void CheckedDevice::OnFree(void* p, int64_t bytes) {
  allocations_.erase(static_cast<const char*>(p));
  // Stream-ordered, as the CUDA device's (cudaFreeAsync on its stream): after the compute
  // stream's work queued so far; any other user must be ordered before it by an event.
  StatusOr<uint64_t> freed = Enqueue(kCompute, "Free of " + std::to_string(bytes) + " bytes",
                                     {Write(p, bytes)}, [this, p, bytes] {
                                       std::memset(p, kPoison, static_cast<size_t>(bytes));
                                       pending_frees_.erase(p);
                                       std::free(p);
                                       return Status::Ok();
                                     });
  if (freed.ok()) {
    pending_frees_[p] = bytes;
    return;
  }
  if (failed_.ok()) failed_ = freed.status();
  // Work not ordered before the free may still run on the memory: never handed back.
  kept_.emplace_back(p, bytes);
}

// ---- Memory and the row operations: the host device's, deferred ----

Status CheckedDevice::Upload(void* dst, const void* host_src, int64_t bytes) {
  if (bytes <= 0) return Status::Ok();
  // The host's buffer may be reused on return: the operation copies it now.
  auto data = std::make_shared<std::vector<char>>(static_cast<const char*>(host_src),
                                                  static_cast<const char*>(host_src) + bytes);
  return Enqueue(kCompute, "Upload", {Write(dst, bytes)}, [dst, data] {
           std::memcpy(dst, data->data(), data->size());
           return Status::Ok();
         }).status();
}

Status CheckedDevice::Download(void* host_dst, const void* src, int64_t bytes) {
  if (bytes <= 0) return Status::Ok();
  MOE_ASSIGN_OR_RETURN(const uint64_t id,
                       Enqueue(kCompute, "Download", {Read(src, bytes)}, [host_dst, src, bytes] {
                         std::memcpy(host_dst, src, static_cast<size_t>(bytes));
                         return Status::Ok();
                       }));
  return WaitFor(id);
}

Status CheckedDevice::Copy(void* dst, const void* src, int64_t bytes) {
  if (bytes <= 0 || dst == src) return Status::Ok();
  return Enqueue(kCompute, "Copy", {Read(src, bytes), Write(dst, bytes)}, [dst, src, bytes] {
           std::memcpy(dst, src, static_cast<size_t>(bytes));
           return Status::Ok();
         }).status();
}

Status CheckedDevice::Zero(void* dst, int64_t bytes) {
  if (bytes <= 0) return Status::Ok();
  return Enqueue(kCompute, "Zero", {Write(dst, bytes)}, [dst, bytes] {
           std::memset(dst, 0, static_cast<size_t>(bytes));
           return Status::Ok();
         }).status();
}

Status CheckedDevice::Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                           float alpha, const float* a, const float* b, float beta, float* c) {
  std::vector<Access> accesses = {Read(a, m * k * kFloat), Read(b, k * n * kFloat),
                                  Write(c, m * n * kFloat)};
  if (beta != 0.0f) accesses.push_back(Read(c, m * n * kFloat));
  return Enqueue(kCompute, "Gemm", std::move(accesses), [=, this] {
           return cpu_.Gemm(trans_a, trans_b, m, n, k, alpha, a, b, beta, c);
         }).status();
}

Status CheckedDevice::GatherRows(const RowGather& g) {
  if (g.rows == 0) return Status::Ok();
  const int64_t dst_row_bytes = g.cols * (g.format == RowFormat::kBf16 ? 2 : kFloat);
  std::vector<Access> accesses = {Read(g.src_row, g.rows * 4), Read(g.src, g.src_rows * g.cols * kFloat),
                                  Write(g.dst, g.dst_rows * dst_row_bytes)};
  if (g.dst_row != nullptr) accesses.push_back(Read(g.dst_row, g.rows * 4));
  // The plan's arrays: their extent is their allocation's.
  if (g.row_token != nullptr) accesses.push_back(ToEnd(g.row_token));
  if (g.row_gate != nullptr) accesses.push_back(ToEnd(g.row_gate));
  return Enqueue(kCompute, "GatherRows", std::move(accesses), [g, this] {
           return cpu_.GatherRows(g);
         }).status();
}

Status CheckedDevice::CombineRows(const RowCombine& c) {
  const PlanRows& p = c.plan;
  std::vector<Access> accesses = {
      Read(p.token_row_offset, (p.tokens + 1) * 8), Read(p.token_rows, p.rows * 4),
      Read(c.y, p.tokens * c.cols * kFloat), Write(c.y, p.tokens * c.cols * kFloat)};
  ReadReturned(c.returned, p.rows, c.cols, &accesses);
  if (c.gated) accesses.push_back(Read(p.row_gate, p.rows * kFloat));
  return Enqueue(kCompute, "CombineRows", std::move(accesses), [c, this] {
           return cpu_.CombineRows(c);
         }).status();
}

Status CheckedDevice::GateGradients(const GateGradient& g) {
  const PlanRows& p = g.plan;
  std::vector<Access> accesses = {Read(p.row_token, p.rows * 4),
                                  Read(g.dy, p.tokens * g.cols * kFloat),
                                  Write(g.dgate, p.rows * kFloat)};
  ReadReturned(g.returned, p.rows, g.cols, &accesses);
  return Enqueue(kCompute, "GateGradients", std::move(accesses), [g, this] {
           return cpu_.GateGradients(g);
         }).status();
}

Status CheckedDevice::Cast(CastKind kind, const void* src, void* dst, int64_t count) {
  if (count <= 0) return Status::Ok();
  const int64_t in = kind == CastKind::kFromBf16 ? 2 : kFloat;
  const int64_t out = kind == CastKind::kToBf16 ? 2 : kFloat;
  return Enqueue(kCompute, "Cast", {Read(src, count * in), Write(dst, count * out)},
                 [=, this] { return cpu_.Cast(kind, src, dst, count); })
      .status();
}

namespace {

// The CPU experts on the checked device: calls deferred onto the compute stream with their rows
// declared (a part's backward also reads its forward's input); weights copied at SetWeights and
// gradients kept "on the device" until AddGradients, as a GPU's. Device memory is taken as the
// GPU's grouped FFN takes it: a part's saved activations grow at its Forward, the backward's
// scratch at a Backward (rows x (M + 2H) floats each), unless Reserve sized them — so a layer that
// lets an expert call allocate while exchanges are in flight fails here as on a GPU. The CPU
// experts compute from the caller's rows; the device memory only stands in for the GPU's.
class CheckedExperts final : public ExpertCompute {
 public:
  CheckedExperts(CheckedDevice* device, const experts::FfnShape& shape, int count)
      : device_(device), shape_(shape), inner_(shape), backward_(device->memory()) {
    for (int i = 0; i < count; ++i) grads_.push_back(experts::FfnParams::Zeros(shape));
    for (Workspace& saved : saved_) saved = Workspace(device->memory());
  }

  Status Reserve(int part, int64_t rows) override {
    MOE_RETURN_IF_ERROR(CheckPart(part));
    MOE_RETURN_IF_ERROR(saved_[static_cast<size_t>(part)].Get(Bytes(rows)).status());
    return backward_.Get(Bytes(rows)).status();
  }

  Status SetWeights(std::span<const experts::FfnParams> params) override {
    // A GPU's copy is ordered after the work queued before it and complete on return.
    MOE_RETURN_IF_ERROR(device_->Synchronize());
    weights_.assign(params.begin(), params.end());
    return inner_.SetWeights(weights_);
  }
  Status Forward(int part, const std::vector<int64_t>& offsets, MatrixView<const float> x,
                 MatrixView<float> y, bool accumulate) override {
    MOE_RETURN_IF_ERROR(CheckPart(part));
    forward_x_[static_cast<size_t>(part)] = x;
    MOE_ASSIGN_OR_RETURN(void* saved, saved_[static_cast<size_t>(part)].Get(Bytes(x.rows())));
    std::vector<CheckedDevice::Access> accesses = {{x.data(), x.size() * kFloat, false},
                                                   {y.data(), y.size() * kFloat, true},
                                                   {saved, Bytes(x.rows()), true}};
    if (accumulate) accesses.push_back({y.data(), y.size() * kFloat, false});
    return device_
        ->Enqueue(CheckedDevice::kCompute, "Experts.Forward", std::move(accesses),
                  [=, this] { return inner_.Forward(part, offsets, x, y, accumulate); })
        .status();
  }
  Status Backward(int part, const std::vector<int64_t>& offsets, MatrixView<const float> dy,
                  MatrixView<float> dx, std::span<experts::FfnParams>,
                  bool accumulate_dx) override {
    MOE_RETURN_IF_ERROR(CheckPart(part));
    const MatrixView<const float> x = forward_x_[static_cast<size_t>(part)];
    MOE_ASSIGN_OR_RETURN(void* scratch, backward_.Get(Bytes(x.rows())));
    std::vector<CheckedDevice::Access> accesses = {
        {dy.data(), dy.size() * kFloat, false},
        {x.data(), x.size() * kFloat, false},
        {saved_[static_cast<size_t>(part)].data(), Bytes(x.rows()), false},
        {scratch, Bytes(x.rows()), true},
        {dx.data(), dx.size() * kFloat, true}};
    if (accumulate_dx) accesses.push_back({dx.data(), dx.size() * kFloat, false});
    return device_
        ->Enqueue(CheckedDevice::kCompute, "Experts.Backward", std::move(accesses),
                  [=, this] {
                    return inner_.Backward(part, offsets, dy, dx, grads_, accumulate_dx);
                  })
        .status();
  }
  Status AddGradients(std::span<experts::FfnParams> grads) override {
    // A GPU's download: after the work queued so far.
    MOE_RETURN_IF_ERROR(device_->Synchronize());
    if (grads.size() != grads_.size()) {
      return InvalidArgument("checked experts: " + std::to_string(grads.size()) +
                             " gradients given for " + std::to_string(grads_.size()) + " experts");
    }
    for (size_t e = 0; e < grads_.size(); ++e) {
      Tensor* to[] = {&grads[e].w1, &grads[e].b1, &grads[e].w2, &grads[e].b2, &grads[e].w3};
      Tensor* from[] = {&grads_[e].w1, &grads_[e].b1, &grads_[e].w2, &grads_[e].b2, &grads_[e].w3};
      for (int t = 0; t < 5; ++t) {
        for (int64_t i = 0; i < from[t]->size(); ++i) (*to[t])[i] += (*from[t])[i];
        from[t]->Fill(0.0f);
      }
    }
    return Status::Ok();
  }

 private:
  int64_t Bytes(int64_t rows) const {
    return rows * (shape_.model_dim + 2 * shape_.hidden_dim) * kFloat;
  }

  CheckedDevice* device_;
  experts::FfnShape shape_;
  CpuExpertCompute inner_;
  std::vector<experts::FfnParams> weights_, grads_;
  std::array<MatrixView<const float>, kMaxParts> forward_x_{};
  std::array<Workspace, kMaxParts> saved_;  // stands in for each part's saved activations
  Workspace backward_;                      // and for the backward's scratch
};

}  // namespace

StatusOr<std::unique_ptr<ExpertCompute>> CheckedDevice::MakeExperts(const experts::FfnShape& shape,
                                                                    int count) {
  return std::unique_ptr<ExpertCompute>(std::make_unique<CheckedExperts>(this, shape, count));
}

StatusOr<std::unique_ptr<LayerRouting>> CheckedDevice::MakeRouting(
    const config::LayerConfig& layer, bool) {
  return std::unique_ptr<LayerRouting>(std::make_unique<StagedHostRouting>(this, layer));
}

// ---- The communicator ----

namespace {

class CheckedRequest final : public comm::Request {
 public:
  CheckedRequest(CheckedDevice* device, uint64_t op, bool drop_then)
      : device_(device), op_(op), drop_then_(drop_then) {}
  ~CheckedRequest() override {
    if (!waited_) (void)device_->WaitFor(op_);
  }
  Status Wait() override {
    waited_ = true;
    return device_->WaitFor(op_);
  }
  Status Then(StreamHandle stream) override {
    if (stream != device_->stream()) {
      return InvalidArgument("Request::Then: the stream is not the checked device's");
    }
    if (!drop_then_) device_->WaitEvent(CheckedDevice::kCompute, device_->EventAfter(op_));
    return Status::Ok();
  }

 private:
  CheckedDevice* device_;
  uint64_t op_;
  bool drop_then_;
  bool waited_ = false;
};

// The inner communicator's symmetric buffer (host memory) as the checked device's memory: its
// fences are the inner buffer's, and a signal first checks, as the host's access to every rank's
// buffer, that no operation the host has not waited for still reads or writes one — on a GPU the
// peers would go on while this rank's stream still works on the buffers (comm/symmetric.h).
class CheckedSymmetric final : public comm::SymmetricBuffer {
 public:
  CheckedSymmetric(comm::Communicator* comm, CheckedDevice* device,
                   std::unique_ptr<comm::SymmetricBuffer> inner)
      : SymmetricBuffer(comm, inner->bytes(), MemorySpace::kDevice, Peers(*inner),
                        inner->board_words(), Boards(*inner)),
        device_(device),
        inner_(std::move(inner)) {}

 private:
  static std::vector<void*> Peers(const comm::SymmetricBuffer& b) {
    std::vector<void*> peers;
    for (int r = 0; r < b.size(); ++r) peers.push_back(b.peer(r));
    return peers;
  }
  static std::vector<int64_t*> Boards(const comm::SymmetricBuffer& b) {
    std::vector<int64_t*> boards;
    for (int r = 0; r < b.size(); ++r) {
      boards.push_back(r == b.rank() ? b.board() : const_cast<int64_t*>(b.board(r)));
    }
    return boards;
  }
  Status Arrive(uint64_t fence) override {
    std::vector<CheckedDevice::Access> buffers;
    for (int r = 0; r < size(); ++r) buffers.push_back({peer(r), bytes(), true});
    MOE_RETURN_IF_ERROR(device_->HostAccess("symmetric fence #" + std::to_string(fence), buffers));
    return inner_->Signal();
  }
  Status Await(uint64_t) override { return inner_->Wait(); }

  CheckedDevice* device_;
  std::unique_ptr<comm::SymmetricBuffer> inner_;
};

class CheckedCommunicator final : public comm::Communicator {
 public:
  CheckedCommunicator(CheckedDevice* device, comm::Communicator* inner,
                      std::unique_ptr<comm::Communicator> owned, int drop_then)
      : Communicator(inner->options()),
        device_(device),
        inner_(inner),
        owned_(std::move(owned)),
        drop_then_(drop_then) {}

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  int local_rank() const override { return inner_->local_rank(); }
  int local_size() const override { return inner_->local_size(); }
  MemorySpace memory_space() const override { return MemorySpace::kDevice; }
  std::string_view backend() const override { return "checked"; }

 protected:
  Status DoAllToAll(uint64_t seq, const void* send, void* recv, int64_t count,
                    comm::DataType dtype) override {
    const int64_t bytes = count * size() * comm::DataTypeSize(dtype);
    MOE_RETURN_IF_ERROR(Blocking("alltoall #" + std::to_string(seq),
                                 {{send, bytes, false}, {recv, bytes, true}}));
    return inner_->AllToAll(send, recv, count, dtype);
  }

  StatusOr<std::unique_ptr<comm::Request>> DoStartAllToAllV(uint64_t seq,
                                                            const AllToAllVArgs& a) override {
    if (a.after != nullptr && a.after != device_->stream()) {
      return InvalidArgument("alltoallv: after: the stream is not the checked device's");
    }
    const int64_t es = comm::DataTypeSize(a.dtype);
    std::vector<CheckedDevice::Access> accesses;
    for (int p = 0; p < size(); ++p) {
      accesses.push_back({static_cast<const char*>(a.send) + a.send_displs[p] * es,
                          a.send_counts[p] * es, false});
      accesses.push_back({static_cast<char*>(a.recv) + a.recv_displs[p] * es,
                          a.recv_counts[p] * es, true});
    }
    // It starts after the compute stream's work queued so far.
    if (a.after != nullptr) {
      device_->WaitEvent(CheckedDevice::kComm, device_->RecordEvent(CheckedDevice::kCompute));
    }
    std::vector<int64_t> sc(a.send_counts.begin(), a.send_counts.end()),
        sd(a.send_displs.begin(), a.send_displs.end()),
        rc(a.recv_counts.begin(), a.recv_counts.end()),
        rd(a.recv_displs.begin(), a.recv_displs.end());
    comm::Communicator* inner = inner_;
    const void* send = a.send;
    void* recv = a.recv;
    const comm::DataType dtype = a.dtype;
    MOE_ASSIGN_OR_RETURN(
        const uint64_t op,
        device_->Enqueue(CheckedDevice::kComm, "alltoallv #" + std::to_string(seq),
                         std::move(accesses),
                         [=] { return inner->AllToAllV(send, sc, sd, recv, rc, rd, dtype); }));
    const bool drop = drop_then_ > 0 && ++requests_ == drop_then_;
    return std::unique_ptr<comm::Request>(std::make_unique<CheckedRequest>(device_, op, drop));
  }

  Status DoAllReduce(uint64_t seq, const void* send, void* recv, int64_t count,
                     comm::DataType dtype, comm::ReduceOp op) override {
    const int64_t bytes = count * comm::DataTypeSize(dtype);
    MOE_RETURN_IF_ERROR(Blocking("allreduce #" + std::to_string(seq),
                                 {{send, bytes, false}, {recv, bytes, true}}));
    return inner_->AllReduce(send, recv, count, dtype, op);
  }
  Status DoAllGather(uint64_t seq, const void* send, void* recv, int64_t count,
                     comm::DataType dtype) override {
    const int64_t bytes = count * comm::DataTypeSize(dtype);
    MOE_RETURN_IF_ERROR(Blocking("allgather #" + std::to_string(seq),
                                 {{send, bytes, false}, {recv, bytes * size(), true}}));
    return inner_->AllGather(send, recv, count, dtype);
  }
  Status DoBroadcast(uint64_t seq, void* buffer, int64_t count, comm::DataType dtype,
                     int root) override {
    MOE_RETURN_IF_ERROR(Blocking("broadcast #" + std::to_string(seq),
                                 {{buffer, count * comm::DataTypeSize(dtype), true}}));
    return inner_->Broadcast(buffer, count, dtype, root);
  }
  Status DoBarrier(uint64_t seq) override {
    MOE_RETURN_IF_ERROR(Blocking("barrier #" + std::to_string(seq), {}));
    return inner_->Barrier();
  }
  StatusOr<std::unique_ptr<comm::Communicator>> DoSplit(uint64_t seq, int color,
                                                        int key) override {
    MOE_RETURN_IF_ERROR(Blocking("split #" + std::to_string(seq), {}));
    MOE_ASSIGN_OR_RETURN(std::unique_ptr<comm::Communicator> split, inner_->Split(color, key));
    if (split == nullptr) return std::unique_ptr<comm::Communicator>();
    comm::Communicator* raw = split.get();
    return std::unique_ptr<comm::Communicator>(
        std::make_unique<CheckedCommunicator>(device_, raw, std::move(split), 0));
  }
  // Its "device memory" is host memory: host words pass as they are.
  MemoryResource* WordStaging() const override { return nullptr; }
  StatusOr<std::unique_ptr<comm::SymmetricBuffer>> DoAllocateSymmetric(
      uint64_t seq, int64_t bytes, int64_t board_words) override {
    MOE_RETURN_IF_ERROR(Blocking("symmetric #" + std::to_string(seq), {}));
    MOE_ASSIGN_OR_RETURN(std::unique_ptr<comm::SymmetricBuffer> inner,
                         inner_->AllocateSymmetric(bytes, board_words));
    return std::unique_ptr<comm::SymmetricBuffer>(
        std::make_unique<CheckedSymmetric>(this, device_, std::move(inner)));
  }

 private:
  // A blocking call: the communication stream's queued work first (issue order), then the host's
  // access to the buffers.
  Status Blocking(const std::string& name, const std::vector<CheckedDevice::Access>& accesses) {
    MOE_RETURN_IF_ERROR(device_->Flush(CheckedDevice::kComm));
    return device_->HostAccess(name, accesses);
  }

  CheckedDevice* device_;
  comm::Communicator* inner_;
  std::unique_ptr<comm::Communicator> owned_;
  int drop_then_;
  int requests_ = 0;
};

}  // namespace

std::unique_ptr<comm::Communicator> MakeCheckedCommunicator(CheckedDevice* device,
                                                            comm::Communicator* inner,
                                                            int drop_then) {
  return std::make_unique<CheckedCommunicator>(device, inner, nullptr, drop_then);
}

}  // namespace moe
