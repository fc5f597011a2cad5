"""nn.Module drop-ins for torch.nn.LSTM, LSTMCell, GRU and GRUCell, built on the fused layer ops.

The sequence modules subclass torch.nn.RNNBase, not nn.LSTM / nn.GRU: they inherit the parameter
bookkeeping (names, shapes, order, initialisation, state_dict, _flat_weights) and the argument
checks, while torch.compile can trace them (Dynamo graph-breaks on instances of nn.LSTM, nn.GRU
and their subclasses). Layers, directions, dropout, batch_first, packed and unbatched input are
composed here; each (layer, direction) is one call of a layer op.
"""
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import onnx as onnx_export
from .ops import gru_layer, lstm_layer, side_by_side_possible


__all__ = ["LSTM", "LSTMCell", "GRU", "GRUCell"]


States = Tuple[Tensor, ...]  # (h, c) for an LSTM, (h,) for a GRU; each [layers * directions, B, *]


def _ask_onednn_half_types() -> Tuple[torch.dtype, ...]:
    """The half types in which oneDNN runs an RNN on this CPU, asked as ATen's use_mkldnn asks
    (mkldnn_bf16_device_check / mkldnn_fp16_device_check, which these ops expose; on x86 ideep
    answers by oneDNN's CPU ISA): both False on the AVX2-only EPYC of issue 18, both True on the
    AVX-512 development Xeon."""
    if not _ONEDNN_BUILT:
        return ()
    checks = ((torch.bfloat16, torch.ops.mkldnn._is_mkldnn_bf16_supported),
              (torch.float16, torch.ops.mkldnn._is_mkldnn_fp16_supported))
    return tuple(dtype for dtype, supported in checks if supported())


# Asked once: neither the build nor the CPU changes while the process runs, and torch.compile
# cannot trace the questions, so the modules read these constants.
_ONEDNN_BUILT = torch.backends.mkldnn.is_available()
_ONEDNN_HALF_TYPES = _ask_onednn_half_types()


def _cpu_lstm_runs_onednn(x: Tensor) -> bool:
    """Whether nn.LSTM without projection, on a padded CPU input x, runs oneDNN's RNN rather than
    its composite cell, as ATen's use_mkldnn decides (aten/src/ATen/native/RNN.cpp): oneDNN built
    and enabled, a non-empty input, of float32, of bfloat16 where oneDNN has it on this CPU, or of
    float16 outside grad mode where oneDNN has that. (A packed input or a projection always takes
    the composite cell.)"""
    if not _ONEDNN_BUILT or x.numel() == 0:
        return False
    # torch.backends.mkldnn.flags(enabled=False) switches oneDNN off; dynamo cannot read the flag,
    # and torch.nn's LSTM, which it cannot trace either, runs eagerly and reads it itself.
    if not torch.compiler.is_compiling() and not torch.backends.mkldnn.enabled:
        return False
    if x.dtype == torch.float32:
        return True
    if x.dtype == torch.bfloat16:
        return torch.bfloat16 in _ONEDNN_HALF_TYPES
    if x.dtype == torch.float16:
        return not torch.is_grad_enabled() and torch.float16 in _ONEDNN_HALF_TYPES
    return False


def _composite_cpu_autocast_dtype(state: Optional[Tensor], x: Tensor) -> torch.dtype:
    """The dtype of a torch.nn composite CPU cell's pointwise results under autocast (the cells,
    nn.GRU, and nn.LSTM with a projection or a packed input): autocast runs the products in its
    dtype, and the update promotes that with the state's dtype (c for an LSTM, h for a GRU), or
    the input's when no state is given."""
    return torch.promote_types(torch.get_autocast_dtype("cpu"), x.dtype if state is None else state.dtype)


