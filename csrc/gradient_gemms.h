// The large GEMMs of the backward pass after its time loop (grad_x = d_gates W_ih and the weight
// gradients d_gates^T [x | h_{t-1}]), with the BLAS chosen by CPU vendor.
//
// MKL, which at::mm calls on x86, runs its best sgemm only on Intel CPUs. On an AMD EPYC (Zen 5,
// AVX-512) at::mm gave 172-200 GFLOP/s for these shapes where oneDNN's inner product (through
// ATen's mkldnn linear ops, conversions included) gave 227-408 (benchmarks/NOTES.md, session
// 9); on Zen 3 MKL reached 53 GFLOP/s at 128x512x2048 (issue 18). oneDNN picks its code by ISA,
// not by vendor. So on x86 CPUs of other vendors, float32 GEMMs of at least kOneDnnMinMacs
// (gradient_gemms.cpp) go to oneDNN; on Intel, elsewhere, for other dtypes and for CUDA tensors
// they stay on at::mm. LSTM_FUSED_CPU_GEMM=mkl or =onednn forces either (tests, measurements).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace lstm_fused {

// Whether a GEMM of `macs` multiply-adds on tensors like `like` goes to oneDNN.
bool gradient_gemm_on_onednn(const at::Tensor& like, double macs);

// The left operand of one or more gradient GEMMs (the gate gradients of every step, [M, N]):
// converted to oneDNN's tensor once, on its first GEMM that goes there, since the copy of a
// large d_gates costs about a sixth of its GEMM.
class GemmOperand {
 public:
  explicit GemmOperand(at::Tensor a) : a_(std::move(a)) {}

  // a^T b: b [M, K] -> [N, K].
  at::Tensor tn(const at::Tensor& b) const;
  // a^T b and the column sums of a (a bias gradient) in one call: -> ([N, K], [N]).
  std::tuple<at::Tensor, at::Tensor> tn_with_sums(const at::Tensor& b) const;
  // a b: b [N, K] -> [M, K].
  at::Tensor nn(const at::Tensor& b) const;
  // Whether a^T b or a b with K = k would go to oneDNN.
  bool on_onednn(int64_t k) const;

 private:
  const at::Tensor& converted() const;

  at::Tensor a_;
  mutable at::Tensor onednn_;
};

// a^T b for a one-off left operand.
inline at::Tensor gemm_tn(const at::Tensor& a, const at::Tensor& b) { return GemmOperand(a).tn(b); }

}  // namespace lstm_fused
