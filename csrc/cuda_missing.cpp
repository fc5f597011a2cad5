// In a build without the CUDA sources (no nvcc, or LSTM_FUSED_CPU_ONLY=1), CUDA inputs reach
// these kernels instead of the dispatcher's generic "could not run ... with arguments from the
// 'CUDA' backend": they say why and how to get the real ones.
#ifndef LSTM_FUSED_WITH_CUDA
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace lstm_fused {
namespace {

void cuda_kernels_not_built(const c10::OperatorHandle& op, torch::jit::Stack* /*stack*/) {
  TORCH_CHECK(false, "lstm_fused: ", op.schema().name(),
              " was given CUDA tensors, but this build of lstm_fused has no CUDA kernels (it was built "
              "without a CUDA toolkit, or with LSTM_FUSED_CPU_ONLY=1). Rebuild with nvcc available: "
              "pip install --no-build-isolation -e . (FORCE_CUDA=1 makes a missing toolkit an error).");
}

}  // namespace

TORCH_LIBRARY_IMPL(lstm_fused, CUDA, m) {
  for (const char* op : {"lstm_layer_forward", "lstm_layer_backward", "gru_layer_forward", "gru_layer_backward"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&cuda_kernels_not_built>());
  }
}

}  // namespace lstm_fused
#endif  // LSTM_FUSED_WITH_CUDA
