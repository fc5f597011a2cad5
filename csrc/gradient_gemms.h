// The large GEMMs of the backward pass after its time loop (grad_x = d_gates W_ih and the weight
// gradients d_gates^T [x | h_{t-1}], with the bias gradients), with the BLAS chosen by CPU vendor.
//
// MKL, which at::mm calls on x86, runs its best sgemm only on Intel CPUs. On an AMD EPYC (Zen 5,
// AVX-512) at::mm gave 170-200 GFLOP/s for these shapes where oneDNN's inner product (through
// ATen's mkldnn linear ops, the conversions to its tensors included) gave 230-400
// (benchmarks/NOTES.md, session 9); on Zen 3 MKL reached 53 GFLOP/s at 128x512x2048 (issue 18).
// oneDNN picks its code by ISA, not by vendor. So on x86 CPUs of other vendors, float32 GEMMs of
// at least 512 rows and 2^20 multiply-adds go to oneDNN; on Intel, elsewhere, for other dtypes,
// for smaller GEMMs and for CUDA tensors they stay on at::mm. On an Intel Xeon (AVX-512) MKL is
// the faster one: at B=128, T=35, I=H=512 the training backward took 199 ms with MKL's GEMMs and
// 221 ms with oneDNN's, in one process, median of 21 (benchmarks/NOTES.md, session 12).
// LSTM_FUSED_CPU_GEMM=mkl or =onednn forces either (tests, measurements).
#pragma once

#include <ATen/ATen.h>

namespace lstm_fused {

// The vendor rule of the CPU paths: true on Intel x86 CPUs, and off x86 (where at::mm's BLAS is
// not MKL and the rules measured on the Xeon stand); false on x86 CPUs of other vendors, where
// MKL does not run its best code. Compiled once (gradient_gemms.cpp) for every SIMD level.
bool mkl_runs_its_best_code();

// Whether the GEMMs of gate_gemms over a [M, N], with k columns in all in their other operands,
// go to oneDNN.
bool gradient_gemm_on_onednn(const at::Tensor& a, int64_t k);
bool gradient_gemm_on_onednn(int64_t rows, int64_t cols, int64_t k, const at::TensorOptions& options);

// A contiguous dense tensor of `shape` for an operand of gate_gemms (the gate gradients, or the
// b_tn of the weight gradients), of rows x cols where cols is the last dimension. With `onednn`
// (the GEMMs will go to oneDNN) its memory is a oneDNN tensor's, in the plain row-major layout,
// and gate_gemms hands that tensor to oneDNN as it is: the copy into oneDNN's tensor that a
// dense operand needs is skipped (at B=128, T=35, I=H=512 on a Zen 3 EPYC those copies were ~5%
// of a training step: benchmarks/NOTES.md, session 11). A plain at::empty otherwise, and where
// ATen's function that gives a oneDNN tensor's memory is not found at run time.
// LSTM_FUSED_CPU_GEMM_BUFFERS=dense gives plain buffers always (for comparisons and tests).
at::Tensor gemm_operand_buffer(at::IntArrayRef shape, const at::TensorOptions& options, bool onednn);

// Whether gemm_operand_buffer can give oneDNN's memory in this process (ATen's function found).
bool onednn_operand_buffers();

struct GateGemms {
  at::Tensor nn;    // a b_nn
  at::Tensor tn;    // a^T b_tn
  at::Tensor sums;  // the column sums of a
};

// The GEMMs over the gate gradients of every step, a [M, N] (contiguous): a b_nn (b_nn [N, K1];
// skipped when undefined), a^T b_tn (b_tn [M, K2]; skipped when undefined) and, with `sums`, the
// column sums of a (a bias gradient). An operand from gemm_operand_buffer, whole, goes to oneDNN
// without a copy (and a in one block). Otherwise, on oneDNN each block of a's rows is converted to oneDNN's
// tensor once for both products, and a large a goes in blocks of at most 64 MB, so that the
// conversion's copy adds at most that much to the backward's peak memory.
GateGemms gate_gemms(const at::Tensor& a, const at::Tensor& b_nn, const at::Tensor& b_tn, bool sums);

// a^T b alone.
inline at::Tensor gemm_tn(const at::Tensor& a, const at::Tensor& b) { return gate_gemms(a, {}, b, false).tn; }

}  // namespace lstm_fused
