// moe_runtime._core: the library's MoE layer, its expert-parallel exchange and its communicators
// from Python (pybind11). The C++ library is the one implementation; this file converts arrays and
// errors and holds the Python-side lifetimes, nothing more.
//
// Arrays: float32, C-contiguous NumPy arrays are read in place; anything else is refused with the
// rule (no silent conversion: a float64 or strided array is a caller's mistake worth naming).
// Results come back as NumPy arrays that own the library's buffers (no copy); parameters are views
// of the layer's own tensors, so writing into them changes the weights the next forward uses.
//
// Errors: a library Status arrives as ValueError (kInvalidArgument: a bad config field, shape or
// size, with the field and the rule), FileNotFoundError (kNotFound), TimeoutError (a collective's
// deadline), NotImplementedError (kUnimplemented) or RuntimeError (anything else).
//
// The GIL is released inside every library call, so ranks of a loopback world can run as Python
// threads of one process, each with its own communicator.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <google/protobuf/util/json_util.h>

#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "comm/world.h"
#include "experts/cpu/blas.h"
#include "base/file.h"
#include "base/status.h"
#include "base/tensor.h"
#include "runtime/config/config.h"
#include "runtime/routing/dispatch_plan.h"
#include "runtime/device/host_device.h"
#include "runtime/exchange/expert_exchange.h"
#include "runtime/layer/host_layer_call.h"
#include "runtime/layer/layer_io.h"
#include "runtime/layer/make_moe_layer.h"
#include "runtime/layer/moe_layer.h"
#include "runtime/train/flops.h"


namespace py = pybind11;

