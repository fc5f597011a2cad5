"""ONNX export of lstm_fused.LSTM and GRU, in torch.onnx.export's two exporters, with no user code.

Neither exporter knows the lstm_fused operators, and the dynamo exporter's own hook for custom
ops (custom_translation_table) is an argument of the export call, which a user swapping
nn.LSTM for lstm_fused.LSTM would have to add. So while torch.onnx.is_in_onnx_export() is true
(both exporters set it) the modules' layers do not call the fused ops (modules.py asks
is_exporting()) but write ONNX's own LSTM / GRU nodes, as nn.LSTM / nn.GRU export:
- the legacy (TorchScript) exporter gets nn.LSTM's / nn.GRU's own call of torch's _VF.lstm /
  _VF.gru with the module's weights, which it translates into one ONNX node per layer (gate
  order, weight layout, linear_before_reset handled there), dynamic axes included;
- the dynamo exporter gets the node itself, one per layer, from torch.onnx.ops.symbolic_multi_out
  (_rnn_layer: gates reordered to ONNX's i, o, f, c and z, r, h, biases concatenated [Wb, Rb],
  linear_before_reset=1 for torch's GRU). torch's own translation of aten::lstm / aten::gru there
  fixes the sequence length to the traced one (torch 2.14: nn.LSTM exported with a dynamic
  length fails in onnxruntime on any other); this one keeps the lengths and batch dynamic.

An LSTM with a projection (proj_size > 0) has no ONNX node of its own: ONNX's LSTM cannot project,
and torch's translations of aten::lstm either refuse it (legacy) or emit an LSTM node with the
projection dropped, which onnxruntime rejects (dynamo, torch 2.14). Here each layer becomes a plain
ONNX LSTM node whose recurrent weight has the projection folded in, followed by the projection's
product (_projected_lstm_layer), in both exporters.

A PackedSequence input goes, as in nn.LSTM, through torch's packed RNN op, which the legacy
exporter folds with the surrounding pack and pad into ONNX's LSTM / GRU with sequence_lens. The
dynamo exporter cannot export that (torch.export fails on nn.LSTM's packed input too), so there it
is refused with a plain NotImplementedError before anything reads the lengths.

A program exported with torch.export before the ONNX export holds the fused ops themselves; the
dynamo exporter decomposes them into the same nodes through entries in torch's global
decomposition table (the end of this file).
"""
from typing import List, Optional, Tuple

import torch
import torch._decomp
from torch import Tensor

from . import ops as fused

__all__ = ["is_exporting", "check_packed_export", "run_layers_for_export", "run_packed_for_export"]


