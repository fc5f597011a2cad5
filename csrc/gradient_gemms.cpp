// Compiled once with the baseline flags (not per SIMD level): it only calls ATen ops.
#include "gradient_gemms.h"

#include <ATen/Config.h>

#include <cstdlib>
#include <cstring>

namespace lstm_fused {
namespace {

// Below this the conversions to and from oneDNN's tensors and its primitive lookup are a
// noticeable share of the call (an LSTMCell step); MKL keeps those.
constexpr double kOneDnnMinMacs = 1 << 20;

bool vendor_prefers_onednn() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool not_intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") == 0;
  }();
  return not_intel;
#else
  return false;
#endif
}

enum class Choice { kByVendor, kMkl, kOneDnn };

Choice forced_choice() {
  const char* setting = std::getenv("LSTM_FUSED_CPU_GEMM");
  if (setting == nullptr) return Choice::kByVendor;
  if (std::strcmp(setting, "mkl") == 0) return Choice::kMkl;
  if (std::strcmp(setting, "onednn") == 0) return Choice::kOneDnn;
  return Choice::kByVendor;
}

double macs_of(const at::Tensor& a, int64_t k) { return static_cast<double>(a.size(0)) * a.size(1) * k; }

}  // namespace

bool gradient_gemm_on_onednn(const at::Tensor& like, double macs) {
#if AT_MKLDNN_ENABLED()
  if (!like.is_cpu() || like.scalar_type() != at::kFloat || !at::hasMKLDNN()) return false;
  switch (forced_choice()) {
    case Choice::kMkl:
      return false;
    case Choice::kOneDnn:
      return true;
    case Choice::kByVendor:
      break;
  }
  return vendor_prefers_onednn() && macs >= kOneDnnMinMacs;
#else
  (void)like;
  (void)macs;
  return false;
#endif
}

bool GemmOperand::on_onednn(int64_t k) const { return gradient_gemm_on_onednn(a_, macs_of(a_, k)); }

const at::Tensor& GemmOperand::converted() const {
  if (!onednn_.defined()) onednn_ = a_.contiguous().to_mkldnn();
  return onednn_;
}

// oneDNN's inner product backward-by-weights computes grad_output^T input (and the column sums
// of grad_output as the bias gradient); its weight argument only gives the result's dtype and
// device. The results are dense tensors.
at::Tensor GemmOperand::tn(const at::Tensor& b) const {
  if (!on_onednn(b.size(1))) return at::mm(a_.t(), b);
  return std::get<0>(at::mkldnn_linear_backward_weights(converted(), b.contiguous().to_mkldnn(), a_, false));
}

std::tuple<at::Tensor, at::Tensor> GemmOperand::tn_with_sums(const at::Tensor& b) const {
  if (!on_onednn(b.size(1))) return {at::mm(a_.t(), b), a_.sum(0)};
  return at::mkldnn_linear_backward_weights(converted(), b.contiguous().to_mkldnn(), a_, true);
}

// Backward-by-data: grad_output [M, N] times weight [N, K]; its result is a oneDNN tensor.
at::Tensor GemmOperand::nn(const at::Tensor& b) const {
  if (!on_onednn(b.size(1))) return at::mm(a_, b);
  return at::mkldnn_linear_backward_input({a_.size(0), b.size(1)}, converted(), b.contiguous()).to_dense();
}

}  // namespace lstm_fused