namespace moe::python {
namespace {

// ---- Errors -------------------------------------------------------------------------------------

[[noreturn]] void Raise(PyObject* type, const std::string& message) {
  PyErr_SetString(type, message.c_str());
  throw py::error_already_set();
}

[[noreturn]] void RaiseStatus(const Status& s) {
  switch (s.code()) {
    case StatusCode::kInvalidArgument:
      Raise(PyExc_ValueError, s.ToString());
    case StatusCode::kNotFound:
      Raise(PyExc_FileNotFoundError, s.ToString());
    case StatusCode::kDeadlineExceeded:
      Raise(PyExc_TimeoutError, s.ToString());
    case StatusCode::kUnimplemented:
      Raise(PyExc_NotImplementedError, s.ToString());
    default:
      Raise(PyExc_RuntimeError, s.ToString());
  }
}

void Check(const Status& s) {
  if (!s.ok()) RaiseStatus(s);
}

template <typename T>
T Take(StatusOr<T> v) {
  if (!v.ok()) RaiseStatus(v.status());
  return std::move(v).value();
}

// ---- Arrays -------------------------------------------------------------------------------------

std::string ShapeOf(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(a.shape(i));
  }
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// A 2-D float32 C-contiguous array of `cols` columns (and `rows` rows when >= 0), read in place.
MatrixView<const float> FloatMatrix(const py::array& a, const std::string& what, int64_t cols,
                                    const std::string& cols_rule, int64_t rows = -1,
                                    const std::string& rows_rule = "") {
  if (!py::isinstance<py::array_t<float>>(a) || a.dtype().kind() != 'f' || a.itemsize() != 4) {
    Raise(PyExc_TypeError, what + " must be a float32 array, got dtype " +
                               std::string(py::str(a.dtype())) +
                               " (convert it with .astype(numpy.float32))");
  }
  if (a.ndim() != 2) {
    Raise(PyExc_ValueError, what + " must be 2-D, got shape " + ShapeOf(a));
  }
  if (!(a.flags() & py::array::c_style)) {
    Raise(PyExc_ValueError, what + " must be C-contiguous (numpy.ascontiguousarray), got strides (" +
                                std::to_string(a.strides(0)) + ", " + std::to_string(a.strides(1)) +
                                ")");
  }
  if (a.shape(1) != cols) {
    Raise(PyExc_ValueError, what + " has shape " + ShapeOf(a) + ": its " +
                                std::to_string(a.shape(1)) + " columns must equal " + cols_rule +
                                "=" + std::to_string(cols));
  }
  if (rows >= 0 && a.shape(0) != rows) {
    Raise(PyExc_ValueError, what + " has shape " + ShapeOf(a) + ": its " +
                                std::to_string(a.shape(0)) + " rows must equal " + rows_rule +
                                "=" + std::to_string(rows));
  }
  return {static_cast<const float*>(a.data()), a.shape(0), a.shape(1)};
}

// A 1-D float32 C-contiguous array of n values (`rule` names n), read in place.
const float* FloatVector(const py::array& a, const std::string& what, int64_t n,
                         const std::string& rule) {
  if (a.ndim() != 1 || a.shape(0) != n || a.dtype().kind() != 'f' || a.itemsize() != 4 ||
      !(a.flags() & py::array::c_style)) {
    Raise(PyExc_ValueError, what + " must be a C-contiguous float32 vector of " + rule +
                                std::to_string(n) + " values, got shape " + ShapeOf(a) + " " +
                                std::string(py::str(a.dtype())));
  }
  return static_cast<const float*>(a.data());
}

// A Matrix moved into a NumPy array that owns it (no copy). vector: 1-D of all its elements.
template <typename T>
py::array Own(Matrix<T>&& m, bool vector = false) {
  auto* owner = new Matrix<T>(std::move(m));
  py::capsule base(owner, [](void* p) { delete static_cast<Matrix<T>*>(p); });
  if (vector) return py::array_t<T>({owner->size()}, {sizeof(T)}, owner->data(), base);
  return py::array_t<T>({owner->rows(), owner->cols()},
                        {static_cast<int64_t>(sizeof(T)) * owner->cols(), int64_t{sizeof(T)}},
                        owner->data(), base);
}

// A view of t's memory whose lifetime is held by `base`.
py::array View(Tensor& t, bool vector, py::handle base) {
  if (vector) return py::array_t<float>({t.size()}, {int64_t{4}}, t.data(), base);
  return py::array_t<float>({t.rows(), t.cols()}, {4 * t.cols(), int64_t{4}}, t.data(), base);
}

// A read-only view of rows owned by `base`.
py::array ReadOnlyView(MatrixView<const float> r, py::handle base) {
  py::array out = py::array_t<float>({r.rows(), r.cols()}, {4 * r.cols(), int64_t{4}}, r.data(), base);
  out.attr("setflags")(py::arg("write") = false);
  return out;
}

template <typename T>
py::array CopyOf(const T* data, int64_t rows, int64_t cols) {
  py::array_t<T> a({rows, cols});
  if (rows * cols > 0) std::memcpy(a.mutable_data(), data, sizeof(T) * static_cast<size_t>(rows * cols));
  return a;
}

// Protobuf's JSON writes int64 fields as strings; they come back as Python ints.
py::object IntsFromStrings(py::object v) {
  if (py::isinstance<py::dict>(v)) {
    py::dict out;
    for (auto item : v.cast<py::dict>()) out[item.first] = IntsFromStrings(py::reinterpret_borrow<py::object>(item.second));
    return out;
  }
  if (py::isinstance<py::list>(v)) {
    py::list out;
    for (auto item : v.cast<py::list>()) out.append(IntsFromStrings(py::reinterpret_borrow<py::object>(item)));
    return out;
  }
  if (py::isinstance<py::str>(v)) {
    const std::string s = v.cast<std::string>();
    const size_t digits = s.size() - (s.rfind('-', 0) == 0 ? 1 : 0);
    if (digits > 0 && s.find_first_not_of("0123456789", s.size() - digits) == std::string::npos) {
      return py::int_(std::stoll(s));
    }
  }
  return v;
}

py::object JsonToPython(const std::string& json) {
  return IntsFromStrings(py::module_::import("json").attr("loads")(json));
}

std::string MessageToJson(const google::protobuf::Message& m) {
  std::string json;
  google::protobuf::util::JsonPrintOptions opts;
  opts.preserve_proto_field_names = true;
  opts.always_print_primitive_fields = true;
  (void)google::protobuf::util::MessageToJsonString(m, &json, opts);
  return json;
}

// ---- Configs ------------------------------------------------------------------------------------

// A config from textproto text, or from the file it names (a single line ending in .textproto,
// .pbtxt or .txt that exists).
MoeConfig ConfigFrom(const std::string& text) {
  const bool path_like = text.find('\n') == std::string::npos && text.find('{') == std::string::npos &&
                         text.find(':') == std::string::npos;
  if (path_like && !text.empty()) return Take(LoadConfig(text));
  return Take(ParseConfig(text, "<string>"));
}

// ---- Communicators ------------------------------------------------------------------------------

// What keeps a communicator alive: its world (comm/world.h).
struct CommOwner {
  std::shared_ptr<comm::World> world;
  comm::Communicator* comm = nullptr;
  bool closed = false;
};

class PyCommunicator {
 public:
  explicit PyCommunicator(std::shared_ptr<CommOwner> owner) : owner_(std::move(owner)) {}