def _two_states(hx, op: str, batched: bool, too_few=RuntimeError) -> States:
    """An LSTM's (h, c), refused as torch.nn refuses it: TypeError for anything but a tuple or
    list (a single tensor would otherwise be split along its first dimension), RuntimeError for
    more than two states, and `too_few` for fewer (torch.nn's modules index hx[1] themselves in
    some paths, hence IndexError there). For an unbatched input torch.nn's modules take hx[0] and
    hx[1] of whatever they are given, and so does this."""
    if not batched:
        return hx[0], hx[1]
    if not isinstance(hx, (tuple, list)):
        raise TypeError(f"{op}: hx must be a tuple (h, c) of tensors, got {type(hx).__name__}")
    if len(hx) != 2:
        raise (RuntimeError if len(hx) > 2 else too_few)(f"{op} expects two hidden states, got {len(hx)}")
    return tuple(hx)


class _WithCurrentWeights:
    """A module as torch.nn's RNN checks see it, with _flat_weights read from its parameters now."""

    def __init__(self, module: nn.RNNBase):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    @property
    def _flat_weights(self) -> List[Tensor]:
        return [getattr(self._module, name) for name in self._module._flat_weights_names]


class _FusedRNNBase(nn.RNNBase):
    """What the LSTM and GRU modules share: input forms, layers, directions and dropout.
    A subclass says how to run one layer and how its state looks."""

    def check_input(self, input: Tensor, batch_sizes: Optional[Tensor]) -> None:
        """torch.nn's own input check, so its exceptions and messages word for word, run with the
        weights the module holds now: torch.nn reads its _flat_weights cache, which forward no
        longer refreshes (_layer_weights), so functional_call with weights of another dtype works
        as it does on nn.LSTM."""
        nn.RNNBase.check_input(_WithCurrentWeights(self), input, batch_sizes)

    def flatten_parameters(self) -> None:
        """Does nothing: the fused kernels read the weights where they are (torch.nn flattens
        them into one buffer for cuDNN)."""

    # --- what a cell type defines -------------------------------------------------------------
    def _zero_state(self, batch: int, like: Tensor) -> States:
        raise NotImplementedError

    def _run_layer(self, x: Tensor, state: States, weights: List[Tensor], lengths: Optional[Tensor],
                   reverse: bool) -> Tuple[Tensor, States]:
        raise NotImplementedError

    def _op_weights(self, weights: List[Tensor]) -> List[Optional[Tensor]]:
        """A layer's weights as its op takes them, None for those the module does not have."""
        raise NotImplementedError

    # The op running both directions of a layer (csrc/directions.cpp): (x, states of both
    # directions, op weights of each, lengths) -> the outputs and final states of each.
    _bidirectional_op = None

    def _as_states(self, hx, batched: bool = True) -> States:
        raise NotImplementedError

    def _from_states(self, states: States):
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------------------
    def _layer_weights(self, layer: int, direction: int) -> List[Tensor]:
        """The layer's weights as the module holds them now, read by name: this follows
        functional_call, parametrizations and torch.export's lifted parameters without
        re-assigning torch.nn's _flat_weights cache in forward (which export warns about)."""
        num_directions = 2 if self.bidirectional else 1
        per_layer = len(self._flat_weights_names) // (self.num_layers * num_directions)
        start = (layer * num_directions + direction) * per_layer
        return [getattr(self, name) for name in self._flat_weights_names[start : start + per_layer]]

    def _run_layers(self, x: Tensor, hx: States, lengths: Optional[Tensor]) -> Tuple[Tensor, States]:
        """x is time-major [T, B, I]; each state tensor is [layers * directions, B, *]. Runs in
        x's dtype (the weights are cast to it under autocast)."""
        if onnx_export.is_exporting():  # ONNX's own LSTM / GRU nodes instead of the fused ops
            return onnx_export.run_layers_for_export(self, x, hx)
        num_directions = 2 if self.bidirectional else 1
        final: List[States] = []
        layer_input = x
        for layer in range(self.num_layers):
            weights = [[w.to(x.dtype) for w in self._layer_weights(layer, direction)]
                       for direction in range(num_directions)]
            states = [tuple(s[layer * num_directions + direction] for s in hx) for direction in range(num_directions)]
            if num_directions == 2 and side_by_side_possible(layer_input):
                results = self._bidirectional_op(layer_input, [*states[0], *states[1]], self._op_weights(weights[0]),
                                                 self._op_weights(weights[1]), lengths)
                half = len(results) // 2
                runs = [(part[0], tuple(part[1:])) for part in (results[:half], results[half:])]
            else:
                runs = [self._run_layer(layer_input, states[direction], weights[direction], lengths, direction == 1)
                        for direction in range(num_directions)]
            outputs = [y for y, _ in runs]
            final.extend(state for _, state in runs)
            layer_input = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, p=self.dropout, training=True)
        return layer_input, tuple(torch.stack(parts) for parts in zip(*final))

    def _autocast_dtypes(self, x: Tensor, hx, packed: bool):
        """Under autocast, following torch.nn: (dtype to compute in, dtype of the output, dtypes
        of the final states), or None when autocast does not apply. On CUDA the RNNs run in the
        autocast dtype. On the CPU nn.LSTM without projection on a padded input runs oneDNN's RNN
        where ATen chooses it (_cpu_lstm_runs_onednn: that depends on the CPU for a half-type
        input), whose mkldnn_rnn_layer is on CPU autocast's list: all three results come in the
        autocast dtype. Where oneDNN then has no primitive for that dtype on this CPU (bfloat16 on
        an AVX2 EPYC, float16 with gradients even on an AVX-512 FP16 Xeon), nn.LSTM raises "could not
        create a primitive descriptor"; ours computes, and returns what that path returns where
        oneDNN has the primitive. Everything else (nn.GRU, a projection, a packed input, an input
        oneDNN refuses) runs a composite cell (_composite_cpu_autocast_dtype): that dtype for the
        cell state, and for the output too unless a projection (another product) makes it. Our
        CPU kernels compute in the weights' dtype."""
        device_type = x.device.type
        if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
            return None
        low = torch.get_autocast_dtype(device_type)
        if device_type == "cuda":
            return low, low, (low, low)
        compute = getattr(self, self._flat_weights_names[0]).dtype
        if self.mode == "LSTM" and self.proj_size == 0 and not packed and _cpu_lstm_runs_onednn(x):
            return compute, low, (low, low)
        if self.mode == "LSTM":
            state = hx[1] if isinstance(hx, (tuple, list)) and len(hx) == 2 else None
        else:
            state = hx if isinstance(hx, Tensor) else None
        promoted = _composite_cpu_autocast_dtype(state, x)
        if self.mode == "LSTM" and self.proj_size > 0:
            return compute, low, (low, promoted)
        return compute, promoted, (promoted, promoted)

    def forward(self, input, hx=None):
        packed = isinstance(input, PackedSequence)
        data = input.data if packed else input
        dtypes = self._autocast_dtypes(data, hx, packed)
        if dtypes is None:
            return self._forward(input, hx)
        compute, result, state_results = dtypes
        if packed:
            input = PackedSequence(input.data.to(compute), input.batch_sizes, input.sorted_indices,
                                   input.unsorted_indices)
        else:
            input = input.to(compute)
        if hx is not None:
            hx = tuple(h.to(compute) for h in hx) if isinstance(hx, (tuple, list)) else hx.to(compute)
        with torch.autocast(data.device.type, enabled=False):
            output, state = self._forward(input, hx)
        state = (tuple(s.to(dtype) for s, dtype in zip(state, state_results)) if isinstance(state, tuple)
                 else state.to(state_results[0]))
        if isinstance(output, PackedSequence):
            return PackedSequence(output.data.to(result), output.batch_sizes, output.sorted_indices,
                                  output.unsorted_indices), state
        return output.to(result), state

    def _forward(self, input, hx):
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx)

        if input.dim() not in (2, 3):
            raise ValueError(f"{self.mode}: input must be 2-D (unbatched) or 3-D (batched), got {input.dim()}-D")
        is_batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not is_batched:
            input = input.unsqueeze(batch_dim)
        if hx is None:
            states = self._zero_state(input.size(batch_dim), input)
        else:
            states = self._as_states(hx, is_batched)
            state_dim = 3 if is_batched else 2
            if any(s.dim() != state_dim for s in states):
                raise RuntimeError(
                    f"{self.mode}: for {'batched 3-D' if is_batched else 'unbatched 2-D'} input the "
                    f"state must be {state_dim}-D, got {[s.dim() for s in states]}-D")
            if not is_batched:
                states = tuple(s.unsqueeze(1) for s in states)
        self.check_forward_args(input, self._from_states(states), None)
        if input.size(1 if self.batch_first else 0) == 0:
            raise RuntimeError(f"{self.mode}: the input sequence is empty (length 0); torch.nn refuses it too")

        x = input.transpose(0, 1) if self.batch_first else input
        if self.batch_first and not torch.compiler.is_compiling() and x.is_inference() and torch.is_grad_enabled() \
                and not torch.is_inference_mode_enabled():
            # torch.nn copies a batch-first input to time-major memory; the copy is a normal
            # tensor, which autograd may save, where the transposed view of an inference tensor
            # is refused. Only then: otherwise the kernels read the view as it is. (dynamo cannot
            # trace is_inference: under torch.compile such an input is still refused.)
            x = x.contiguous()
        output, states = self._run_layers(x, states, None)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(batch_dim)
            states = tuple(s.squeeze(1) for s in states)
        return output, self._from_states(states)

    def _forward_packed(self, packed: PackedSequence, hx):
        data, batch_sizes, sorted_indices, unsorted_indices = packed
        exporting = onnx_export.is_exporting()
        if exporting:  # before anything reads the lengths, which the dynamo exporter cannot do
            onnx_export.check_packed_export(self)
        if hx is None:
            states = self._zero_state(int(batch_sizes[0]), data)
        else:
            # The caller's state follows the caller's batch order; the packed rows are sorted.
            states = self._as_states(self.permute_hidden(hx, sorted_indices))
        self.check_forward_args(data, self._from_states(states), batch_sizes)
        if exporting:
            output_data, states = onnx_export.run_packed_for_export(self, data, batch_sizes, states)
        else:
            x, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
            output, states = self._run_layers(x, states, lengths)
            output_data = pack_padded_sequence(output, lengths).data
        output_packed = PackedSequence(output_data, batch_sizes, sorted_indices, unsorted_indices)
        return output_packed, self.permute_hidden(self._from_states(states), unsorted_indices)

    def _state_zeros(self, batch: int, size: int, like: Tensor) -> Tensor:
        num_directions = 2 if self.bidirectional else 1
        return torch.zeros(self.num_layers * num_directions, batch, size, dtype=like.dtype, device=like.device)


