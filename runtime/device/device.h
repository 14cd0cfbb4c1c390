// The Device seam: where the MoE layer's operations run. The layer's sequence (runtime/layer/
// moe_layer.h) and the exchange engine (runtime/exchange/expert_exchange.h) are written once over
// it; two implementations differ only inside these operations:
//   host  (runtime/device/host_device.h): host memory, OpenBLAS GEMMs, loops. An operation runs
//         when it is called, on the calling thread; stream() is null.
//   CUDA  (runtime/device/cuda/cuda_device.h): one GPU; kernels, cuBLAS and the experts' grouped
//         GEMMs on one CUDA stream (stream()); communicator requests on device memory are ordered
//         on that stream (the `after` stream of a started all-to-all, Request::Then).
//
// Contract. Every pointer an operation takes lives in memory_space() unless its comment says
// "host". Operations are enqueued on the device's stream in call order: each sees the results of
// the operations before it, and so do communicator calls ordered on stream(). The host reads
// results only through Download (which waits) or after Synchronize. Nothing here allocates on
// behalf of the caller except the components it makes (their own workspaces).
//
// What the operations are is fixed by the layer's stages (docs/ARCHITECTURE.md "One layer over a
// Device"): GEMMs (router, Soft MoE mixing), row gathers (dispatch, regroup), the gated combine,
// the gates' gradients, dtype casts of the wire, the experts' grouped FFN (ExpertCompute) and the
// routing steps (LayerRouting).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "base/memory.h"
#include "base/status.h"
#include "experts/expert_ffn.h"
#include "proto/moe_config.pb.h"
#include "runtime/routing/dispatch_plan.h"

namespace moe {

class ExpertCompute;  // runtime/device/expert_compute.h
class LayerRouting;   // runtime/device/layer_routing.h

// A dispatch plan's row arrays where a device's operations read them (runtime/routing/
// dispatch_plan.h has their meaning): on the host device the plan's own vectors, on a GPU their
// copies (or the device router's arrays).
struct PlanRows {
  int64_t rows = 0;                           // packed rows
  int64_t tokens = 0;                         // S
  const int32_t* row_token = nullptr;         // rows: the token of each packed row
  const float* row_gate = nullptr;            // rows: its gate
  const int64_t* token_row_offset = nullptr;  // S + 1
  const int32_t* token_rows = nullptr;        // rows: each token's rows, in slot order
};

// How GatherRows writes a row.
enum class RowFormat {
  kFloat32,      // as is
  kRoundedBf16,  // rounded to bfloat16 (to nearest even), kept as float: the wire dtype's rows
                 // that do not travel
  kBf16,         // bfloat16, 2 bytes per value: the wire dtype's rows that travel
};

// For i in [0, rows): destination row dst_row[i] (i when dst_row is null) of `dst` becomes
// gate(p) · src[token(p)] with p = src_row[i], or zeros where p = -1. token(p) = row_token[p]
// (p when row_token is null), gate(p) = row_gate[p] (no scaling when null; the product is
// rounded to float before any bf16 rounding). Row i's destination must not be another i's.
// src_rows and dst_rows are the extents the indices address (rows from src and from dst): what
// the operation may read and write, for a device that checks accesses (checked_device.h).
struct RowGather {
  int64_t rows = 0, cols = 0;
  const int32_t* src_row = nullptr;
  const int32_t* dst_row = nullptr;
  const int32_t* row_token = nullptr;
  const float* row_gate = nullptr;
  const float* src = nullptr;
  void* dst = nullptr;  // float rows, or bfloat16 rows for kBf16
  RowFormat format = RowFormat::kFloat32;
  int64_t src_rows = 0, dst_rows = 0;
};

// Where each plan row's result is, after a combine: row(r) = rows[return_row[r]] when
// return_row[r] >= 0, self_rows[-1 - return_row[r]] when < 0 (return_row null: rows[r]).
// `round_bf16`: every value is read rounded to bfloat16 (to nearest even) — the bf16 wire's
// direct transport reads the experts' rows where they lie and rounds them as it reads.
struct ReturnedRows {
  const int32_t* return_row = nullptr;
  const float* rows = nullptr;
  const float* self_rows = nullptr;
  int64_t num_rows = 0, num_self_rows = 0;  // the extents of rows and self_rows
  bool round_bf16 = false;
};

// y[t] += Σ over i in [token_row_offset[t], token_row_offset[t + 1]) of gate(r) · row(r),
// r = token_rows[i], in that order (the sum order of the 1-rank layer); gate(r) = row_gate[r],
// or 1 when `gated` is false.
struct RowCombine {
  int64_t cols = 0;
  PlanRows plan;
  ReturnedRows returned;
  bool gated = true;
  float* y = nullptr;
};

// dgate[r] = Σ_c dy[row_token[r], c] · row(r)[c] for every plan row r (the gate's gradient from
// the combine y += gate · row).
struct GateGradient {
  int64_t cols = 0;
  PlanRows plan;
  ReturnedRows returned;
  const float* dy = nullptr;
  float* dgate = nullptr;
};

enum class CastKind {
  kToBf16,     // float -> bfloat16 (to nearest even)
  kFromBf16,   // bfloat16 -> float (exact)
  kRoundBf16,  // float -> float rounded to bfloat16
};

class Device {
 public:
  virtual ~Device() = default;