  comm::Communicator* get() const {
    if (owner_->closed || owner_->comm == nullptr) {
      Raise(PyExc_RuntimeError, "the communicator was closed (MPI was finalized at exit)");
    }
    return owner_->comm;
  }
  int rank() const { return get()->rank(); }
  int size() const { return get()->size(); }
  std::string backend() const { return std::string(get()->backend()); }

  // In place, every rank gets the same bits.
  void AllReduce(const py::array& a, const std::string& op) {
    comm::Communicator* c = get();
    if (!(a.flags() & py::array::c_style) || !a.writeable()) {
      Raise(PyExc_ValueError, "allreduce: the array must be C-contiguous and writeable");
    }
    comm::ReduceOp rop;
    if (op == "sum") {
      rop = comm::ReduceOp::kSum;
    } else if (op == "max") {
      rop = comm::ReduceOp::kMax;
    } else if (op == "min") {
      rop = comm::ReduceOp::kMin;
    } else {
      Raise(PyExc_ValueError, "allreduce: op='" + op + "' must be 'sum', 'max' or 'min'");
    }
    const comm::DataType dtype = DtypeOf(a, "allreduce");
    void* data = const_cast<void*>(a.data());
    const int64_t n = a.size();
    Status s;
    {
      py::gil_scoped_release release;
      s = c->AllReduce(data, data, n, dtype, rop);
    }
    Check(s);
  }

  void Broadcast(const py::array& a, int root) {
    comm::Communicator* c = get();
    if (!(a.flags() & py::array::c_style) || !a.writeable()) {
      Raise(PyExc_ValueError, "broadcast: the array must be C-contiguous and writeable");
    }
    const comm::DataType dtype = DtypeOf(a, "broadcast");
    void* data = const_cast<void*>(a.data());
    Status s;
    {
      py::gil_scoped_release release;
      s = c->Broadcast(data, a.size(), dtype, root);
    }
    Check(s);
  }

  void Barrier() {
    comm::Communicator* c = get();
    Status s;
    {
      py::gil_scoped_release release;
      s = c->Barrier();
    }
    Check(s);
  }

  const std::shared_ptr<CommOwner>& owner() const { return owner_; }

 private:
  static comm::DataType DtypeOf(const py::array& a, const std::string& op) {
    if (py::isinstance<py::array_t<float>>(a) && a.itemsize() == 4 && a.dtype().kind() == 'f') {
      return comm::DataType::kFloat32;
    }
    if (a.dtype().kind() == 'f' && a.itemsize() == 8) return comm::DataType::kFloat64;
    if (a.dtype().kind() == 'i' && a.itemsize() == 8) return comm::DataType::kInt64;
    Raise(PyExc_TypeError, op + ": dtype " + std::string(py::str(a.dtype())) +
                               " is not supported (float32, float64 or int64)");
  }