class LSTM(_FusedRNNBase):
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

    def _zero_state(self, batch: int, like: Tensor) -> States:
        real_hidden_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        return self._state_zeros(batch, real_hidden_size, like), self._state_zeros(batch, self.hidden_size, like)

    def _as_states(self, hx, batched: bool = True) -> States:
        return _two_states(hx, "lstm", batched, too_few=IndexError)

    def _from_states(self, states: States):
        return states[0], states[1]

    _bidirectional_op = torch.ops.lstm_fused.lstm_layer_bidirectional

    def _op_weights(self, weights):
        b_ih, b_hh = (weights[2], weights[3]) if self.bias else (None, None)
        return [weights[0], weights[1], b_ih, b_hh, weights[-1] if self.proj_size > 0 else None]

    def _run_layer(self, x, state, weights, lengths, reverse):
        y, h, c = lstm_layer(x, state[0], state[1], *self._op_weights(weights), lengths, reverse)
        return y, (h, c)


class GRU(_FusedRNNBase):
    """Drop-in replacement for :class:`torch.nn.GRU` running fused kernels.

    Same constructor, parameters, ``state_dict`` and call signature as nn.GRU::

        gru = lstm_fused.GRU(input_size=8, hidden_size=32, batch_first=True)
        output, h_n = gru(x)
    """

    def __init__(self, *args, **kwargs):
        # nn.GRU makes this check itself (RNNBase lets a GRU take a proj_size).
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)

    def _zero_state(self, batch: int, like: Tensor) -> States:
        return (self._state_zeros(batch, self.hidden_size, like),)

    def _as_states(self, hx, batched: bool = True) -> States:
        return (hx,)

    def _from_states(self, states: States):
        return states[0]

    _bidirectional_op = torch.ops.lstm_fused.gru_layer_bidirectional

    def _op_weights(self, weights):
        b_ih, b_hh = (weights[2], weights[3]) if self.bias else (None, None)
        return [weights[0], weights[1], b_ih, b_hh]

    def _run_layer(self, x, state, weights, lengths, reverse):
        y, h = gru_layer(x, state[0], *self._op_weights(weights), lengths, reverse)
        return y, (h,)


