// Compiled once with the baseline flags (not per SIMD level): it only calls ATen ops.
#include "gradient_gemms.h"

#include <ATen/Config.h>

#include <c10/core/Storage.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__linux__) || defined(__APPLE__)
#include <dlfcn.h>
#define LSTM_FUSED_HAS_DLSYM 1
#endif

namespace lstm_fused {
namespace {

// Below these the conversions to and from oneDNN's tensors and its primitive lookup are a
// noticeable share of the call; MKL keeps those. Measured on the Zen 5 EPYC, grad_x and the
// weight gradient of [M, N] gate gradients together, MKL time / oneDNN time: 0.49-0.53 at
// M=128 for N = 1024 and 2048 (1.20 at N = 512), 0.61-0.90 at M=256, 1.04-1.85 at M=512, and
// 0.96-1.96 from M=1024 up; LSTMCell training at B=32 and 128 (one step: M = B) 1.10 / 0.96x
// nn.LSTMCell on oneDNN against 1.20 / 0.95-1.02x on MKL.
constexpr double kOneDnnMinMacs = 1 << 20;
constexpr int64_t kOneDnnMinRows = 512;
// The largest block of the gate gradients converted at once. In blocks the weight gradients are
// sums of per-block GEMMs, each with a shorter reduction: a block of 2240 rows against all 4480
// at B=128, H=512 ran ~25% slower, so blocks are as large as the memory bound allows.
// LSTM_FUSED_CPU_GEMM_BLOCK (bytes) sets another bound, for tests of the blocked path.
constexpr int64_t kBlockBytes = int64_t(64) << 20;

int64_t block_bytes() {
  if (const char* setting = std::getenv("LSTM_FUSED_CPU_GEMM_BLOCK")) {
    const long long bytes = std::atoll(setting);
    if (bytes > 0) return bytes;
  }
  return kBlockBytes;
}

enum class Choice { kByVendor, kMkl, kOneDnn };

Choice forced_choice() {
  const char* setting = std::getenv("LSTM_FUSED_CPU_GEMM");
  if (setting == nullptr) return Choice::kByVendor;
  if (std::strcmp(setting, "mkl") == 0) return Choice::kMkl;
  if (std::strcmp(setting, "onednn") == 0) return Choice::kOneDnn;
  return Choice::kByVendor;
}

#if AT_MKLDNN_ENABLED()
// ATen's at::native::data_ptr_from_mkldnn (the memory of a oneDNN tensor, as AOTInductor uses
// it), exported by libtorch_cpu but declared only in a header that the wheel does not ship: looked
// up by its symbol at run time, so that a torch without it costs the copy, not the import.
using DataPtrFromOneDnn = void* (*)(const at::Tensor&);

DataPtrFromOneDnn data_ptr_from_onednn() {
  static const DataPtrFromOneDnn fn = []() -> DataPtrFromOneDnn {
#ifdef LSTM_FUSED_HAS_DLSYM
    constexpr const char* kSymbol = "_ZN2at6native20data_ptr_from_mkldnnERKNS_6TensorE";
    void* found = dlsym(RTLD_DEFAULT, kSymbol);
    if (found == nullptr) {
      Dl_info info;
      // The library that holds ATen's CPU ops (libtorch_cpu), already loaded.
      if (dladdr(reinterpret_cast<void*>(&at::_ops::mkldnn_linear_backward_input::call), &info) != 0 && info.dli_fname != nullptr) {
        if (void* library = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD)) {
          found = dlsym(library, kSymbol);
          dlclose(library);
        }
      }
    }
    return reinterpret_cast<DataPtrFromOneDnn>(found);
#else
    return nullptr;
#endif
  }();
  return fn;
}

// The context of a dense tensor's memory that belongs to a oneDNN tensor: the tensor, kept alive
// by the dense one; the deleter identifies such memory (onednn_twin).
struct OneDnnOwned {
  at::Tensor onednn;
};

void release_onednn_owned(void* context) { delete static_cast<OneDnnOwned*>(context); }

// The oneDNN tensor whose memory `t` is, whole and in the same [rows, cols] shape; or nullptr.
const at::Tensor* onednn_twin(const at::Tensor& t) {
  if (!t.defined() || !t.has_storage() || t.dim() != 2 || t.storage_offset() != 0 || !t.is_contiguous()) {
    return nullptr;
  }
  const c10::DataPtr& memory = t.storage().data_ptr();
  if (memory.get_deleter() != &release_onednn_owned) return nullptr;
  const at::Tensor& onednn = static_cast<const OneDnnOwned*>(memory.get_context())->onednn;
  return onednn.sizes() == t.sizes() ? &onednn : nullptr;
}
#endif

}  // namespace

bool mkl_runs_its_best_code() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
  return intel;
#else
  return true;
#endif
}

bool gradient_gemm_on_onednn(int64_t rows, int64_t cols, int64_t k, const at::TensorOptions& options) {
#if AT_MKLDNN_ENABLED()
  if (!options.device().is_cpu() || options.dtype() != at::kFloat || !at::hasMKLDNN()) return false;
  switch (forced_choice()) {
    case Choice::kMkl:
      return false;
    case Choice::kOneDnn:
      return true;
    case Choice::kByVendor:
      break;
  }
  const double macs = static_cast<double>(rows) * cols * k;
  return !mkl_runs_its_best_code() && rows >= kOneDnnMinRows && macs >= kOneDnnMinMacs;
#else
  (void)rows;
  (void)cols;
  (void)k;
  (void)options;
  return false;
#endif
}