  std::shared_ptr<CommOwner> owner_;
};

comm::Options CommOptions(double deadline_seconds) {
  comm::Options o;
  o.deadline_seconds = deadline_seconds;
  Check(comm::ValidateOptions(o));
  return o;
}

// A world of comm/world.h (the one place that makes communicators for a named backend and
// initializes MPI), kept alive by every communicator taken from it.
std::shared_ptr<comm::World> MakeWorldOf(const std::string& backend, int ranks,
                                         double deadline_seconds) {
  comm::WorldOptions options;
  options.backend = backend;
  options.ranks = ranks;
  options.options = CommOptions(deadline_seconds);
  return std::shared_ptr<comm::World>(Take(comm::MakeWorld(options)));
}

std::vector<PyCommunicator> LoopbackWorld(int ranks, double deadline_seconds) {
  if (ranks < 1) Raise(PyExc_ValueError, "loopback_world: ranks=" + std::to_string(ranks) + " must be >= 1");
  const std::shared_ptr<comm::World> world = MakeWorldOf("loopback", ranks, deadline_seconds);
  std::vector<PyCommunicator> out;
  for (comm::Communicator* rank : world->LocalRanks()) {
    auto owner = std::make_shared<CommOwner>();
    owner->world = world;
    owner->comm = rank;
    out.emplace_back(owner);
  }
  return out;
}

#if MOE_PY_HAVE_MPI
// The MPI world: made on first use, destroyed at interpreter exit (atexit), which finalizes MPI
// when the world initialized it (mpirun reports a process that exits without MPI_Finalize as
// failed).
std::shared_ptr<CommOwner>& MpiOwner() {
  static std::shared_ptr<CommOwner> owner;
  return owner;
}

void FinalizeMpi() {
  std::shared_ptr<CommOwner>& owner = MpiOwner();
  if (!owner) return;
  owner->closed = true;
  owner->comm = nullptr;
  owner->world.reset();
}

PyCommunicator MpiWorld(double deadline_seconds) {
  std::shared_ptr<CommOwner>& owner = MpiOwner();
  if (owner) {
    if (owner->closed) Raise(PyExc_RuntimeError, "mpi_world: MPI was already finalized");
    return PyCommunicator(owner);
  }
  const std::shared_ptr<comm::World> world = MakeWorldOf("mpi", 1, deadline_seconds);
  owner = std::make_shared<CommOwner>();
  owner->world = world;
  owner->comm = world->LocalRanks().at(0);
  py::module_::import("atexit").attr("register")(py::cpp_function(&FinalizeMpi));
  return PyCommunicator(owner);
}
#endif

// ---- The layer ----------------------------------------------------------------------------------

class PyLayer {
 public:
  PyLayer(const std::string& config, uint64_t seed, std::optional<PyCommunicator> comm)
      : cfg_(ConfigFrom(config)) {
    MoeLayerOptions options;
    if (comm) {
      comm_ = comm->owner();
      comm::Communicator* c = comm->get();
      const int w = c->size();
      if (cfg_.moe().num_experts() % w != 0) {
        Raise(PyExc_ValueError, "moe.num_experts=" + std::to_string(cfg_.moe().num_experts()) +
                                    " must be divisible by the communicator's " +
                                    std::to_string(w) + " ranks (each holds E/W experts)");
      }
      if (cfg_.parallel().num_redundant_experts() > 0) {
        Raise(PyExc_NotImplementedError,
              "parallel.num_redundant_experts: redundant experts are not available from Python "
              "(moe_train runs them)");
      }
      options.ep = c;
      options.local_rank = c->local_rank();
      options.exchange =
          ExchangeOptionsOf(cfg_, Take(EpRanksPerNode(cfg_.comm().ranks_per_node(), w, w)));
    }
    layer_ = Take(MakeMoeLayer(cfg_.moe(), cfg_.compute(), options));
    params_ = MakeLayerParams(layer_->config(), layer_->first_expert(), layer_->num_local_experts());
    InitLayerParams(layer_->config(), seed, &params_);
    Check(layer_->SetParams(params_));
    call_ = std::make_unique<HostLayerCall>(layer_.get());
  }

  const config::LayerConfig& layer_config() const { return layer_->config(); }
  int model_dim() const { return layer_config().model_dim(); }

  py::tuple Forward(const py::array& x, bool train, uint64_t step, int64_t token_offset) {
    const MatrixView<const float> xv = FloatMatrix(x, "x", model_dim(), "moe.model_dim");
    if (layer_->memory_space() == MemorySpace::kDevice) Check(layer_->SetParams(params_));
    RouteContext ctx;
    ctx.train = train;
    ctx.seed = cfg_.seed();
    ctx.step = step;
    ctx.token_offset = token_offset;
    Tensor y;
    Status s;
    {
      py::gil_scoped_release release;
      s = call_->Forward(xv, ctx, &y);
      if (s.ok()) s = layer_->FetchPlan();
    }
    x_ = py::none();
    forward_rows_ = -1;
    Check(s);
    x_ = x;  // the backward's router gradient reads x: keep it alive and unchanged until then
    forward_rows_ = xv.rows();
    ++forward_id_;
    return py::make_tuple(Own(std::move(y)), Routing());
  }

  py::tuple Backward(const py::array& dy, double aux_scale, double z_scale) {
    if (forward_rows_ < 0) {
      Raise(PyExc_RuntimeError,
            "backward() needs a forward() first, and runs once per forward (the layer keeps the "
            "last forward's routing only)");
    }
    const MatrixView<const float> dyv =
        FloatMatrix(dy, "dy", model_dim(), "moe.model_dim", forward_rows_, "the forward's tokens");
    MoeLayerParams grads =
        MakeLayerParams(layer_config(), layer_->first_expert(), layer_->num_local_experts());
    layer_->set_loss_gradient_scale(LossScale(aux_scale, z_scale));
    Tensor dx;
    Status s;
    {
      py::gil_scoped_release release;
      s = call_->Backward(dyv, &dx, &grads);
    }
    layer_->set_loss_gradient_scale(LossScale());
    forward_rows_ = -1;
    x_ = py::none();
    Check(s);
    py::dict g;
    grads.ForEach([&](const std::string& name, Tensor& t) {
      g[py::str(name)] = Own(std::move(t), IsVectorParam(name));
    });
    return py::make_tuple(Own(std::move(dx)), g);
  }

