// The layer ops' math written with differentiable ATen ops, for what the fused kernels cannot do:
// higher-order gradients (the fused backward is not differentiable) and torch.func's grad
// transforms (which refuse C++ autograd functions). Slower than the kernels: one ATen call per
// gate operation and step. csrc/autograd.cpp decides when to use it.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace lstm_fused {

// lstm_layer_forward's (y, h_n, c_n), with the same argument conventions (csrc/ops.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_composite(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const at::Tensor& b_ih, const at::Tensor& b_hh, const at::Tensor& w_hr, const at::Tensor& lengths, bool reverse);

// gru_layer_forward's (y, h_n). Undefined tensors stand for absent optional arguments.
std::tuple<at::Tensor, at::Tensor> gru_layer_composite(const at::Tensor& x, const at::Tensor& h0,
                                                       const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                       const at::Tensor& b_ih, const at::Tensor& b_hh,
                                                       const at::Tensor& lengths, bool reverse);

}  // namespace lstm_fused
