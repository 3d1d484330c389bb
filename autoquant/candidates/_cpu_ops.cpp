// C++ kernels for the autoquant::cpu_* ops (defined, with Python kernels, in _cpu_ops.py).
//
// Contract: loaded by _cpu_native.py, each kernel here replaces the Python kernel of its op on the
// CPU key and computes bit for bit what that Python body computes: it calls the same ATen /
// fbgemm / oneDNN op on the same prepacked handle. Reason: a compiled or exported graph calls
// these ops once per layer call, and the dispatcher's round trip into a Python body (the GIL,
// wrapping the tensors, the cache lookup in Python, converting the handle back) costs more than
// the int8 kernel itself at small M (benchmarks/results/compile_cpu_amd-epyc-2core.txt).
//
// The handles stay owned by Python's PrepackCache (it builds, accounts and evicts them). This
// file keeps a mirror: per kind, anchor TensorImpl -> the handle and the sources it was built for
// (each by weak pointer, data pointer and version). A kernel whose sources match an entry exactly
// calls the kernel at once; on any mismatch it calls autoquant::_cpu_prepack (Python), which gets
// or builds the handle through PrepackCache and puts it here (_native_put), then looks again.
// PrepackCache evicts the mirror's entry when the anchor dies (_native_evict), so a handle lives
// no longer than its weight. A weak pointer keeps the TensorImpl's memory (not its storage)
// allocated, so an address in the mirror can never belong to a newer tensor.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/ivalue.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <cstdint>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

// The same numbering as _cpu_native.KINDS.
enum Kind : int64_t { ONEDNN = 0, FBGEMM_FP16 = 1, FBGEMM_INT8 = 2, ONEDNN_INT8 = 3, INT4PACK = 4, KINDS = 5 };

int64_t version_of(const at::Tensor& t) {
  // Inference tensors keep no version (they cannot be written outside inference mode): -1, as
  // PrepackCache counts them.
  return t.is_inference() ? -1 : static_cast<int64_t>(t._version());
}

struct Source {
  c10::weak_intrusive_ptr<c10::TensorImpl> impl;
  const void* data;
  int64_t version;

  explicit Source(const at::Tensor& t)
      : impl(t.getIntrusivePtr()), data(t.const_data_ptr()), version(version_of(t)) {}

  bool matches(const at::Tensor& t) const {
    return impl._unsafe_get_target() == t.unsafeGetTensorImpl() && data == t.const_data_ptr() &&
           version == version_of(t);
  }
};

struct Entry {
  std::vector<Source> sources;
  c10::IValue handle;
};

struct Mirror {
  std::mutex mu;
  std::unordered_map<const c10::TensorImpl*, Entry> entries[KINDS];
  int64_t misses = 0;
};

Mirror& mirror() {
  // Never destroyed: at exit, Python may be gone before static destructors would drop handles.
  static Mirror* m = new Mirror();
  return *m;
}

void check_kind(int64_t kind) {
  TORCH_CHECK(kind >= 0 && kind < KINDS, "autoquant: no prepack kind ", kind);
}

std::optional<c10::IValue> find(Kind kind, std::initializer_list<const at::Tensor*> sources) {
  Mirror& m = mirror();
  const at::Tensor& anchor = **sources.begin();
  std::lock_guard<std::mutex> guard(m.mu);
  auto it = m.entries[kind].find(anchor.unsafeGetTensorImpl());
  if (it == m.entries[kind].end() || it->second.sources.size() != sources.size()) {
    return std::nullopt;
  }
  size_t i = 0;
  for (const at::Tensor* t : sources) {
    if (!it->second.sources[i++].matches(*t)) {
      return std::nullopt;
    }
  }
  return it->second.handle;
}

c10::OperatorHandle op(const char* name, const char* overload) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload);
}

// The handle for `sources`: from the mirror, else through PrepackCache (Python) and the mirror.
c10::IValue handle_for(Kind kind, std::initializer_list<const at::Tensor*> sources) {
  if (auto h = find(kind, sources)) {
    return std::move(*h);
  }
  {
    Mirror& m = mirror();
    std::lock_guard<std::mutex> guard(m.mu);
    ++m.misses;
  }
  // No lock held here: the Python kernel takes the GIL, and _native_put takes the lock.
  static const c10::OperatorHandle refill = op("autoquant::_cpu_prepack", "");
  std::vector<at::Tensor> list;
  for (const at::Tensor* t : sources) {
    list.push_back(*t);
  }
  std::vector<c10::IValue> stack{c10::IValue(static_cast<int64_t>(kind)), c10::IValue(list)};
  refill.callBoxed(&stack);
  auto h = find(kind, sources);
  TORCH_CHECK(h.has_value(), "autoquant: PrepackCache gave no handle for a layer's weight (kind ", kind,
              "); this is a bug in autoquant, please report it");
  return std::move(*h);
}

// `kernel` on the boxed arguments `stack`; its one output.
at::Tensor call(const c10::OperatorHandle& kernel, std::vector<c10::IValue> stack) {
  kernel.callBoxed(&stack);
  return std::move(stack[0]).toTensor();
}

c10::IValue no_scalars() {
  return c10::IValue(c10::List<std::optional<c10::Scalar>>());
}