  // name -> a view of the parameter (writes change the next forward's weights).
  static py::dict Parameters(py::object self) {
    PyLayer& l = self.cast<PyLayer&>();
    py::dict out;
    l.params_.ForEach([&](const std::string& name, Tensor& t) {
      out[py::str(name)] = View(t, IsVectorParam(name), self);
    });
    return out;
  }

  void SetParameter(const std::string& name, const py::array& value) {
    Tensor* target = Find(name);
    const bool vector = IsVectorParam(name);
    if (vector) {
      const float* v = FloatVector(value, name, target->size(), "");
      std::memcpy(target->data(), v, sizeof(float) * static_cast<size_t>(target->size()));
      return;
    }
    const MatrixView<const float> v = FloatMatrix(value, name, target->cols(), name + " columns",
                                                  target->rows(), name + " rows");
    std::memcpy(target->data(), v.data(), sizeof(float) * static_cast<size_t>(target->size()));
  }

  void LoadWeights(const std::string& dir) { Check(ReadLayerParams(dir, &params_).WithContext(dir)); }
  void SaveWeights(const std::string& dir) const { Check(WriteLayerParams(dir, params_)); }

  py::array RouterBias() const {
    const std::vector<float>& b = layer_->router_bias();
    py::array_t<float> out(static_cast<py::ssize_t>(b.size()));
    if (!b.empty()) std::memcpy(out.mutable_data(), b.data(), sizeof(float) * b.size());
    return out;
  }
  void SetRouterBias(const py::array& b) {
    const int e = layer_config().num_experts();
    const float* p = FloatVector(b, "router_bias", e, "moe.num_experts=");
    layer_->router_bias().assign(p, p + e);
  }
  void UpdateRouterBias() {
    if (forward_id_ == 0) Raise(PyExc_RuntimeError, "update_router_bias() needs a forward() first");
    layer_->UpdateRouterBias();
  }

  py::object Metrics() const {
    if (forward_id_ == 0) return py::none();
    return JsonToPython(MessageToJson(layer_->Metrics()));
  }

  std::string ConfigJson() const { return ConfigToJson(cfg_); }
  int first_expert() const { return layer_->first_expert(); }
  int num_local_experts() const { return layer_->num_local_experts(); }
  int64_t forward_id() const { return forward_id_; }
  std::string device() const {
    return layer_->memory_space() == MemorySpace::kDevice ? "cuda" : "cpu";
  }
  std::vector<std::string> ParameterNames() const {
    std::vector<std::string> names;
    params_.ForEach([&](const std::string& name, const Tensor&) { names.push_back(name); });
    return names;
  }

 private:
  Tensor* Find(const std::string& name) {
    Tensor* found = nullptr;
    params_.ForEach([&](const std::string& n, Tensor& t) {
      if (n == name) found = &t;
    });
    if (found == nullptr) {
      Raise(PyExc_KeyError, "no parameter named '" + name + "' on this rank (its parameters: " +
                                py::str(py::cast(ParameterNames())).cast<std::string>() + ")");
    }
    return found;
  }

  // The last forward's routing: experts and gates (S x k), the expert-choice token table, or
  // Soft MoE's combine and dispatch weights, with the losses.
  py::dict Routing() const {
    py::dict r;
    const DispatchPlan& p = layer_->plan();
    const RouterLosses& losses = layer_->losses();
    if (layer_config().router().gate() == config::SOFT) {
      const Tensor& c = layer_->router_output().probs;
      const Tensor& d = layer_->router_output().dispatch;
      r["combine_weights"] = CopyOf(c.data(), c.rows(), c.cols());
      r["dispatch_weights"] = CopyOf(d.data(), d.rows(), d.cols());
    } else {
      // The moe_layer tool's routing_expert.npy and routing_gate.npy.
      IntTensor experts;
      Tensor gates;
      RoutingArrays(p, &experts, &gates);
      r[p.expert_choice ? "tokens" : "experts"] = Own(std::move(experts));
      r["gates"] = Own(std::move(gates));
    }
    r["aux_loss"] = losses.aux;
    r["z_loss"] = losses.z;
    r["dropped_slots"] = p.dropped_slots;
    r["capacity"] = p.capacity;
    return r;
  }