# --- cells ---------------------------------------------------------------------------------------
# A decoder calls a cell once per step, at batch sizes where the kernels take a few microseconds:
# the cells' forward first tries a short path that reads the parameters once, checks
# only what the op itself does not, and calls the op directly; whatever it does not take (and
# every refused call) goes through the full path, which raises torch.nn's own errors.

_lstm_step_inference = torch.ops.lstm_fused.lstm_layer_inference.default
_lstm_step_forward = torch.ops.lstm_fused.lstm_layer_forward.default
_gru_step_inference = torch.ops.lstm_fused.gru_layer_inference.default
_gru_step_forward = torch.ops.lstm_fused.gru_layer_forward.default

# The inference ops' autograd kernel is Python (ops.py: it only refuses a backward) and costs
# more than a small step's kernels; a step that needs no gradient dispatches below it.
_below_autograd = torch._C._AutoDispatchBelowAutograd
_peek_interpreter_stack = torch._C._functorch.peek_interpreter_stack
_tracing_state = torch._C._get_tracing_state
_autocast_on = getattr(torch._C, "_is_any_autocast_enabled", None) or _any_autocast_enabled
_is_grad_enabled = torch.is_grad_enabled
# Half types on the CPU compute in float32 (ops.py's upcast): the full path.
_FAST_DTYPES = (torch.float32, torch.float64)