def _export_flags():
    """The two flags behind torch.onnx.is_in_onnx_export(), which costs ~3 us a call (it imports
    them on every call: as much as a tenth of an LSTM step's whole module overhead), or None
    where this torch keeps them elsewhere."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        return None
    if not (hasattr(GLOBALS, "in_onnx_export") and hasattr(_flags, "_is_onnx_exporting")):
        return None
    return GLOBALS, _flags


_FLAGS = _export_flags()


def is_exporting() -> bool:
    """Whether a torch.onnx.export (either exporter) is tracing the model now: the value of
    torch.onnx.is_in_onnx_export(), read cheaply. (Under torch.compile the public function: dynamo
    knows it, where it refuses to trace into torch.onnx's modules.)"""
    if _FLAGS is None or torch.compiler.is_compiling():
        return torch.onnx.is_in_onnx_export()
    return _FLAGS[0].in_onnx_export or _FLAGS[1]._is_onnx_exporting


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
    projected = module.mode == "LSTM" and module.proj_size > 0
    if _legacy_exporter() and not projected:
        # Exactly nn.LSTM's / nn.GRU's call, and so their exported graph.
        weights = _flat_weights(module, x.dtype)
        if module.mode == "LSTM":
            output, h_n, c_n = torch._VF.lstm(x, list(hx), weights, *_common_args(module), False)
            return output, (h_n, c_n)
        output, h_n = torch._VF.gru(x, hx[0], weights, *_common_args(module), False)
        return output, (h_n,)
    num_directions = 2 if module.bidirectional else 1
    per_direction = len(module._flat_weights_names) // (module.num_layers * num_directions)
    weights = _flat_weights(module, x.dtype)
    dropout = _common_args(module)[2]
    finals: List[Tuple[Tensor, ...]] = []
    layer_input = x
    for layer in range(module.num_layers):
        first = layer * num_directions
        states = tuple(s[first : first + num_directions] for s in hx)
        layer_weights = [weights[(first + d) * per_direction : (first + d + 1) * per_direction]
                         for d in range(num_directions)]
        run = _projected_lstm_layer if projected else _rnn_layer
        layer_input, layer_finals = run(module.mode, layer_input, states, layer_weights)
        finals.append(layer_finals)
        if dropout > 0 and layer < module.num_layers - 1:
            layer_input = torch.nn.functional.dropout(layer_input, p=dropout, training=True)
    return layer_input, tuple(torch.cat(parts) for parts in zip(*finals))


# ONNX's gate order, as indices into torch's: LSTM i, o, f, c from i, f, g, o; GRU z, r, h from
# r, z, n.
_ONNX_GATES = {"LSTM": (0, 3, 1, 2), "GRU": (1, 0, 2)}


def _onnx_gate_order(mode: str, tensor: Tensor) -> Tensor:
    # Slices rather than chunk: the exporter's optimizer folds Slice of an initializer into a
    # new initializer, not a multi-output Split.
    size = tensor.size(0) // len(_ONNX_GATES[mode])
    return torch.cat([tensor[gate * size : (gate + 1) * size] for gate in _ONNX_GATES[mode]], dim=0)


def _rnn_layer(mode: str, x: Tensor, states: Tuple[Tensor, ...], weights: List[List[Tensor]],
               reverse: bool = False):
    """One layer without projection, in both directions, or in one (the reverse one if `reverse`):
    x [T, B, I], states each [D, B, H], weights per direction [w_ih, w_hh, (b_ih, b_hh)] in
    torch's layout. Returns (y [T, B, D * H], final states each [D, B, H]). In the dynamo exporter
    this writes ONNX's LSTM / GRU node itself (torch.onnx.ops.symbolic_multi_out), with the output
    shapes in terms of x's, where torch's aten::lstm / aten::gru fix the sequence length to the
    traced one (torch 2.14: such a model refuses any other length); in the legacy exporter it is
    torch's op on one layer, which that exporter translates without fixing it (the modules never
    ask it for a lone reverse direction)."""
    bidirectional = len(weights) == 2
    has_bias = len(weights[0]) == 4
    if _legacy_exporter():
        flat = [w for direction in weights for w in direction]
        if mode == "LSTM":
            y, h_n, c_n = torch._VF.lstm(x, list(states), flat, has_bias, 1, 0.0, False, bidirectional, False)
            return y, (h_n, c_n)
        y, h_n = torch._VF.gru(x, states[0], flat, has_bias, 1, 0.0, False, bidirectional, False)
        return y, (h_n,)
    hidden = weights[0][1].size(1)
    W = torch.stack([_onnx_gate_order(mode, w[0]) for w in weights])
    R = torch.stack([_onnx_gate_order(mode, w[1]) for w in weights])
    B = torch.stack([torch.cat([_onnx_gate_order(mode, w[2]), _onnx_gate_order(mode, w[3])]) for w in weights]) \
        if has_bias else None
    steps, batch = x.size(0), x.size(1)
    directions = len(weights)
    direction = "bidirectional" if bidirectional else ("reverse" if reverse else "forward")
    attrs = dict(hidden_size=hidden, direction=direction)
    state_shape = [directions, batch, hidden]
    if mode == "LSTM":
        inputs = [x, W, R, B, None, states[0], states[1]]
    else:
        inputs = [x, W, R, B, None, states[0]]
        attrs["linear_before_reset"] = 1  # torch's GRU applies the reset gate after R h + b_hn
    outputs = torch.onnx.ops.symbolic_multi_out(
        mode, inputs, attrs, dtypes=[x.dtype] * (len(states) + 1),
        shapes=[[steps, directions, batch, hidden]] + [state_shape] * len(states))
    y = outputs[0].transpose(1, 2).reshape(steps, batch, directions * hidden)
    return y, tuple(outputs[1:])


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


def _projected_lstm_layer(mode: str, x: Tensor, states: Tuple[Tensor, ...], weights: List[List[Tensor]],
                          reverse: bool = False):
    """One layer of an LSTM with a projection, as _rnn_layer's arguments (each direction's weights
    end with w_hr; `mode` is "LSTM"); h_0 and the results are projected."""
    directions = len(weights)
    steps = torch.arange(x.size(0), device=x.device)
    first_steps = [steps == 0, steps == x.size(0) - 1]  # where the forward, the reverse direction starts
    starts = first_steps[1:] if reverse else first_steps[:directions]
    # Extra input per direction: its h_0 at its first step, zeros elsewhere.
    extra = [start.to(x.dtype)[:, None, None] * states[0][d] for d, start in enumerate(starts)]
    lstm_input = torch.cat([x, *extra], dim=2)
    lstm_weights = []
    for d, w in enumerate(weights):
        w_ih, w_hh, w_hr = w[0], w[1], w[-1]
        blocks = [w_ih] + [w_hh if other == d else torch.zeros_like(w_hh) for other in range(directions)]
        lstm_weights.append([torch.cat(blocks, dim=1), w_hh @ w_hr, *w[2:-1]])
    unprojected_h0 = torch.zeros_like(states[1])
    u, (u_n, c_n) = _rnn_layer(mode, lstm_input, (unprojected_h0, states[1]), lstm_weights, reverse)
    hidden = weights[0][-1].size(1)  # w_hr is [P, H]
    outputs = [u[:, :, d * hidden : (d + 1) * hidden] @ w[-1].t() for d, w in enumerate(weights)]
    h_n = torch.stack([u_n[d] @ w[-1].t() for d, w in enumerate(weights)])
    return (outputs[0] if directions == 1 else torch.cat(outputs, dim=2)), (h_n, c_n)


# --- An ExportedProgram holding the fused ops ---------------------------------------------------
#
# A model exported with torch.export first (ep = torch.export.export(model, args), then
# torch.onnx.export(ep)) holds the lstm_fused ops themselves: the module ran them while
# torch.export traced it, when no ONNX export was in progress. The dynamo exporter decomposes such a
# program with the ops it cannot translate looked up in torch's global decomposition table
# (torch.onnx's create_onnx_friendly_decomposition_table reads torch._decomp.decomposition_table).
# The entries below write, for each op, the same ONNX LSTM / GRU node as the modules' export path.
# They are put in that table directly rather than with torch._decomp.register_decomposition,
# which would also replace the ops' fake kernels. Outside an ONNX export they decline
# (NotImplemented), so any other user of the table keeps the op as it is.


def _refuse_lengths(mode: str, lengths: Optional[Tensor]) -> None:
    if lengths is not None:
        raise NotImplementedError(
            f"lstm_fused: ONNX export of a {mode} layer with per-row lengths (a PackedSequence input) is not "
            "supported from an ExportedProgram; export a padded input tensor")


def _direction_weights(w_ih, w_hh, b_ih, b_hh, w_hr=None) -> List[Tensor]:
    """[w_ih, w_hh, (b_ih, b_hh), (w_hr)] as _rnn_layer / _projected_lstm_layer take them; a lone
    bias beside a missing one gets zeros for the missing one."""
    weights = [w_ih, w_hh]
    if b_ih is not None or b_hh is not None:
        weights += [b if b is not None else w_ih.new_zeros(w_ih.size(0)) for b in (b_ih, b_hh)]
    if w_hr is not None:
        weights.append(w_hr)
    return weights


def _lstm_direction(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse):
    """lstm_layer_inference's results (y, h_n, c_n) as an ONNX LSTM node."""
    _refuse_lengths("LSTM", lengths)
    run = _projected_lstm_layer if w_hr is not None else _rnn_layer
    y, (h_n, c_n) = run("LSTM", x, (h0[None], c0[None]), [_direction_weights(w_ih, w_hh, b_ih, b_hh, w_hr)],
                        bool(reverse))
    return y, h_n[0], c_n[0]


def _gru_direction(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse):
    """gru_layer_inference's results (y, h_n) as an ONNX GRU node."""
    _refuse_lengths("GRU", lengths)
    y, (h_n,) = _rnn_layer("GRU", x, (h0[None],), [_direction_weights(w_ih, w_hh, b_ih, b_hh)], bool(reverse))
    return y, h_n[0]


def _onnx_only(decomposition, fake):
    """The table entry for an op: its ONNX node while torch.onnx.export's dynamo exporter runs;
    elsewhere the op's fake kernel where fake tensors call it (torch's FakeTensorMode prefers the
    global table to a custom op's fake kernel when sizes are symbolic, as under torch.compile with
    dynamic shapes or torch.export with Dims), and otherwise NotImplemented: no decomposition."""
    def decompose(*args, **kwargs):
        if is_exporting() and not _legacy_exporter():
            return decomposition(*args, **kwargs)
        if torch._subclasses.fake_tensor.is_fake(args[0]):
            return fake(*args, **kwargs)
        return NotImplemented
    decompose.__name__ = decomposition.__name__
    decompose.__doc__ = decomposition.__doc__
    return decompose


def _lstm_layer_inference_onnx(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, lengths=None, reverse=False):
    return _lstm_direction(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)


def _lstm_layer_forward_onnx(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, lengths=None, reverse=False):
    """As the inference op, with an unread reserve of the forward op's size."""
    y, h_n, c_n = _lstm_direction(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)
    reserve = x.new_zeros(fused.lstm_reserve_numel(x.size(0), x.size(1), c0.size(-1), w_hr is not None))
    return y, h_n, c_n, reserve


def _gru_layer_inference_onnx(x, h0, w_ih, w_hh, b_ih=None, b_hh=None, lengths=None, reverse=False):
    return _gru_direction(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse)


def _gru_layer_forward_onnx(x, h0, w_ih, w_hh, b_ih=None, b_hh=None, lengths=None, reverse=False):
    y, h_n = _gru_direction(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse)
    return y, h_n, x.new_zeros(fused.gru_reserve_numel(x.size(0), x.size(1), h0.size(-1)))


def _lstm_layer_bidirectional_onnx(x, state, weights, weights_reverse, lengths=None):
    outputs = []
    for (h0, c0), w, reverse in ((state[:2], weights, False), (state[2:], weights_reverse, True)):
        outputs += _lstm_direction(x, h0, c0, *w, lengths, reverse)
    return outputs


def _gru_layer_bidirectional_onnx(x, state, weights, weights_reverse, lengths=None):
    outputs = []
    for h0, w, reverse in ((state[0], weights, False), (state[1], weights_reverse, True)):
        outputs += _gru_direction(x, h0, *w, lengths, reverse)
    return outputs


def _register_export_decompositions() -> None:
    table = torch._decomp.decomposition_table
    ops = torch.ops.lstm_fused
    for op, decomposition, fake in (
            (ops.lstm_layer_forward.default, _lstm_layer_forward_onnx, fused._lstm_layer_forward_fake),
            (ops.lstm_layer_inference.default, _lstm_layer_inference_onnx, fused._lstm_layer_inference_fake),
            (ops.lstm_layer_bidirectional.default, _lstm_layer_bidirectional_onnx,
             fused._lstm_layer_bidirectional_fake),
            (ops.gru_layer_forward.default, _gru_layer_forward_onnx, fused._gru_layer_forward_fake),
            (ops.gru_layer_inference.default, _gru_layer_inference_onnx, fused._gru_layer_inference_fake),
            (ops.gru_layer_bidirectional.default, _gru_layer_bidirectional_onnx, fused._gru_layer_bidirectional_fake)):
        table.setdefault(op, _onnx_only(decomposition, fake))
        fused._INDUCTOR_FALLBACKS.append(op)  # inductor must not see it as a decomposition (ops.py)


_register_export_decompositions()