  MoeConfig cfg_;
  std::shared_ptr<CommOwner> comm_;
  std::unique_ptr<MoeLayer> layer_;
  MoeLayerParams params_;
  std::unique_ptr<HostLayerCall> call_;
  py::object x_ = py::none();
  int64_t forward_rows_ = -1;
  int64_t forward_id_ = 0;
};

// ---- The exchange -------------------------------------------------------------------------------

struct PyHandle {
  std::unique_ptr<DispatchPlan> plan;
  ExchangeHandle handle;
  int64_t model_dim = 0;
  bool combined = false;
  bool backward_dispatched = false;
};

class PyDispatcher {
 public:
  PyDispatcher(const std::string& config, std::optional<PyCommunicator> comm) : cfg_(ConfigFrom(config)) {
    if (cfg_.moe().router().gate() == config::SOFT) {
      Raise(PyExc_ValueError,
            "moe.router.gate=SOFT: Soft MoE mixes tokens into slots, it has no per-token dispatch "
            "(use Layer)");
    }
    comm::Communicator* c = nullptr;
    int w = 1;
    if (comm) {
      comm_ = comm->owner();
      c = comm->get();
      w = c->size();
    }
    if (cfg_.moe().num_experts() % w != 0) {
      Raise(PyExc_ValueError, "moe.num_experts=" + std::to_string(cfg_.moe().num_experts()) +
                                  " must be divisible by the communicator's " + std::to_string(w) +
                                  " ranks");
    }
    const ExchangeOptions options =
        ExchangeOptionsOf(cfg_, Take(EpRanksPerNode(cfg_.comm().ranks_per_node(), w, w)));
    Check(ValidateExchangeOptions(options));
    exchange_ = std::make_unique<ExpertExchange>(&device_, c, cfg_.moe().num_experts(),
                                                 cfg_.moe().model_dim(), options);
    Status s;
    {
      py::gil_scoped_release release;
      s = exchange_->EnableHierarchical();
    }
    Check(s);
  }

  int64_t model_dim() const { return cfg_.moe().model_dim(); }
  int num_experts() const { return cfg_.moe().num_experts(); }

  std::unique_ptr<PyHandle> Dispatch(const py::array& x, const py::array& probs, bool train,
                                     uint64_t step, int64_t token_offset,
                                     const std::optional<py::array>& bias) {
    const MatrixView<const float> xv = FloatMatrix(x, "x", model_dim(), "moe.model_dim");
    const MatrixView<const float> pv = FloatMatrix(probs, "probs", num_experts(), "moe.num_experts",
                                                   xv.rows(), "x's rows");
    std::vector<float> b;
    if (bias) {
      const float* p = FloatVector(*bias, "bias", num_experts(), "moe.num_experts=");
      b.assign(p, p + num_experts());
    }
    Tensor p(pv.rows(), pv.cols());
    std::memcpy(p.data(), pv.data(), sizeof(float) * static_cast<size_t>(p.size()));
    RouteContext ctx;
    ctx.train = train;
    ctx.seed = cfg_.seed();
    ctx.step = step;
    ctx.token_offset = token_offset;
    auto h = std::make_unique<PyHandle>();
    h->plan = std::make_unique<DispatchPlan>(Take(BuildDispatchPlan(cfg_.moe().router(), p, b, ctx)));
    h->model_dim = model_dim();
    Status s;
    {
      py::gil_scoped_release release;
      s = exchange_->Dispatch(*h->plan, xv, Pass::kForward, &h->handle);
    }
    Check(s);
    return h;
  }

  py::array Combine(PyHandle& h, const py::array& rows) {
    py::array y = CombinePass(h, Pass::kForward, rows);
    h.combined = true;
    return y;
  }

  // Backward of the combine: gate · dy of every kept row, at the experts' ranks.
  py::array DispatchBackward(py::object handle, const py::array& dy) {
    PyHandle& h = handle.cast<PyHandle&>();
    if (!h.combined) Raise(PyExc_RuntimeError, "dispatch_backward: combine the handle's forward first");
    const MatrixView<const float> dv = FloatMatrix(dy, "dy", model_dim(), "moe.model_dim",
                                                   h.plan->num_tokens, "the dispatched tokens");
    Status s;
    {
      py::gil_scoped_release release;
      s = exchange_->Dispatch(*h.plan, dv, Pass::kBackward, &h.handle);
    }
    Check(s);
    h.backward_dispatched = true;
    const MatrixView<const float> r = h.handle.received(Pass::kBackward);
    return ReadOnlyView(r, handle);
  }

  // Backward of the dispatch: dx[t] = Σ over t's kept rows of the rows' gradients (no gate).
  py::array CombineBackward(PyHandle& h, const py::array& rows) {
    if (!h.backward_dispatched) {
      Raise(PyExc_RuntimeError, "combine_backward: call dispatch_backward on the handle first");
    }
    return CombinePass(h, Pass::kBackward, rows);
  }

  int ranks() const { return exchange_->ranks(); }
  int local_experts() const { return exchange_->local_experts(); }