bool gradient_gemm_on_onednn(const at::Tensor& a, int64_t k) {
  return gradient_gemm_on_onednn(a.size(0), a.size(1), k, a.options());
}

bool onednn_operand_buffers() {
#if AT_MKLDNN_ENABLED()
  return data_ptr_from_onednn() != nullptr;
#else
  return false;
#endif
}

at::Tensor gemm_operand_buffer(at::IntArrayRef shape, const at::TensorOptions& options, bool onednn) {
#if AT_MKLDNN_ENABLED()
  const char* setting = std::getenv("LSTM_FUSED_CPU_GEMM_BUFFERS");
  if (setting != nullptr && std::strcmp(setting, "dense") == 0) onednn = false;
  if (onednn && !shape.empty() && options.device().is_cpu() && options.dtype() == at::kFloat &&
      data_ptr_from_onednn() != nullptr) {
    const int64_t cols = shape.back();
    int64_t rows = 1;
    for (size_t d = 0; d + 1 < shape.size(); ++d) rows *= shape[d];
    if (rows > 0 && cols > 0) {
      // A 2-D float32 oneDNN tensor from empty is in the plain layout (format tag ab): its memory
      // is the row-major [rows, cols] matrix (else the oneDNN-memory cases of
      // tests/test_cpu_paths.py::test_gradient_gemms_on_onednn_match_reference would fail).
      at::Tensor onednn_tensor = at::empty({rows, cols}, options.layout(at::kMkldnn));
      void* memory = data_ptr_from_onednn()(onednn_tensor);
      if (memory != nullptr) {
        const size_t bytes = static_cast<size_t>(rows * cols) * sizeof(float);
        auto* owner = new OneDnnOwned{std::move(onednn_tensor)};
        c10::Storage storage(c10::Storage::use_byte_size_t(), bytes,
                             c10::DataPtr(memory, owner, &release_onednn_owned, options.device()),
                             /*allocator=*/nullptr, /*resizable=*/false);
        return at::empty({0}, options).set_(storage, 0, shape);
      }
    }
  }
#else
  (void)onednn;
#endif
  return at::empty(shape, options);
}

GateGemms gate_gemms(const at::Tensor& a, const at::Tensor& b_nn, const at::Tensor& b_tn, bool sums) {
  const int64_t M = a.size(0), N = a.size(1);
  const int64_t k = (b_nn.defined() ? b_nn.size(1) : 0) + (b_tn.defined() ? b_tn.size(1) : 0);
  GateGemms out;
  if (M == 0 || !gradient_gemm_on_onednn(a, k)) {
    if (b_nn.defined()) out.nn = at::mm(a, b_nn);
    if (b_tn.defined()) out.tn = at::mm(a.t(), b_tn);
    if (sums) out.sums = a.sum(0);
    return out;
  }
  // oneDNN's inner product: backward-by-data is grad_output [m, N] times weight [N, K1] (its
  // result a oneDNN tensor); backward-by-weights is grad_output^T input (its weight argument only
  // gives the dense result's dtype and device).
#if AT_MKLDNN_ENABLED()
  // Gate gradients whose memory is already a oneDNN tensor's go as they are, in one block (b_tn
  // too where it is such a tensor; otherwise it is converted whole: at most its own size more).
  if (const at::Tensor* a_onednn = onednn_twin(a)) {
    if (b_nn.defined()) {
      out.nn = at::mkldnn_linear_backward_input({M, b_nn.size(1)}, *a_onednn, b_nn.contiguous()).to_dense();
    }
    if (b_tn.defined()) {
      const at::Tensor* b_tn_onednn = onednn_twin(b_tn);
      const at::Tensor input = b_tn_onednn != nullptr ? *b_tn_onednn : b_tn.contiguous().to_mkldnn();
      out.tn = std::get<0>(at::mkldnn_linear_backward_weights(*a_onednn, input, a, false));
    }
    if (sums) out.sums = a.sum(0);
    return out;
  }
#endif
  const int64_t row_bytes = std::max<int64_t>(1, N * static_cast<int64_t>(a.element_size()));
  const int64_t bound = block_bytes();
  const int64_t blocks = std::max<int64_t>(1, (M * row_bytes + bound - 1) / bound);
  const int64_t rows = (M + blocks - 1) / blocks;
  const at::Tensor weight_nn = b_nn.defined() ? b_nn.contiguous() : at::Tensor();
  if (b_nn.defined() && blocks > 1) out.nn = at::empty({M, b_nn.size(1)}, a.options());
  for (int64_t first = 0; first < M; first += rows) {
    const int64_t m = std::min<int64_t>(rows, M - first);
    const at::Tensor block = a.narrow(0, first, m).contiguous().to_mkldnn();
    if (b_nn.defined()) {
      at::Tensor product = at::mkldnn_linear_backward_input({m, b_nn.size(1)}, block, weight_nn).to_dense();
      if (blocks == 1) {
        out.nn = std::move(product);
      } else {
        out.nn.narrow(0, first, m).copy_(product);
      }
    }
    if (b_tn.defined()) {
      const at::Tensor input = b_tn.narrow(0, first, m).contiguous().to_mkldnn();
      at::Tensor product = std::get<0>(at::mkldnn_linear_backward_weights(block, input, a, false));
      if (first == 0) {
        out.tn = std::move(product);
      } else {
        out.tn.add_(product);
      }
    }
  }
  // Not oneDNN's bias gradient: over 20000 rows (a GRU at T=5000, B=4) its sums were 4x as far
  // from the float64 ones as torch.nn's, where ATen's cascade sum is as close as torch.nn.
  if (sums) out.sums = a.sum(0);
  return out;
}

}  // namespace lstm_fused