_compiler = torch.compiler


def _fast_path_open(input: Tensor) -> bool:
    """Whether the short path may take this call: a batched plain tensor in a dtype the CPU
    kernels compute in, and a context that leaves the step as plain as it is: not traced (dynamo
    traces the full path; the tracer records it), no torch.func transform, no forward-mode AD
    level and no autocast. Each test is a flag or attribute read."""
    return (type(input) is Tensor and not _compiler.is_compiling() and _peek_interpreter_stack() is None
            and forward_ad._current_level < 0 and not _autocast_on() and _tracing_state() is None
            and input.dim() == 2 and input.dtype in _FAST_DTYPES)


class _FusedCellBase(nn.RNNCellBase):
    """What LSTMCell and GRUCell share: 1-D / 2-D input and state, and torch.nn's checks (those
    the torch.nn cells make in Python and inside their C++ kernels), with torch.nn's errors."""

    _torch_class = nn.RNNCellBase  # the torch.nn cell whose forward raises the errors

    def _torch_error(self, input: Tensor, hx, ours: Exception):
        """Raises torch.nn's error for a call that the full path refuses, from torch.nn's own
        checks: its cell's forward runs on this module's parameters (it raises before computing
        anything); where torch.nn takes the call after all, `ours` is raised."""
        try:
            with torch.no_grad():
                self._torch_class.forward(self, input, hx)
        except Exception as theirs:
            raise theirs from None
        raise ours

    def _weights(self, x: Tensor) -> List[Optional[Tensor]]:
        """weight_ih, weight_hh, bias_ih, bias_hh; cast to x's dtype only under CUDA autocast
        (where _prepare cast x), so that any other dtype mismatch is refused as torch.nn refuses it.
        (A cell runs this every step: each attribute is read once.)"""
        weights = [self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh]
        if weights[0].dtype != x.dtype and x.is_cuda and torch.is_autocast_enabled("cuda"):
            weights = [w if w is None else w.to(x.dtype) for w in weights]
        return weights

    def _prepare(self, input: Tensor, hx: Optional[Tuple[Tensor, ...]], original_hx):
        """Checks and shapes one step's input and state as the torch.nn cells do (a refused call
        raises torch.nn's error: _torch_error with the caller's `original_hx`); returns (input as
        [1, B, I], the states as [B, H], whether the input was batched, and the dtype of the
        results under CPU autocast, else None)."""
        name = type(self).__name__
        dim = input.dim()
        if dim != 2 and dim != 1:
            self._torch_error(input, original_hx,
                              ValueError(f"{name}: input must be 1-D (unbatched) or 2-D (batched), got {dim}-D"))
        if hx is not None:
            for index, state in enumerate(hx):
                if state.dim() not in (1, 2):
                    self._torch_error(input, original_hx,
                                      ValueError(f"{name}: state {index} must be 1-D or 2-D, got {state.dim()}-D"))
        is_batched = dim == 2
        original_input = input
        if not is_batched:
            input = input.unsqueeze(0)
        result = None
        # Under CUDA autocast torch.nn's cells run in the autocast dtype.
        if input.is_cuda and torch.is_autocast_enabled("cuda"):
            low = torch.get_autocast_dtype("cuda")
            input = input.to(low)
            hx = None if hx is None else tuple(s.to(low) for s in hx)
        # On the CPU torch.nn's cells are composite: the step runs in the weights' dtype and its
        # results take that of the composite cell.
        elif input.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            compute = self.weight_ih.dtype
            result = _composite_cpu_autocast_dtype(None if hx is None else hx[-1], input)
            input = input.to(compute)
            hx = None if hx is None else tuple(s.to(compute) for s in hx)
        batch, features = input.shape
        if hx is None:
            hx = tuple(input.new_zeros(batch, self.hidden_size) for _ in range(self._state_count))
        elif not is_batched:
            hx = tuple(s.unsqueeze(0) for s in hx)
        if features != self.input_size:
            self._torch_error(original_input, original_hx,
                              RuntimeError(f"{name}: input has {features} features, expected {self.input_size}"))
        for index, state in enumerate(hx):
            if state.dim() != 2:  # a batched input with a 1-D state, or the other way round
                self._torch_error(original_input, original_hx, RuntimeError(
                    f"{name}: state {index} is {state.dim() - (not is_batched)}-D, the input {dim}-D"))
            state_batch, state_features = state.shape
            if state_batch != batch:
                self._torch_error(original_input, original_hx, RuntimeError(
                    f"{name}: state {index} has batch size {state_batch}, the input {batch}"))
            if state_features != self.hidden_size:
                self._torch_error(original_input, original_hx, RuntimeError(
                    f"{name}: state {index} has {state_features} features, expected hidden_size {self.hidden_size}"))
        # The op refuses other dtypes and devices too, with its own words; torch.nn's first.
        weight = self.weight_ih
        cast_later = input.is_cuda and torch.is_autocast_enabled("cuda")  # _weights casts the weights
        for tensor in (input, *hx):
            if tensor.device != weight.device or (tensor.dtype != weight.dtype and not cast_later):
                self._torch_error(original_input, original_hx, RuntimeError(
                    f"{name}: the input and state must have the weights' dtype and device ({weight.dtype} on "
                    f"{weight.device}), got {tensor.dtype} on {tensor.device}"))
        return input.unsqueeze(0), hx, is_batched, result