 private:
  // The combine of `pass`: the forward sums gate · row into y, the backward the rows into dx.
  py::array CombinePass(PyHandle& h, Pass pass, const py::array& rows) {
    const int64_t n = h.handle.received(pass).rows();
    const MatrixView<const float> rv =
        FloatMatrix(rows, "rows", model_dim(), "moe.model_dim", n, "the handle's received rows");
    Tensor out(h.plan->num_tokens, model_dim());
    Status s;
    {
      py::gil_scoped_release release;
      s = exchange_->Combine(&h.handle, pass, rv, /*gated=*/pass == Pass::kForward, out.view());
    }
    Check(s);
    return Own(std::move(out));
  }

  MoeConfig cfg_;
  std::shared_ptr<CommOwner> comm_;
  HostDevice device_;  // the rows are NumPy's: host memory
  std::unique_ptr<ExpertExchange> exchange_;
};

py::array ReceivedRows(py::object handle) {
  PyHandle& h = handle.cast<PyHandle&>();
  return ReadOnlyView(h.handle.received(Pass::kForward), handle);
}

// Segments of received rows: one row per (local expert, source rank, group) with rows, as
// [local_expert, source, group, first_row, rows].
py::array Segments(const PyHandle& h) {
  std::vector<int64_t> v;
  for (int j = 0; j < h.handle.chunks(); ++j) {
    for (const Segment& s : h.handle.segments(j)) {
      if (s.rows == 0) continue;
      v.insert(v.end(), {s.local_expert, s.source, s.group, s.row, s.rows});
    }
  }
  return CopyOf(v.data(), static_cast<int64_t>(v.size() / 5), 5);
}

}  // namespace
}  // namespace moe::python

