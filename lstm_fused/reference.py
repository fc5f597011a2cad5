"""A plain-PyTorch reference of the layer op's math: the oracle of the tests (run it in float64).

It follows the definition step by step, with none of the kernels' tricks (no folded biases, no
reserve, no batched GEMMs), so that it is easy to check by eye against nn.LSTM's documentation.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor


def lstm_layer_reference(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    w_hr: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    reverse: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    seq_len, batch, _ = x.shape
    if lengths is None:
        lengths = torch.full((batch,), seq_len, dtype=torch.long)
    h, c = h0, c0
    outputs = [None] * seq_len
    steps = range(seq_len - 1, -1, -1) if reverse else range(seq_len)
    for t in steps:
        a = x[t] @ w_ih.T + h @ w_hh.T
        if b_ih is not None:
            a = a + b_ih + b_hh
        i, f, g, o = a.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if w_hr is not None:
            h_new = h_new @ w_hr.T
        advances = (t < lengths).to(x.device).unsqueeze(1)
        h = torch.where(advances, h_new, h)
        c = torch.where(advances, c_new, c)
        outputs[t] = torch.where(advances, h_new, torch.zeros_like(h_new))
    if seq_len == 0:
        return x.new_empty(0, batch, h0.shape[1]), h0.clone(), c0.clone()
    return torch.stack(outputs), h, c


def gru_layer_reference(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    reverse: bool = False,
) -> Tuple[Tensor, Tensor]:
    seq_len, batch, _ = x.shape
    if lengths is None:
        lengths = torch.full((batch,), seq_len, dtype=torch.long)
    h = h0
    outputs = [None] * seq_len
    steps = range(seq_len - 1, -1, -1) if reverse else range(seq_len)
    for t in steps:
        gi = x[t] @ w_ih.T
        gh = h @ w_hh.T
        if b_ih is not None:
            gi = gi + b_ih
            gh = gh + b_hh
        i_r, i_z, i_n = gi.chunk(3, dim=1)
        h_r, h_z, h_n = gh.chunk(3, dim=1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        h_new = (1 - z) * n + z * h
        advances = (t < lengths).to(x.device).unsqueeze(1)
        h = torch.where(advances, h_new, h)
        outputs[t] = torch.where(advances, h_new, torch.zeros_like(h_new))
    if seq_len == 0:
        return x.new_empty(0, batch, h0.shape[1]), h0.clone()
    return torch.stack(outputs), h
