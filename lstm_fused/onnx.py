"""ONNX export of lstm_fused.LSTM and GRU, in torch.onnx.export's two exporters, with no user code.

Neither exporter knows the lstm_fused operators, and the dynamo exporter's own hook for custom
ops (custom_translation_table) is an argument of the export call, which a user swapping
nn.LSTM for lstm_fused.LSTM would have to add. Both exporters already translate torch's own
aten::lstm / aten::gru into ONNX's LSTM and GRU nodes (gate order, weight layout and
linear_before_reset handled there), so while torch.onnx.is_in_onnx_export() is true (set by both
exporters) the modules run their layers through torch's _VF.lstm / _VF.gru with their own
weights instead of through the fused ops: the exported graph is what nn.LSTM / nn.GRU give.

An LSTM with a projection (proj_size > 0) has no ONNX node of its own: ONNX's LSTM cannot project,
and torch's translations of aten::lstm either refuse it (legacy) or emit an LSTM node with the
projection dropped, which onnxruntime rejects (dynamo, torch 2.14). Here each layer becomes a plain
ONNX LSTM node whose recurrent weight has the projection folded in, followed by the projection's
product (_projected_lstm_layers), in both exporters.

A PackedSequence input goes, as in nn.LSTM, through torch's packed RNN op, which the legacy
exporter folds with the surrounding pack and pad into ONNX's LSTM / GRU with sequence_lens. The
dynamo exporter cannot export that (torch.export fails on nn.LSTM's packed input too), so there it
is refused with a plain NotImplementedError before anything reads the lengths.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["is_exporting", "check_packed_export", "run_layers_for_export", "run_packed_for_export"]


def is_exporting() -> bool:
    """Whether a torch.onnx.export (either exporter) is tracing the model now."""
    return torch.onnx.is_in_onnx_export()


def _legacy_exporter() -> bool:
    """The TorchScript-based exporter traces with torch.jit's tracer; the dynamo one does not."""
    return torch.jit.is_tracing()


def _flat_weights(module, dtype: torch.dtype) -> List[Tensor]:
    """All layers' weights in torch.nn's _flat_weights order, read by name (as the fused path
    reads them: functional_call, parametrizations and export's lifted parameters are followed)."""
    weights = [getattr(module, name) for name in module._flat_weights_names]
    return [w if w.dtype == dtype else w.to(dtype) for w in weights]


def _refuse_packed_projection(module) -> None:
    if module.mode == "LSTM" and module.proj_size > 0:
        raise NotImplementedError(
            "lstm_fused.LSTM: ONNX export of a packed input of an LSTM with proj_size > 0 is not supported "
            "(torch.nn.LSTM with a projection cannot be exported by the legacy exporter at all); export a padded "
            "input tensor")


def _common_args(module):
    """has_biases, num_layers, dropout, train, bidirectional of torch's RNN ops."""
    dropout = float(module.dropout) if module.training else 0.0
    return module.bias, module.num_layers, dropout, module.training, module.bidirectional


def run_layers_for_export(module, x: Tensor, hx: Tuple[Tensor, ...]):
    """The export-time stand-in for _FusedRNNBase._run_layers on a padded input: same arguments
    (x time-major [T, B, I], each state [layers * directions, B, *]), same results."""
    if module.mode == "LSTM" and module.proj_size > 0:
        return _projected_lstm_layers(module, x, hx)
    weights = _flat_weights(module, x.dtype)
    if module.mode == "LSTM":
        output, h_n, c_n = torch._VF.lstm(x, list(hx), weights, *_common_args(module), False)
        return output, (h_n, c_n)
    output, h_n = torch._VF.gru(x, hx[0], weights, *_common_args(module), False)
    return output, (h_n,)


