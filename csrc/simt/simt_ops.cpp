// lstm_fused._simt: the test-only build that runs the CUDA sources (csrc/cuda/*.cu, host code
// and kernels alike) on the CPU under the SIMT emulator. Its ops take CPU tensors and have the
// lstm_fused ops' schemas, under the lstm_fused_simt namespace; the tests compare them with the
// float64 reference. Users never load it: `import lstm_fused` does not.
#include <Python.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "../op_schemas.h"
#include "simt.h"

extern "C" {
PyObject* PyInit__simt(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_simt", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace lstm_fused {
namespace {

// The virtual device the CUDA host code plans for (gpu::device_info reads it on every call).
void set_virtual_device(int64_t sm_count, int64_t shared_per_block_optin, bool cooperative_launch, int64_t cc_major) {
  TORCH_CHECK(sm_count > 0 && shared_per_block_optin > 0, "set_virtual_device: sizes must be positive");
  simt::Device device = simt::device();
  device.sm_count = static_cast<int>(sm_count);
  device.shared_per_block_optin = static_cast<size_t>(shared_per_block_optin);
  device.cooperative_launch = cooperative_launch;
  device.cc_major = static_cast<int>(cc_major);
  simt::set_device(device);
}

std::vector<int64_t> virtual_device() {
  const simt::Device& device = simt::device();
  return {device.sm_count, static_cast<int64_t>(device.shared_per_block_optin), device.cooperative_launch ? 1 : 0,
          device.cc_major};
}

// What the emulator counted since the last reset, for the performance model (benchmarks/perf_model.py).
std::vector<int64_t> counters() {
  const simt::Counters& c = simt::counters();
  return {static_cast<int64_t>(c.launches), static_cast<int64_t>(c.blocks), static_cast<int64_t>(c.threads),
          static_cast<int64_t>(c.block_barriers), static_cast<int64_t>(c.warp_collectives),
          static_cast<int64_t>(c.grid_barriers), static_cast<int64_t>(c.mma), static_cast<int64_t>(c.ldmatrix),
          static_cast<int64_t>(c.cp_async), static_cast<int64_t>(c.switches)};
}

void reset_counters() { simt::counters().reset(); }

}  // namespace
}  // namespace lstm_fused

TORCH_LIBRARY(lstm_fused_simt, m) {
  // -> [launches, blocks, threads, block_barriers, warp_collectives, grid_barriers, mma, ldmatrix,
  //     cp_async, context_switches]
  m.def("counters() -> int[]", &lstm_fused::counters);
  m.def("reset_counters() -> ()", &lstm_fused::reset_counters);
  m.def(lstm_fused::schemas::kLstmLayerForward);
  m.def(lstm_fused::schemas::kLstmLayerBackward);
  m.def(lstm_fused::schemas::kGruLayerForward);
  m.def(lstm_fused::schemas::kGruLayerBackward);
  // -> [sm_count, shared_per_block_optin, cooperative_launch, cc_major]
  m.def("virtual_device() -> int[]", &lstm_fused::virtual_device);
  m.def("set_virtual_device(int sm_count, int shared_per_block_optin, bool cooperative_launch, int cc_major=9) -> ()",
        &lstm_fused::set_virtual_device);
}