class LSTMCell(_FusedCellBase):
    """Drop-in replacement for :class:`torch.nn.LSTMCell`: one step of the fused layer op.

    Same constructor, parameters (``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``) and call::

        cell = lstm_fused.LSTMCell(10, 20)
        h, c = cell(x_t, (h, c))    # x_t: [batch, 10] or [10]
    """

    _state_count = 2
    _torch_class = nn.LSTMCell

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        # The short path (module comment above): a batched step with hx None or (h, c). The op
        # checks the shapes, dtypes and devices itself; whatever it refuses goes to the full
        # path, which raises torch.nn's error. functional_call swaps the parameters in
        # _parameters; a parametrization takes them out of it (KeyError: the full path).
        if _fast_path_open(input) and (hx is None or ((type(hx) is tuple or type(hx) is list) and len(hx) == 2)):
            try:
                params = self._parameters
                w_ih, w_hh, b_ih, b_hh = params["weight_ih"], params["weight_hh"], params["bias_ih"], params["bias_hh"]
                if hx is None:
                    h0 = c0 = input.new_zeros(input.shape[0], self.hidden_size)  # the op writes no input
                else:
                    h0, c0 = hx
                if _is_grad_enabled() and (input.requires_grad or h0.requires_grad or c0.requires_grad
                                           or w_ih.requires_grad or w_hh.requires_grad
                                           or (b_ih is not None and (b_ih.requires_grad or b_hh.requires_grad))):
                    _, h, c, _ = _lstm_step_forward(input.unsqueeze(0), h0, c0, w_ih, w_hh, b_ih, b_hh, None, None,
                                                    False)
                else:
                    with _below_autograd():
                        _, h, c = _lstm_step_inference(input.unsqueeze(0), h0, c0, w_ih, w_hh, b_ih, b_hh, None,
                                                       None, False)
                return h, c
            except (RuntimeError, TypeError, AttributeError, KeyError):
                pass
        return self._full_step(input, hx)

    def _full_step(self, input: Tensor, hx) -> Tuple[Tensor, Tensor]:
        original_hx = hx
        if hx is not None and input.dim() in (1, 2):  # else _prepare raises torch.nn's ValueError first
            try:
                hx = _two_states(hx, "lstm_cell", input.dim() != 1)
            except (TypeError, RuntimeError, IndexError) as ours:
                self._torch_error(input, original_hx, ours)
        x, (h0, c0), is_batched, result = self._prepare(input, hx, original_hx)
        if onnx_export.is_exporting():  # torch.nn's own cell, which both exporters translate
            h, c = torch._VF.lstm_cell(x[0], (h0, c0), *self._weights(x))
        else:
            _, h, c = lstm_layer(x, h0, c0, *self._weights(x))
        if result is not None:
            h, c = h.to(result), c.to(result)
        return (h, c) if is_batched else (h.squeeze(0), c.squeeze(0))


