// lstm_fused::_persistent_tc_plan and _persistent_product_plan: the persistent kernels'
// partitioning rules (persistent_plan.h),
// exposed so that tests check it on machines without a GPU.
#include <torch/library.h>

#include <vector>

#include "persistent_plan.h"

namespace lstm_fused {
namespace {

std::vector<int64_t> persistent_tc_plan_op(int64_t hidden, int64_t batch, int64_t element_bytes, int64_t sm_count,
                                           int64_t max_shared_bytes) {
  const PersistentTcPlan p = plan_persistent_tc_layer(hidden, batch, element_bytes, sm_count, max_shared_bytes);
  return {p.usable ? 1 : 0, p.units_per_block, p.blocks, p.m_tiles, p.n_tiles, p.k_tiles, p.k_split, p.row_stride,
          p.shared_bytes};
}

std::vector<int64_t> persistent_product_plan_op(int64_t hidden, int64_t batch, int64_t columns_per_unit,
                                                int64_t depth, int64_t element_bytes, int64_t acc_bytes,
                                                bool tensor_cores, int64_t sm_count, int64_t max_shared_bytes) {
  const PersistentProductPlan p = plan_persistent_product_layer(hidden, batch, columns_per_unit, depth, element_bytes,
                                                                acc_bytes, tensor_cores, sm_count, max_shared_bytes);
  return {p.usable ? 1 : 0, p.units_per_block, p.blocks, p.m_rows, p.n_cols, p.n_tiles, p.chunks, p.k_split,
          p.row_stride, p.stage_a ? 1 : 0, p.shared_bytes};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lstm_fused, m) {
  // -> [usable, units_per_block, blocks, m_tiles, n_tiles, k_tiles, k_split, row_stride, shared_bytes]
  m.def("_persistent_tc_plan(int hidden, int batch, int element_bytes, int sm_count, int max_shared_bytes) -> int[]",
        &persistent_tc_plan_op);
  // -> [usable, units_per_block, blocks, m_rows, n_cols, n_tiles, chunks, k_split, row_stride, stage_a, shared_bytes]
  m.def("_persistent_product_plan(int hidden, int batch, int columns_per_unit, int depth, int element_bytes, "
        "int acc_bytes, bool tensor_cores, int sm_count, int max_shared_bytes) -> int[]",
        &persistent_product_plan_op);
}

}  // namespace lstm_fused