def check_packed_export(module) -> None:
    """Refuses a PackedSequence input where it cannot be exported: in the dynamo exporter (which
    cannot export nn.LSTM's packed op either: torch.export fails on the data-dependent batch
    sizes) and for an LSTM with a projection in the legacy exporter."""
    if not _legacy_exporter():
        raise NotImplementedError(
            f"lstm_fused.{module.mode}: ONNX export of a PackedSequence input is not supported by the dynamo "
            "exporter (torch.nn's RNNs cannot be exported with one either); export a padded input tensor "
            "(and mask the padded steps after the model), or use the legacy exporter (dynamo=False), which "
            f"writes the lengths into ONNX's {module.mode} node")
    _refuse_packed_projection(module)


def run_packed_for_export(module, data: Tensor, batch_sizes: Tensor, hx: Tuple[Tensor, ...]):
    """A PackedSequence's rows (data, batch_sizes, sorted order) through torch's packed RNN ops,
    as nn.LSTM / nn.GRU run them: the legacy exporter folds pack, RNN and pad into ONNX's LSTM /
    GRU with sequence_lens. Returns (output rows, final states); check_packed_export has passed."""
    weights = _flat_weights(module, data.dtype)
    if module.mode == "LSTM":
        output, h_n, c_n = torch._VF.lstm(data, batch_sizes, list(hx), weights, *_common_args(module))
        return output, (h_n, c_n)
    output, h_n = torch._VF.gru(data, batch_sizes, hx[0], weights, *_common_args(module))
    return output, (h_n,)


# --- LSTM with a projection as an ONNX LSTM node per layer ------------------------------------
#
# nn.LSTM with a projection feeds back h_t = W_hr (o * tanh(c_t)) through W_hh, which is the
# unprojected output u_t fed back through R = W_hh W_hr: a plain LSTM of hidden size H with that
# recurrent weight computes u_t, and y_t = W_hr u_t. Only the first step differs: its recurrent
# term is W_hh h_0 with the projected h_0 given, which an unprojected initial state cannot carry
# in general. That term is fed in as input instead: each direction's h_0 becomes extra input
# features, nonzero only at the step the direction starts from, read through W_hh in that
# direction's input weight (zeros in the other's), with the unprojected initial state zero.


def _projected_lstm_layers(module, x: Tensor, hx: Tuple[Tensor, ...]):
    num_directions = 2 if module.bidirectional else 1
    per_direction = 5 if module.bias else 3
    weights = _flat_weights(module, x.dtype)
    steps = torch.arange(x.size(0), device=x.device)
    starts = [(steps == 0), (steps == x.size(0) - 1)][:num_directions]
    h_finals, c_finals = [], []
    layer_input = x
    dropout, train = _common_args(module)[2:4]
    for layer in range(module.num_layers):
        first = layer * num_directions
        # Extra input per direction: its h_0 at its first step, zeros elsewhere.
        extra = [start.to(x.dtype)[:, None, None] * hx[0][first + d] for d, start in enumerate(starts)]
        lstm_input = torch.cat([layer_input, *extra], dim=2)
        lstm_weights, projections = [], []
        for d in range(num_directions):
            w = weights[(first + d) * per_direction : (first + d + 1) * per_direction]
            w_ih, w_hh, w_hr = w[0], w[1], w[-1]
            blocks = [w_ih] + [w_hh if other == d else torch.zeros_like(w_hh) for other in range(num_directions)]
            lstm_weights += [torch.cat(blocks, dim=1), w_hh @ w_hr, *w[2:-1]]
            projections.append(w_hr)
        state = [torch.zeros_like(hx[1][first : first + num_directions]), hx[1][first : first + num_directions]]
        unprojected, u_n, c_n = torch._VF.lstm(lstm_input, state, lstm_weights, module.bias, 1, 0.0, train,
                                               module.bidirectional, False)
        hidden = module.hidden_size
        outputs = [unprojected[:, :, d * hidden : (d + 1) * hidden] @ projections[d].t() for d in range(num_directions)]
        h_finals += [u_n[d] @ projections[d].t() for d in range(num_directions)]
        c_finals.append(c_n)
        layer_input = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=2)
        if dropout > 0 and layer < module.num_layers - 1:
            layer_input = torch.nn.functional.dropout(layer_input, p=dropout, training=True)
    return layer_input, (torch.stack(h_finals), torch.cat(c_finals))
