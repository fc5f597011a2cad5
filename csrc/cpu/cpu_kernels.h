// The CPU kernels' entry points, compiled once per SIMD level, and the table the dispatcher
// (cpu_dispatch.cpp) fills from the level it picks when the library loads.
//
// setup.py compiles lstm_cpu.cpp and gru_cpu.cpp once per level (DEFAULT; and on x86-64 AVX2 and
// AVX512) with that level's -m flags and -DCPU_CAPABILITY=<level>, as ATen compiles its
// native/cpu kernels. Everything those files define, and the level-dependent headers they include
// (cpu_common.h, recurrent_gemm.h, lstm_stationary.h, gru_stationary.h), lives in namespace
// lstm_fused::<level>, and at::vec in ATen's inline namespace of the same name: the three copies
// of each inline function and template then have three different names, so the linker cannot
// merge an AVX-512 copy into the baseline path (the ODR trap). What stays shared between the
// levels (c10, ATen, the standard library, layer_args.h, layer_loops.h) is level-independent
// glue; setup.py links the baseline objects first, so the copy the linker keeps of it is the
// baseline one, and tests/test_cpu_capability.py disassembles the built library to check that no
// code outside the AVX2 and AVX-512 namespaces uses their registers.
// This header is included by the per-level files and by the baseline dispatcher: it must not
// include anything whose code depends on the level (at::vec, intrinsics).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace lstm_fused {

struct CpuKernels {
  using Tensor = at::Tensor;
  using OptionalTensor = c10::optional<at::Tensor>;
  std::tuple<Tensor, Tensor, Tensor, Tensor> (*lstm_layer_forward)(
      const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
      const OptionalTensor& b_ih, const OptionalTensor& b_hh, const OptionalTensor& w_hr,
      const OptionalTensor& lengths, bool reverse) = nullptr;
  std::tuple<Tensor, Tensor, Tensor> (*lstm_layer_inference)(
      const Tensor& x, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
      const OptionalTensor& b_ih, const OptionalTensor& b_hh, const OptionalTensor& w_hr,
      const OptionalTensor& lengths, bool reverse) = nullptr;
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> (*lstm_layer_backward)(
      const Tensor& grad_y, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& x, const Tensor& h0,
      const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh, const OptionalTensor& w_hr, const Tensor& y,
      const Tensor& reserve, const OptionalTensor& lengths, bool reverse, bool need_grad_x,
      bool need_grad_weights) = nullptr;
  std::tuple<Tensor, Tensor, Tensor> (*gru_layer_forward)(
      const Tensor& x, const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh, const OptionalTensor& b_ih,
      const OptionalTensor& b_hh, const OptionalTensor& lengths, bool reverse) = nullptr;
  std::tuple<Tensor, Tensor> (*gru_layer_inference)(
      const Tensor& x, const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh, const OptionalTensor& b_ih,
      const OptionalTensor& b_hh, const OptionalTensor& lengths, bool reverse) = nullptr;
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> (*gru_layer_backward)(
      const Tensor& grad_y, const Tensor& grad_h_n, const Tensor& x, const Tensor& h0, const Tensor& w_ih,
      const Tensor& w_hh, const Tensor& y, const Tensor& reserve, const OptionalTensor& lengths, bool reverse,
      bool need_grad_x, bool need_grad_weights) = nullptr;
};

// Each level's files fill in their entries (no static initialisers in the per-level objects: their
// code must not run before the dispatcher has checked that the CPU has the level).
#define LSTM_FUSED_DECLARE_CPU_LEVEL(level)     \
  namespace level {                             \
  void add_lstm_kernels(CpuKernels& kernels);   \
  void add_gru_kernels(CpuKernels& kernels);    \
  }
LSTM_FUSED_DECLARE_CPU_LEVEL(DEFAULT)
#if defined(LSTM_FUSED_CPU_LEVELS_X86)
LSTM_FUSED_DECLARE_CPU_LEVEL(AVX2)
LSTM_FUSED_DECLARE_CPU_LEVEL(AVX512)
#endif
#undef LSTM_FUSED_DECLARE_CPU_LEVEL

}  // namespace lstm_fused