  // "host", "cuda:0".
  virtual std::string_view name() const = 0;
  virtual MemorySpace memory_space() const = 0;
  // Where workspaces of this device's memory come from (Workspace(device.memory())).
  virtual MemoryResource* memory() = 0;
  // The stream device-memory communicator calls are ordered on (null on the host).
  virtual StreamHandle stream() const = 0;

  // ---- Memory (`host_*`: host memory) ----
  // dst <- host_src, ordered on the stream (the host buffer may be reused on return).
  virtual Status Upload(void* dst, const void* host_src, int64_t bytes) = 0;
  // host_dst <- src once the stream's earlier work is done; complete on return.
  virtual Status Download(void* host_dst, const void* src, int64_t bytes) = 0;
  virtual Status Copy(void* dst, const void* src, int64_t bytes) = 0;
  virtual Status Zero(void* dst, int64_t bytes) = 0;
  // The host waits for everything enqueued so far.
  virtual Status Synchronize() = 0;

  // ---- Operations ----
  // Row-major c (m x n) = alpha · op(a) · op(b) + beta · c in fp32 (fp32 accumulation, no TF32);
  // a is m x k (k x m transposed), b is k x n (n x k transposed), all contiguous.
  virtual Status Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                      const float* a, const float* b, float beta, float* c) = 0;
  virtual Status GatherRows(const RowGather& g) = 0;
  virtual Status CombineRows(const RowCombine& c) = 0;
  virtual Status GateGradients(const GateGradient& g) = 0;
  // `count` values: kToBf16 writes uint16_t, kFromBf16 reads uint16_t, kRoundBf16 floats both ways
  // (src == dst allowed).
  virtual Status Cast(CastKind kind, const void* src, void* dst, int64_t count) = 0;

  // ---- Components ----
  // `count` experts of `shape` (the routed experts of a rank, or one shared expert).
  virtual StatusOr<std::unique_ptr<ExpertCompute>> MakeExperts(const experts::FfnShape& shape,
                                                               int count) = 0;
  // The routing steps of a layer of resolved config `layer`. `host_plan`: the plan's per-row
  // arrays must be on the host after every Forward (redundant experts re-address them there), so
  // a GPU routes on the host.
  virtual StatusOr<std::unique_ptr<LayerRouting>> MakeRouting(const config::LayerConfig& layer,
                                                              bool host_plan) = 0;

  // ---- Timing of the experts (ExchangeStats::expert_seconds) ----
  // Marks the start and the end of an interval of enqueued work; TakeTimedSeconds returns the
  // seconds of the intervals ended since the last call (a GPU waits for them) and forgets them.
  virtual Status BeginTiming() = 0;
  virtual Status EndTiming() = 0;
  virtual StatusOr<double> TakeTimedSeconds() = 0;
};

// Host arrays that a device's operations read (index maps, a plan's rows): on the host device the
// arrays themselves, on a GPU one upload of all of them into a workspace (from one host staging
// buffer). Add every array, then Commit; the pointers Add was given are set by Commit and stay
// valid until the workspace is used again.
class DeviceArrays {
 public:
  template <typename T>
  void Add(const std::vector<T>& v, const T** out) {
    parts_.push_back({v.data(), static_cast<int64_t>(v.size() * sizeof(T)),
                      reinterpret_cast<const void**>(out)});
  }
  Status Commit(Device& device, Workspace* workspace);
  // Forgets the arrays (keeps the staging buffer's allocation).
  void Clear() { parts_.clear(); }

 private:
  struct Part {
    const void* data;
    int64_t bytes;
    const void** out;
  };
  std::vector<Part> parts_;
  std::vector<char> staging_;
};

// The plan's row arrays (row_token, row_gate, token_row_offset, token_rows) on `device`, uploaded
// into `workspace` on a GPU. `plan` must outlive the result on the host device.
StatusOr<PlanRows> PlanRowsOn(Device& device, const DispatchPlan& plan, Workspace* workspace);

// The largest row count a plan, layout or exchange may have (int32 row indices).
inline constexpr int64_t kMaxDeviceRows = (int64_t{1} << 31) - 1;

}  // namespace moe