// ---- the kernels: the Python bodies of _cpu_ops.py, written out --------------------------------
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  static const c10::OperatorHandle kernel = op("mkldnn::_linear_pointwise", "");
  c10::IValue h = handle_for(ONEDNN, {&w});
  return call(kernel, {x, std::move(h), bias, c10::IValue("none"), no_scalars(), c10::IValue("")});
}

at::Tensor fbgemm_fp16_linear(const at::Tensor& x, const at::Tensor& w) {
  static const c10::OperatorHandle kernel = op("quantized::linear_dynamic_fp16", "");
  c10::IValue h = handle_for(FBGEMM_FP16, {&w});
  return call(kernel, {x, std::move(h)});
}

at::Tensor fbgemm_int8_linear(const at::Tensor& x, const at::Tensor& w_int8, const at::Tensor& w_scale) {
  static const c10::OperatorHandle kernel = op("quantized::linear_dynamic", "");
  c10::IValue h = handle_for(FBGEMM_INT8, {&w_int8, &w_scale});
  // reduce_range=true: 7-bit activation codes, as the Python body (see int8_dynamic.py).
  return call(kernel, {x, std::move(h), c10::IValue(true)});
}

at::Tensor onednn_qlinear(const at::Tensor& x_u8, c10::SymInt x_zero_point, const at::Tensor& w_int8,
                          const at::Tensor& w_scale) {
  static const c10::OperatorHandle kernel = op("onednn::qlinear_pointwise", "");
  c10::IValue h = handle_for(ONEDNN_INT8, {&w_int8, &w_scale});
  auto parts = h.toTuple();
  // x_scale 1.0: the caller applies the per-token scales after (see int8_dynamic.py).
  return call(kernel, {x_u8, c10::IValue(1.0), c10::IValue(x_zero_point.expect_int()), parts->elements()[0],
                       w_scale, parts->elements()[1], c10::IValue(), c10::IValue(1.0),
                       c10::IValue(static_cast<int64_t>(0)), c10::IValue(static_cast<int64_t>(at::ScalarType::Float)),
                       c10::IValue("none"), no_scalars(), c10::IValue("")});
}

at::Tensor int4pack_mm(const at::Tensor& x, const at::Tensor& w_int4, const at::Tensor& scales_and_zeros,
                       c10::SymInt group_size) {
  static const c10::OperatorHandle kernel = op("aten::_weight_int4pack_mm_for_cpu", "");
  c10::IValue h = handle_for(INT4PACK, {&w_int4});
  return call(kernel, {x, std::move(h), c10::IValue(group_size.expect_int()), scales_and_zeros});
}

// ---- the mirror's upkeep, called by PrepackCache ---------------------------------------------
void native_put(int64_t kind, at::TensorList sources, c10::IValue handle) {
  check_kind(kind);
  TORCH_CHECK(!sources.empty(), "autoquant: _native_put needs the handle's source tensors");
  Entry entry;
  for (const at::Tensor& t : sources) {
    entry.sources.emplace_back(t);
  }
  entry.handle = std::move(handle);
  Mirror& m = mirror();
  std::lock_guard<std::mutex> guard(m.mu);
  m.entries[kind].insert_or_assign(sources[0].unsafeGetTensorImpl(), std::move(entry));
}

void native_evict(int64_t kind, int64_t anchor) {
  check_kind(kind);
  Entry gone;  // dropped after the lock is released: a handle's destructor may take the GIL
  Mirror& m = mirror();
  {
    std::lock_guard<std::mutex> guard(m.mu);
    auto it = m.entries[kind].find(reinterpret_cast<const c10::TensorImpl*>(anchor));
    if (it == m.entries[kind].end()) {
      return;
    }
    gone = std::move(it->second);
    m.entries[kind].erase(it);
  }
}

void native_clear() {
  std::vector<Entry> gone;
  Mirror& m = mirror();
  std::lock_guard<std::mutex> guard(m.mu);
  for (auto& map : m.entries) {
    for (auto& kv : map) {
      gone.push_back(std::move(kv.second));
    }
    map.clear();
  }
}

std::vector<int64_t> native_stats() {
  Mirror& m = mirror();
  std::lock_guard<std::mutex> guard(m.mu);
  int64_t entries = 0;
  for (auto& map : m.entries) {
    entries += static_cast<int64_t>(map.size());
  }
  return {entries, m.misses};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(autoquant, m) {
  m.def("_native_put(int kind, Tensor[] sources, Any handle) -> ()", &native_put);
  m.def("_native_evict(int kind, int anchor) -> ()", &native_evict);
  m.def("_native_clear() -> ()", &native_clear);
  m.def("_native_stats() -> int[]", &native_stats);
}

TORCH_LIBRARY_IMPL(autoquant, CPU, m) {
  m.impl("cpu_onednn_linear", &onednn_linear);
  m.impl("cpu_fbgemm_fp16_linear", &fbgemm_fp16_linear);
  m.impl("cpu_fbgemm_int8_linear", &fbgemm_int8_linear);
  m.impl("cpu_onednn_qlinear", &onednn_qlinear);
  m.impl("cpu_int4pack_mm", &int4pack_mm);
}