class GRUCell(_FusedCellBase):
    """Drop-in replacement for :class:`torch.nn.GRUCell`: one step of the fused GRU layer op.

        cell = lstm_fused.GRUCell(10, 20)
        h = cell(x_t, h)    # x_t: [batch, 10] or [10]
    """

    _state_count = 1
    _torch_class = nn.GRUCell

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, num_chunks=3, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        # The short path, as LSTMCell's: a batched step with hx None or a tensor.
        if _fast_path_open(input):
            try:
                params = self._parameters
                w_ih, w_hh, b_ih, b_hh = params["weight_ih"], params["weight_hh"], params["bias_ih"], params["bias_hh"]
                h0 = input.new_zeros(input.shape[0], self.hidden_size) if hx is None else hx
                if _is_grad_enabled() and (input.requires_grad or h0.requires_grad or w_ih.requires_grad
                                           or w_hh.requires_grad
                                           or (b_ih is not None and (b_ih.requires_grad or b_hh.requires_grad))):
                    _, h, _ = _gru_step_forward(input.unsqueeze(0), h0, w_ih, w_hh, b_ih, b_hh, None, False)
                else:
                    with _below_autograd():
                        _, h = _gru_step_inference(input.unsqueeze(0), h0, w_ih, w_hh, b_ih, b_hh, None, False)
                return h
            except (RuntimeError, TypeError, AttributeError, KeyError):
                pass
        return self._full_step(input, hx)

    def _full_step(self, input: Tensor, hx) -> Tensor:
        x, (h0,), is_batched, result = self._prepare(input, None if hx is None else (hx,), hx)
        if onnx_export.is_exporting():  # torch.nn's own cell, which both exporters translate
            h = torch._VF.gru_cell(x[0], h0, *self._weights(x))
        else:
            _, h = gru_layer(x, h0, *self._weights(x))
        if result is not None:
            h = h.to(result)
        return h if is_batched else h.squeeze(0)
