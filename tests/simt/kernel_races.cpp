// The race mode over lstm_fused's own kernels: each kernel of csrc/cuda runs once, on shapes
// that span several blocks with ragged edges, in a program built with -fsanitize=thread, where
// the emulator makes barriers and warp collectives happens-before edges. ThreadSanitizer then
// reports any two threads of a block touching the same word between two barriers, one writing.
// tests/test_simt_kernels.py builds and runs it. Exit status 0: every launch succeeded.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "../../csrc/cuda/gru_kernels.cuh"
#include "../../csrc/cuda/gru_persistent_kernels.cuh"
#include "../../csrc/cuda/lstm_kernels.cuh"
#include "../../csrc/cuda/lstm_persistent_backward_kernel.cuh"
#include "../../csrc/cuda/lstm_persistent_kernel.cuh"
#include "../../csrc/cuda/lstm_persistent_tc_kernel.cuh"

namespace {

std::vector<float> random_vector(size_t n, std::mt19937& gen) {
  std::normal_distribution<float> normal(0.0f, 0.5f);
  std::vector<float> v(n);
  for (float& x : v) x = normal(gen);
  return v;
}

int failures = 0;

void expect(simt::Error error, const char* what) {
  if (error != simt::Error::success) {
    std::fprintf(stderr, "%s: %s: %s\n", what, simt::error_string(error), simt::last_error_message());
    ++failures;
  }
}

// bfloat16 for this ATen-free program (truncating: the values only need to be finite here).
struct BFloat16Bits {
  uint16_t bits;
  BFloat16Bits() = default;
  BFloat16Bits(float f) {  // NOLINT: converts like c10::BFloat16
    uint32_t u;
    std::memcpy(&u, &f, 4);
    bits = static_cast<uint16_t>(u >> 16);
  }
  operator float() const {
    const uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

template <typename T>
std::vector<T> random_as(size_t n, std::mt19937& gen) {
  std::vector<float> v = random_vector(n, gen);
  std::vector<T> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = T(v[i]);
  return out;
}

// A 4-SM virtual device: the persistent plans spread H=40 over 4 blocks of 10 units.
void use_four_sms() {
  simt::Device device = simt::device();
  device.sm_count = 4;
  simt::set_device(device);
}

// One cooperative launch of a persistent kernel with its dynamic shared memory.
template <typename Kernel, typename Args>
void launch_persistent(const char* name, Kernel kernel, int64_t blocks, int64_t threads, int64_t shared_bytes,
                       const Args& args, const char* what) {
  expect(simt::set_max_dynamic_shared(kernel, shared_bytes), "set_max_dynamic_shared");
  expect(simt::launch_cooperative(name, kernel, dim3(blocks), dim3(threads), shared_bytes, args), what);
}

}  // namespace

namespace lstm_fused {

template <typename scalar_t, TensorCoreFormat kFormat>
void run_tensor_core(std::mt19937& gen, const char* what) {
  const int B = 20, H = 40, T = 3;
  use_four_sms();
  const PersistentTcPlan plan = plan_persistent_tc_layer(H, B, sizeof(scalar_t), 4, 227 * 1024);
  if (!plan.usable) {
    std::fprintf(stderr, "the tensor-core plan refused H=%d B=%d (%s)\n", H, B, what);
    ++failures;
    return;
  }
  auto w_hh = random_as<scalar_t>(4 * H * H, gen), bias = random_as<scalar_t>(4 * H, gen);
  auto gates = random_as<scalar_t>(T * B * 4 * H, gen), h_even = random_as<scalar_t>(B * H, gen);
  std::vector<scalar_t> h_odd(h_even), cells(T * B * H), y(T * B * H);
  auto c_state = random_vector(B * H, gen);
  std::vector<int64_t> active_rows = {B, 17, 3};
  PersistentLstmTcArgs<scalar_t> args{{w_hh.data(), bias.data(), gates.data(), c_state.data(), cells.data(),
                                       y.data(), h_even.data(), h_odd.data(), active_rows.data(), T, B, H,
                                       int(plan.units_per_block), false},
                                      int(plan.m_tiles), int(plan.n_tiles), int(plan.k_tiles), int(plan.k_split),
                                      int(plan.row_stride)};
  const auto kernel = &lstm_persistent_tc_forward_kernel<scalar_t, kFormat>;
  launch_persistent("lstm_persistent_tc_forward_kernel", kernel, plan.blocks,
                    kPersistentTcThreads, plan.shared_bytes, args, what);
}

// The persistent backward kernel: 4 SMs give 4 blocks of 10 units; B=20 spans two m tiles on the
// tensor-core product; rows that take part change from step to step (lengths).
template <typename scalar_t, PersistentProduct kProduct>
void run_backward(std::mt19937& gen, const char* what) {
  const int B = 20, H = 40, T = 3;
  use_four_sms();
  const PersistentProductPlan plan = plan_persistent_product_layer(
      H, B, 1, 4 * H, sizeof(scalar_t), sizeof(float), kProduct != PersistentProduct::kFma, 4, 227 * 1024);
  if (!plan.usable) {
    std::fprintf(stderr, "the backward plan refused H=%d B=%d (%s)\n", H, B, what);
    ++failures;
    return;
  }
  auto w_hh = random_as<scalar_t>(4 * H * H, gen), gates = random_as<scalar_t>(T * B * 4 * H, gen);
  auto cells = random_as<scalar_t>(T * B * H, gen), c0 = random_as<scalar_t>(B * H, gen);
  auto grad_y = random_as<scalar_t>(T * B * H, gen);
  auto dh_state = random_vector(B * H, gen), dc_state = random_vector(B * H, gen);
  std::vector<scalar_t> d_gates(T * B * 4 * H), grad_h0(B * H);
  std::vector<int64_t> active_rows = {B, 17, 3}, lengths(B, 1);
  for (int b = 0; b < B; ++b) lengths[b] = b < 3 ? 3 : (b < 17 ? 2 : 1);
  PersistentLstmBackwardArgs<scalar_t, float> args{
      w_hh.data(), gates.data(), cells.data(), c0.data(), grad_y.data(), d_gates.data(), dh_state.data(),
      dc_state.data(), grad_h0.data(), active_rows.data(), lengths.data(), T, B, H, false, product_shape(plan)};
  const auto kernel = &lstm_persistent_backward_kernel<scalar_t, float, kProduct>;
  launch_persistent("lstm_persistent_backward_kernel", kernel, plan.blocks,
                    kPersistentProductThreads, plan.shared_bytes, args, what);
}

// The persistent GRU kernels, forward and backward, on the same plans.
template <typename scalar_t, PersistentProduct kProduct>
void run_gru(std::mt19937& gen, const char* what) {
  const int B = 20, H = 40, T = 3;
  use_four_sms();
  const bool tc = kProduct != PersistentProduct::kFma;
  const PersistentProductPlan forward = plan_persistent_product_layer(H, B, 3, H, sizeof(scalar_t), 4, tc, 4, 227 * 1024);
  const PersistentProductPlan backward =
      plan_persistent_product_layer(H, B, 1, 3 * H, sizeof(scalar_t), 4, tc, 4, 227 * 1024);
  if (!forward.usable || !backward.usable) {
    std::fprintf(stderr, "the GRU plans refused H=%d B=%d (%s)\n", H, B, what);
    ++failures;
    return;
  }
  auto w_hh = random_as<scalar_t>(3 * H * H, gen), b_ih = random_as<scalar_t>(3 * H, gen);
  auto b_hh = random_as<scalar_t>(3 * H, gen), gates = random_as<scalar_t>(T * B * 3 * H, gen);
  auto h_even = random_as<scalar_t>(B * H, gen);
  std::vector<scalar_t> h_odd(h_even), hidden_n_proj(T * B * H), y(T * B * H);
  std::vector<int64_t> active_rows = {B, 17, 3}, lengths(B, 1);
  for (int b = 0; b < B; ++b) lengths[b] = b < 3 ? 3 : (b < 17 ? 2 : 1);
  typename GruForwardPolicy<scalar_t, float>::Args f{w_hh.data(), b_ih.data(), b_hh.data(), gates.data(),
                                                     hidden_n_proj.data(), y.data(), h_even.data(), h_odd.data(),
                                                     active_rows.data(), T, B, H, false, product_shape(forward)};
  const auto forward_kernel = &gru_persistent_forward_kernel<scalar_t, float, kProduct>;
  launch_persistent("gru_persistent_forward_kernel", forward_kernel, forward.blocks,
                    kPersistentProductThreads, forward.shared_bytes, f, what);
  auto grad_y = random_as<scalar_t>(T * B * H, gen), h0 = random_as<scalar_t>(B * H, gen);
  auto dh_state = random_vector(B * H, gen);
  std::vector<scalar_t> d_input(T * B * 3 * H), d_even(B * 3 * H), d_odd(B * 3 * H), grad_h0(B * H);
  typename GruBackwardPolicy<scalar_t, float>::Args g{
      w_hh.data(), gates.data(), hidden_n_proj.data(), y.data(), h0.data(), grad_y.data(), d_input.data(),
      d_even.data(), d_odd.data(), dh_state.data(), grad_h0.data(), active_rows.data(), lengths.data(), T, B, H,
      false, product_shape(backward)};
  const auto backward_kernel = &gru_persistent_backward_kernel<scalar_t, float, kProduct>;
  launch_persistent("gru_persistent_backward_kernel", backward_kernel, backward.blocks,
                    kPersistentProductThreads, backward.shared_bytes, g, what);
}

}  // namespace lstm_fused

int main() {
  using namespace lstm_fused;
  std::mt19937 gen(11);
  const int B = 11, H = 40, T = 3;  // 2 x 2 blocks per step, ragged in both dimensions
  const dim3 grid = step_grid(H, B);

  {  // LSTM forward step and backward pointwise
    auto h_prev = random_vector(B * H, gen), w_hh = random_vector(4 * H * H, gen);
    auto gates = random_vector(B * 4 * H, gen), bias = random_vector(4 * H, gen);
    auto c_state = random_vector(B * H, gen);
    std::vector<float> cells(B * H), h_out(B * H), h_next(B * H);
    expect(simt::launch("lstm_forward_step_kernel", &lstm_forward_step_kernel<float, float>, grid, dim3(kStepThreads),
                        0, h_prev.data(), w_hh.data(), gates.data(), bias.data(), c_state.data(), cells.data(),
                        h_out.data(), h_next.data(), B, H, H),
           "lstm_forward_step_kernel");
    expect(simt::launch("lstm_forward_pointwise_kernel", &lstm_forward_pointwise_kernel<float, float>,
                        dim3(pointwise_blocks(B * H)), dim3(kPointwiseThreads), 0, gates.data(), bias.data(),
                        c_state.data(), cells.data(), h_out.data(), h_next.data(), B, H),
           "lstm_forward_pointwise_kernel");
    auto all_cells = random_vector(T * B * H, gen), c0 = random_vector(B * H, gen);
    auto d_cell_out = random_vector(B * H, gen), grad_y = random_vector(B * H, gen);
    std::vector<float> d_gates(B * 4 * H);
    std::vector<int64_t> lengths(B, T);
    expect(simt::launch("lstm_backward_pointwise_kernel", &lstm_backward_pointwise_kernel<float, float>,
                        dim3(pointwise_blocks(B * H)), dim3(kPointwiseThreads), 0, gates.data(), d_gates.data(),
                        all_cells.data(), c0.data(), d_cell_out.data(), grad_y.data(), c_state.data(),
                        lengths.data(), int64_t(1), int64_t(T), B, B, H, false),
           "lstm_backward_pointwise_kernel");
  }
  {  // GRU forward step and backward pointwise
    auto h_prev = random_vector(B * H, gen), w_hh = random_vector(3 * H * H, gen);
    auto b_ih = random_vector(3 * H, gen), b_hh = random_vector(3 * H, gen);
    auto gates = random_vector(B * 3 * H, gen);
    std::vector<float> hidden_n_proj(B * H), h_out(B * H), h_next(B * H);
    expect(simt::launch("gru_forward_step_kernel", &gru_forward_step_kernel<float, float>, grid, dim3(kStepThreads), 0,
                        h_prev.data(), w_hh.data(), b_ih.data(), b_hh.data(), gates.data(), hidden_n_proj.data(),
                        h_out.data(), h_next.data(), B, H),
           "gru_forward_step_kernel");
    auto hidden_proj = random_vector(B * 3 * H, gen);
    expect(simt::launch("gru_forward_pointwise_kernel", &gru_forward_pointwise_kernel<float, float>,
                        dim3(pointwise_blocks(B * H)), dim3(kPointwiseThreads), 0, h_prev.data(), hidden_proj.data(),
                        b_ih.data(), b_hh.data(), gates.data(), hidden_n_proj.data(), h_out.data(), h_next.data(),
                        B, H),
           "gru_forward_pointwise_kernel");
    auto grad_y = random_vector(B * H, gen), dh = random_vector(B * H, gen);
    std::vector<float> d_input(B * 3 * H), d_hidden(B * 3 * H);
    expect(simt::launch("gru_backward_pointwise_kernel", &gru_backward_pointwise_kernel<float, float>,
                        dim3(pointwise_blocks(B * H)), dim3(kPointwiseThreads), 0, gates.data(), hidden_n_proj.data(),
                        h_prev.data(), grad_y.data(), dh.data(), d_input.data(), d_hidden.data(), B, H),
           "gru_backward_pointwise_kernel");
  }
  {  // the FMA persistent forward on a 4-SM virtual device: 4 blocks of 10 units (40 columns: h staged), T grid barriers
    use_four_sms();
    const PersistentProductPlan plan =
        plan_persistent_product_layer(H, B, 4, H, sizeof(float), sizeof(float), false, 4, 227 * 1024);
    if (!plan.usable) {
      std::fprintf(stderr, "the persistent plan refused H=%d B=%d\n", H, B);
      return 1;
    }
    auto w_hh = random_vector(4 * H * H, gen), bias = random_vector(4 * H, gen);
    auto gates = random_vector(T * B * 4 * H, gen), c_state = random_vector(B * H, gen);
    auto h_even = random_vector(B * H, gen);
    std::vector<float> h_odd(h_even), cells(T * B * H), y(T * B * H);
    std::vector<int64_t> active_rows = {B, 7, 2};
    LstmForwardPolicy<float, float>::Args args{{w_hh.data(), bias.data(), gates.data(), c_state.data(),
                                                cells.data(), y.data(), h_even.data(), h_odd.data(),
                                                active_rows.data(), T, B, H, int(plan.units_per_block), true},
                                               product_shape(plan)};
    const auto kernel = &lstm_persistent_forward_kernel<float, float>;
    launch_persistent("lstm_persistent_forward_kernel", kernel, plan.blocks,
                      kPersistentProductThreads, plan.shared_bytes, args, "lstm_persistent_forward_kernel");
  }
  // The tensor-core persistent kernel, bf16 (ldmatrix operands, cp.async staging) and TF32 (lane
  // loads): B=20 spans two m tiles; 4 SMs give 4 blocks of 10 units (5 n tiles).
  run_tensor_core<BFloat16Bits, TensorCoreFormat::kBFloat16>(gen, "bf16");
  run_tensor_core<float, TensorCoreFormat::kTF32>(gen, "tf32");
  // The persistent backward kernel: FMA, and the tensor-core product (16-byte lane loads) in bf16 and TF32.
  run_backward<float, PersistentProduct::kFma>(gen, "backward fma");
  run_backward<BFloat16Bits, PersistentProduct::kBFloat16>(gen, "backward bf16");
  run_backward<float, PersistentProduct::kTF32>(gen, "backward tf32");
  run_gru<float, PersistentProduct::kFma>(gen, "gru fma");
  run_gru<BFloat16Bits, PersistentProduct::kBFloat16>(gen, "gru bf16");
  std::printf("%d launch failures\n", failures);
  return failures == 0 ? 0 : 1;
}
