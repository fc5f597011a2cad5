"""ONNX export of lstm_fused.LSTM and GRU, in torch.onnx.export's two exporters, with no user code.

Neither exporter knows the lstm_fused operators, and the dynamo exporter's own hook for custom
ops (custom_translation_table) is an argument of the export call, which a user swapping
nn.LSTM for lstm_fused.LSTM would have to add. Both exporters already translate torch's own
aten::lstm / aten::gru into ONNX's LSTM and GRU nodes (gate order, weight layout and
linear_before_reset handled there), so while torch.onnx.is_in_onnx_export() is true (set by both
exporters) the modules run their layers through torch's _VF.lstm / _VF.gru with their own
weights instead of through the fused ops: the exported graph is what nn.LSTM / nn.GRU give.

An LSTM with a projection (proj_size > 0) has no ONNX node: ONNX's LSTM cannot project, and
torch's translations of aten::lstm either refuse it (legacy) or emit an LSTM node with the
projection dropped that onnxruntime rejects (dynamo, torch 2.14). In the dynamo exporter it runs
as torch's scan over one step of plain ops, which becomes an ONNX Scan node (any sequence length);
the legacy exporter, which would unroll a Python loop to the traced length, refuses it plainly.

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


def _refuse_projection_in_legacy(module) -> None:
    if module.mode == "LSTM" and module.proj_size > 0 and _legacy_exporter():
        raise NotImplementedError(
            "lstm_fused.LSTM: ONNX export of an LSTM with proj_size > 0 is not supported by the legacy "
            "TorchScript exporter (dynamo=False), as for torch.nn.LSTM: ONNX's LSTM has no projection. "
            "Export with dynamo=True, which writes it as an ONNX Scan loop")


def _common_args(module):
    """has_biases, num_layers, dropout, train, bidirectional of torch's RNN ops."""
    dropout = float(module.dropout) if module.training else 0.0
    return module.bias, module.num_layers, dropout, module.training, module.bidirectional


def run_layers_for_export(module, x: Tensor, hx: Tuple[Tensor, ...]):
    """The export-time stand-in for _FusedRNNBase._run_layers on a padded input: same arguments
    (x time-major [T, B, I], each state [layers * directions, B, *]), same results."""
    _refuse_projection_in_legacy(module)
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
    _refuse_projection_in_legacy(module)


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


# --- LSTM with a projection: one scan per layer and direction (dynamo exporter) -----------------


def _lstm_projected_step(carry: List[Tensor], x_t: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Optional[Tensor],
                         w_hr: Tensor):
    """One step of nn.LSTM with a projection (gates i, f, g, o): carry = [h, c]."""
    h, c = carry
    gates = x_t @ w_ih.t() + h @ w_hh.t()
    if bias is not None:
        gates = gates + bias
    i, f, g, o = gates.chunk(4, dim=-1)
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_next = (torch.sigmoid(o) * torch.tanh(c_next)) @ w_hr.t()
    return [h_next, c_next], h_next.clone()


def _projected_lstm_layers(module, x: Tensor, hx: Tuple[Tensor, ...]):
    dropout = _common_args(module)[2]
    from torch._higher_order_ops.scan import scan

    num_directions = 2 if module.bidirectional else 1
    per_direction = 5 if module.bias else 3
    weights = _flat_weights(module, x.dtype)
    h_finals, c_finals = [], []
    layer_input = x
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(num_directions):
            index = layer * num_directions + direction
            w = weights[index * per_direction : (index + 1) * per_direction]
            bias = w[2] + w[3] if module.bias else None

            def step(carry, x_t, w_ih=w[0], w_hh=w[1], bias=bias, w_hr=w[-1]):
                return _lstm_projected_step(carry, x_t, w_ih, w_hh, bias, w_hr)

            xs = layer_input.flip(0) if direction == 1 else layer_input
            (h_n, c_n), y = scan(step, [hx[0][index], hx[1][index]], xs)
            outputs.append(y.flip(0) if direction == 1 else y)
            h_finals.append(h_n)
            c_finals.append(c_n)
        layer_input = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=2)
        if dropout > 0 and layer < module.num_layers - 1:
            layer_input = torch.nn.functional.dropout(layer_input, p=dropout, training=True)
    return layer_input, (torch.stack(h_finals), torch.stack(c_finals))
