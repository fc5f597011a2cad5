"""nn.Module drop-ins for torch.nn.LSTM, built on the fused layer op.

The modules subclass torch.nn.RNNBase, not nn.LSTM: they inherit the parameter bookkeeping
(names, shapes, order, initialisation, state_dict, _flat_weights) and nn.LSTM's checks, while
torch.compile can trace them (Dynamo graph-breaks on instances of nn.LSTM and its subclasses).
Layers, directions, dropout, batch_first, packed and unbatched input are composed here; each
(layer, direction) is one call of the op.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .ops import lstm_layer

__all__ = ["LSTM", "LSTMCell"]


class LSTM(nn.RNNBase):
    """Drop-in replacement for :class:`torch.nn.LSTM` running fused kernels.

    Same constructor, parameters, ``state_dict`` and call signature as nn.LSTM::

        lstm = lstm_fused.LSTM(input_size=8, hidden_size=32, num_layers=2, batch_first=True)
        lstm.load_state_dict(torch_lstm.state_dict())   # and the other way round
        output, (h_n, c_n) = lstm(x)
    """

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    # nn.LSTM's own checks and state permutation, so that errors and messages are the same.
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def flatten_parameters(self) -> None:
        """Does nothing: the fused kernels read the weights where they are (nn.LSTM flattens
        them into one buffer for cuDNN)."""

    def _layer_weights(self, layer: int, direction: int):
        num_directions = 2 if self.bidirectional else 1
        per_layer = len(self._flat_weights) // (self.num_layers * num_directions)
        start = (layer * num_directions + direction) * per_layer
        w = self._flat_weights[start : start + per_layer]
        b_ih, b_hh = (w[2], w[3]) if self.bias else (None, None)
        w_hr = w[-1] if self.proj_size > 0 else None
        return w[0], w[1], b_ih, b_hh, w_hr

    def _run_layers(
        self, x: Tensor, h0: Tensor, c0: Tensor, lengths: Optional[Tensor]
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """x is time-major [T, B, I]; h0/c0 are [layers * directions, B, *]."""
        num_directions = 2 if self.bidirectional else 1
        h_n: List[Tensor] = []
        c_n: List[Tensor] = []
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(num_directions):
                k = layer * num_directions + direction
                y, h, c = lstm_layer(
                    layer_input, h0[k], c0[k], *self._layer_weights(layer, direction),
                    lengths=lengths, reverse=direction == 1,
                )
                outputs.append(y)
                h_n.append(h)
                c_n.append(c)
            layer_input = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, p=self.dropout, training=True)
        return layer_input, torch.stack(h_n), torch.stack(c_n)

    def _zero_state(self, batch: int, like: Tensor) -> Tuple[Tensor, Tensor]:
        num_directions = 2 if self.bidirectional else 1
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        shape = (self.num_layers * num_directions, batch)
        return (
            torch.zeros(*shape, real_hidden_size, dtype=like.dtype, device=like.device),
            torch.zeros(*shape, self.hidden_size, dtype=like.dtype, device=like.device),
        )

    def forward(self, input, hx: Optional[Tuple[Tensor, Tensor]] = None):
        self._update_flat_weights()
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx)

        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: input must be 2-D (unbatched) or 3-D (batched), got {input.dim()}-D")
        is_batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            input = input.unsqueeze(batch_dim)
        if hx is None:
            hx = self._zero_state(input.size(batch_dim), input)
        else:
            state_dim = 3 if is_batched else 2
            if hx[0].dim() != state_dim or hx[1].dim() != state_dim:
                raise RuntimeError(
                    f"LSTM: for {input.dim() if is_batched else 2}-D input, h_0 and c_0 must be "
                    f"{state_dim}-D, got {hx[0].dim()}-D and {hx[1].dim()}-D"
                )
            if not is_batched:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        self.check_forward_args(input, hx, None)
        if input.size(0 if not self.batch_first else 1) == 0:
            raise RuntimeError("LSTM: the input sequence is empty (length 0); nn.LSTM refuses it too")

        x = input.transpose(0, 1) if self.batch_first else input
        output, h_n, c_n = self._run_layers(x, hx[0], hx[1], None)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            return output.squeeze(batch_dim), (h_n.squeeze(1), c_n.squeeze(1))
        return output, (h_n, c_n)

    def _forward_packed(self, packed: PackedSequence, hx: Optional[Tuple[Tensor, Tensor]]):
        data, batch_sizes, sorted_indices, unsorted_indices = packed
        if hx is None:
            hx = self._zero_state(int(batch_sizes[0]), data)
        else:
            # The caller's state follows the caller's batch order; the packed rows are sorted.
            hx = self.permute_hidden(hx, sorted_indices)
        self.check_forward_args(data, hx, batch_sizes)
        x, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
        output, h_n, c_n = self._run_layers(x, hx[0], hx[1], lengths)
        output_data = pack_padded_sequence(output, lengths).data
        output_packed = PackedSequence(output_data, batch_sizes, sorted_indices, unsorted_indices)
        return output_packed, self.permute_hidden((h_n, c_n), unsorted_indices)


class LSTMCell(nn.RNNCellBase):
    """Drop-in replacement for :class:`torch.nn.LSTMCell`: one step of the fused layer op.

    Same constructor, parameters (``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``) and call::

        cell = lstm_fused.LSTMCell(10, 20)
        h, c = cell(x_t, (h, c))    # x_t: [batch, 10] or [10]
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: input must be 1-D (unbatched) or 2-D (batched), got {input.dim()}-D")
        if hx is not None:
            for index, state in enumerate(hx):
                if state.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: hx[{index}] must be 1-D or 2-D, got {state.dim()}-D")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = input.new_zeros(input.size(0), self.hidden_size)
            hx = (zeros, zeros)
        elif not is_batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        self._check_step_args(input, hx)
        _, h, c = lstm_layer(input.unsqueeze(0), hx[0], hx[1], self.weight_ih, self.weight_hh,
                             self.bias_ih, self.bias_hh)
        if not is_batched:
            return h.squeeze(0), c.squeeze(0)
        return h, c

    def _check_step_args(self, input: Tensor, hx: Tuple[Tensor, Tensor]) -> None:
        # The checks of nn.LSTMCell (made inside its C++ kernel), with the same exception types.
        if input.size(1) != self.input_size:
            raise RuntimeError(f"LSTMCell: input has {input.size(1)} features, expected {self.input_size}")
        for index, state in enumerate(hx):
            if state.size(0) != input.size(0):
                raise RuntimeError(
                    f"LSTMCell: hx[{index}] has batch size {state.size(0)}, the input {input.size(0)}")
            if state.size(1) != self.hidden_size:
                raise RuntimeError(
                    f"LSTMCell: hx[{index}] has {state.size(1)} features, expected hidden_size {self.hidden_size}")