PYBIND11_MODULE(_core, m) {
  using namespace moe::python;
  namespace mp = moe::python;
  m.doc() = "The MoE runtime's layer, expert-parallel exchange and communicators (C++ core).";

  py::class_<PyCommunicator>(m, "Communicator",
                             "A communicator of the library (MPI, loopback); collectives have deadlines.")
      .def_property_readonly("rank", &PyCommunicator::rank)
      .def_property_readonly("size", &PyCommunicator::size)
      .def_property_readonly("backend", &PyCommunicator::backend)
      .def("allreduce", &PyCommunicator::AllReduce, py::arg("array"), py::arg("op") = "sum",
           "In place: every element reduced over the ranks (float32, float64 or int64).")
      .def("broadcast", &PyCommunicator::Broadcast, py::arg("array"), py::arg("root") = 0)
      .def("barrier", &PyCommunicator::Barrier)
      .def("__repr__", [](const PyCommunicator& c) {
        return "<moe_runtime.Communicator " + c.backend() + " rank " + std::to_string(c.rank()) +
               " of " + std::to_string(c.size()) + ">";
      });

  m.def("loopback_world", &mp::LoopbackWorld, py::arg("ranks"), py::arg("deadline_seconds") = 300.0,
        "Communicators of `ranks` ranks as threads of this process: use each from its own thread.");
#if MOE_PY_HAVE_MPI
  m.def("mpi_world", &mp::MpiWorld, py::arg("deadline_seconds") = 300.0,
        "This process's communicator of the job mpirun started (MPI_COMM_WORLD); MPI is "
        "initialized on the first call and finalized at exit.");
  m.attr("has_mpi") = true;
#else
  m.def("mpi_world", [](double) -> PyCommunicator {
    mp::Raise(PyExc_NotImplementedError, "mpi_world: this build of moe_runtime has no MPI (MOE_WITH_MPI=OFF)");
  }, py::arg("deadline_seconds") = 300.0);
  m.attr("has_mpi") = false;
#endif

  m.def("set_blas_threads", [](int n) {
    if (n < 1) mp::Raise(PyExc_ValueError, "set_blas_threads: n=" + std::to_string(n) + " must be >= 1");
    moe::blas::SetThreads(n);
  }, py::arg("n"), "OpenBLAS threads of the layer's GEMMs.");

  m.def("layer_flops", [](const std::string& config, int64_t tokens, int64_t expert_rows) {
    if (tokens < 0 || expert_rows < 0) {
      mp::Raise(PyExc_ValueError, "layer_flops: tokens=" + std::to_string(tokens) + " and expert_rows=" +
                                      std::to_string(expert_rows) + " must be >= 0");
    }
    moe::config::MoeConfig cfg = mp::ConfigFrom(config);
    cfg.mutable_model()->set_num_layers(1);  // one layer's call; the LM head is left out below
    const moe::StepFlops f = moe::ModelFlops(cfg, tokens, expert_rows);
    py::dict d;
    d["router"] = f.router;
    d["experts"] = f.experts;
    d["shared"] = f.shared;
    d["soft_mix"] = f.soft_mix;
    d["total"] = f.router + f.experts + f.shared + f.soft_mix;
    return d;
  }, py::arg("config"), py::arg("tokens"), py::arg("expert_rows"),
  "Model FLOPs (forward + backward) of one MoE layer call on `tokens` tokens whose experts kept "
  "`expert_rows` rows, by the library's accounting (runtime/train/flops.h): router, experts, "
  "shared experts, Soft MoE's slot mixing and their total.");

  py::class_<PyLayer>(m, "Layer", "One MoE layer (the config's moe section), local or expert-parallel.")
      .def(py::init<const std::string&, uint64_t, std::optional<PyCommunicator>>(), py::arg("config"),
           py::arg("seed") = 0, py::arg("comm") = py::none())
      .def("forward", &PyLayer::Forward, py::arg("x"), py::arg("train") = false, py::arg("step") = 0,
           py::arg("token_offset") = 0)
      .def("backward", &PyLayer::Backward, py::arg("dy"), py::arg("aux_scale") = 1.0,
           py::arg("z_scale") = 1.0)
      .def("parameters", &PyLayer::Parameters)
      .def_property_readonly("parameter_names", &PyLayer::ParameterNames)
      .def("set_parameter", &PyLayer::SetParameter, py::arg("name"), py::arg("value"))
      .def("load_weights", &PyLayer::LoadWeights, py::arg("dir"))
      .def("save_weights", &PyLayer::SaveWeights, py::arg("dir"))
      .def_property("router_bias", &PyLayer::RouterBias, &PyLayer::SetRouterBias)
      .def("update_router_bias", &PyLayer::UpdateRouterBias)
      .def_property_readonly("metrics", &PyLayer::Metrics)
      .def_property_readonly("config_json", &PyLayer::ConfigJson)
      .def_property_readonly("model_dim", &PyLayer::model_dim)
      .def_property_readonly("num_experts", [](const PyLayer& l) { return l.layer_config().num_experts(); })
      .def_property_readonly("top_k", [](const PyLayer& l) { return moe::TopK(l.layer_config().router()); })
      .def_property_readonly("aux_loss_weight", [](const PyLayer& l) { return l.layer_config().router().aux_loss_weight(); })
      .def_property_readonly("z_loss_weight", [](const PyLayer& l) { return l.layer_config().router().z_loss_weight(); })
      .def_property_readonly("first_expert", &PyLayer::first_expert)
      .def_property_readonly("num_local_experts", &PyLayer::num_local_experts)
      .def_property_readonly("forward_id", &PyLayer::forward_id)
      .def_property_readonly("device", &PyLayer::device);

  py::class_<PyHandle>(m, "Handle", "One dispatch: its plan, received rows and segments.")
      .def_property_readonly("rows", &mp::ReceivedRows)
      .def_property_readonly("segments", &mp::Segments)
      .def_property_readonly("experts", [](const PyHandle& h) {
        return mp::CopyOf(h.plan->slot_expert.data(), h.plan->num_tokens, h.plan->top_k);
      })
      .def_property_readonly("gates", [](const PyHandle& h) {
        return mp::CopyOf(h.plan->slot_gate.data(), h.plan->num_tokens, h.plan->top_k);
      })
      .def_property_readonly("capacity", [](const PyHandle& h) { return h.plan->capacity; })
      .def_property_readonly("dropped_slots", [](const PyHandle& h) { return h.plan->dropped_slots; });

  py::class_<PyDispatcher>(m, "Dispatcher",
                           "The expert-parallel exchange: dispatch rows to the experts' ranks, "
                           "combine their outputs back.")
      .def(py::init<const std::string&, std::optional<PyCommunicator>>(), py::arg("config"),
           py::arg("comm") = py::none())
      .def("dispatch", &PyDispatcher::Dispatch, py::keep_alive<0, 1>(), py::arg("x"), py::arg("probs"), py::arg("train") = false,
           py::arg("step") = 0, py::arg("token_offset") = 0, py::arg("bias") = py::none())
      .def("combine", &PyDispatcher::Combine, py::arg("handle"), py::arg("rows"))
      .def("dispatch_backward", &PyDispatcher::DispatchBackward, py::arg("handle"), py::arg("dy"))
      .def("combine_backward", &PyDispatcher::CombineBackward, py::arg("handle"), py::arg("rows"))
      .def_property_readonly("ranks", &PyDispatcher::ranks)
      .def_property_readonly("local_experts", &PyDispatcher::local_experts);
}
