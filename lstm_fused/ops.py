"""The Python face of the lstm_fused operators: fake (meta) kernels for tracing.

The operators themselves are defined in csrc/ops.cpp and implemented per device in csrc/cpu and
csrc/cuda; their autograd is C++ (csrc/autograd.cpp: a Python autograd function cost an LSTMCell
step more than its kernels). The fake kernels here are what lets torch.compile trace a model
through the ops without a graph break.
"""
import os
import sys
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd import forward_ad

_forward = torch.ops.lstm_fused.lstm_layer_forward
_inference = torch.ops.lstm_fused.lstm_layer_inference


_DIFFERENTIATING_TRANSFORMS = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)


def _needs_grad(*tensors) -> bool:
    """Whether the forward op (with its autograd) must run rather than the inference op: some
    argument requires grad, forward-mode AD is active (a dual level is open; grad mode does not
    switch it off, and csrc/autograd.cpp gives tangents their own path), or a torch.func grad or
    jvp transform is (inside an inner vmap the batched tensors say they need no grad)."""
    if forward_ad._current_level >= 0:
        return True
    if torch._C._functorch.peek_interpreter_stack() is not None:
        if torch.compiler.is_compiling():  # dynamo cannot trace get_interpreter_stack
            return True
        if any(interpreter.key() in _DIFFERENTIATING_TRANSFORMS
               for interpreter in torch._C._functorch.get_interpreter_stack()):
            return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _call_inference(op, *args):
    """Calls an inference op, below its autograd kernel where nothing traces or transforms the
    call: that kernel is Python (register_autograd below: it only refuses a backward) and costs
    a few microseconds, as much as a small step's kernels. Callers run the op only where no
    gradient can flow, so autograd has nothing to record. (Dynamo, torch.func and the tracer see
    the op as it is.)"""
    if (torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None
            or torch._C._get_tracing_state() is not None):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


_CPU_HALF_TYPES = (torch.float16, torch.bfloat16)


def _cpu_half_in_float32(x: Tensor, *others: Optional[Tensor]) -> Optional[list]:
    """torch.nn's RNNs accept float16 and bfloat16 on the CPU; the CPU kernels compute in float32
    or float64. For half-type CPU arguments that all share x's dtype, returns them in float32
    (the caller casts the outputs back; autograd casts the gradients back). Otherwise None: other
    devices have half kernels, and mixed dtypes are left for the op to refuse. The copies cost a
    pass over the weights per call, every step for a cell: float32 modules are the fast path."""
    if x.dtype not in _CPU_HALF_TYPES or x.device.type != "cpu":
        return None
    if any(t is not None and t.dtype != x.dtype for t in others):
        return None
    return [x.float()] + [None if t is None else t.float() for t in others]


def lstm_layer(
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
    """One LSTM layer in one direction over a time-major sequence.

    x is [T, B, I]; h0 [B, P]; c0 [B, H]; the weights are laid out as nn.LSTM's
    (gates i, f, g, o). `lengths` (int64 on the CPU, sorted in decreasing order) makes row b
    advance only at steps t < lengths[b]; `reverse` runs the sequence backwards, each row from its
    own last step. Returns (y [T, B, P], h_n [B, P], c_n [B, H]).

    When no gradient can flow (grad mode off, or no argument requires grad), the reserve that
    backward would need is not kept: the inference op runs instead. float16 and bfloat16 on the
    CPU compute in float32 and return their own dtype.
    """
    upcast = _cpu_half_in_float32(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    if upcast is not None:
        return tuple(out.to(x.dtype) for out in lstm_layer(*upcast, lengths=lengths, reverse=reverse))
    if not _needs_grad(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        return _call_inference(_inference, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)
    y, h_n, c_n, _ = _forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)
    return y, h_n, c_n


def side_by_side_possible(x: Tensor) -> bool:
    """Whether the two directions of a bidirectional layer may go to the *_layer_bidirectional ops,
    which run them side by side on the CPU (csrc/directions.cpp; the ops themselves fall back to
    one after the other for tensors or thread states they cannot hand to a second thread). Not
    while tracing (the graph keeps one op per direction), not for half types (computed in float32
    by lstm_layer / gru_layer), not under forward-mode AD, torch.func transforms or the tracer, and
    only with two threads or more (the ops themselves go side by side with exactly two).
    LSTM_FUSED_SIDE_BY_SIDE=0 switches it off (for measurements)."""
    if torch.compiler.is_compiling():  # first: dynamo cannot trace get_num_threads
        return False
    if os.environ.get("LSTM_FUSED_SIDE_BY_SIDE") == "0":
        return False
    # functorch has no vmap fallback for ops with tensor-list arguments, and the tracer cannot
    # record a Tensor?[] argument: the per-direction ops for both.
    if torch.jit.is_tracing() or torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and forward_ad._current_level < 0 and torch.get_num_threads() > 1)


def lstm_reserve_numel(seq_len: int, batch: int, hidden_size: int, has_proj: bool):
    """Elements of the LSTM reserve: activated gates, cell states, and unprojected outputs."""
    return seq_len * batch * hidden_size * (6 if has_proj else 5)


def gru_reserve_numel(seq_len: int, batch: int, hidden_size: int):
    """Elements of the GRU reserve: activated gates and the hidden side's n projection."""
    return seq_len * batch * hidden_size * 4


def _check_devices(x, **tensors):
    """The device check of the C++ kernels (layer_args.cpp), in the fake kernels. They also run
    when an argument on the meta device sends a call with real CPU tensors to them: without the
    check such a call returned uninitialised CPU memory instead of raising as torch.nn does."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != x.device:
            raise RuntimeError(f"lstm_fused: {name} is on {tensor.device} but the input is on {x.device}")


# --- inductor --------------------------------------------------------------------------------
#
# lstm_fused.onnx puts the layer ops in torch's global decomposition table, for the ONNX exporter.
# Inductor lowers a custom op it has no lowering for to a call of the op's kernels (an implicit
# fallback), but it refuses one with an entry in that table, with an AssertionError ("a
# decomposition exists, we should switch to it"), whenever the environment variable CI is set: a
# check meant for PyTorch's own CI that a user's CI job trips too (it failed this project's CI).
# So those ops get their fallback registered explicitly, with the layout constraint that the
# implicit one takes, once inductor's lowering module is loaded: from the fake kernels, which
# run while torch.compile traces a graph for inductor and before inductor lowers it. Importing
# inductor here instead would add about 3 s to `import lstm_fused`.

_INDUCTOR_FALLBACKS = []  # the ops lstm_fused.onnx puts in the table
_inductor_fallbacks_registered = False


def _register_inductor_fallbacks() -> None:
    global _inductor_fallbacks_registered
    if _inductor_fallbacks_registered:
        return
    lowering = sys.modules.get("torch._inductor.lowering")
    if lowering is None:
        return
    _inductor_fallbacks_registered = True
    try:
        from torch._library.utils import get_layout_constraint_tag
        lowerings, make_fallback = lowering.lowerings, lowering.make_fallback
        constraint_of_tag = lowering.tag_to_layout_constraint
    except (ImportError, AttributeError):  # another torch: its implicit fallbacks, as before
        return
    for op in _INDUCTOR_FALLBACKS:
        if op not in lowerings:
            make_fallback(op, layout_constraint=constraint_of_tag(get_layout_constraint_tag(op, with_default=True)),
                          warn=False)


@torch.library.register_fake("lstm_fused::lstm_layer_forward")
def _lstm_layer_forward_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse):
    _register_inductor_fallbacks()
    _check_devices(x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, w_hr=w_hr)
    seq_len, batch, _ = x.shape
    hidden = w_ih.shape[0] // 4
    out = w_hr.shape[0] if w_hr is not None else hidden
    return (
        x.new_empty(seq_len, batch, out),
        x.new_empty(batch, out),
        x.new_empty(batch, hidden),
        x.new_empty(lstm_reserve_numel(seq_len, batch, hidden, w_hr is not None)),
    )


@torch.library.register_fake("lstm_fused::lstm_layer_inference")
def _lstm_layer_inference_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse):
    y, h_n, c_n, _ = _lstm_layer_forward_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse)
    return y, h_n, c_n


@torch.library.register_fake("lstm_fused::lstm_layer_backward")
def _lstm_layer_backward_fake(grad_y, grad_h_n, grad_c_n, x, h0, c0, w_ih, w_hh, w_hr, y, reserve,
                              lengths, reverse, need_grad_x=True, need_grad_weights=True):
    _check_devices(x, grad_y=grad_y, grad_h_n=grad_h_n, grad_c_n=grad_c_n, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh,
                   w_hr=w_hr, y=y, reserve=reserve)

    def weight_grad(w, shape):
        return w.new_empty(shape) if need_grad_weights else x.new_empty(0)

    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if need_grad_x else x.new_empty(0),
        torch.empty_like(h0, memory_format=torch.contiguous_format),
        torch.empty_like(c0, memory_format=torch.contiguous_format),
        weight_grad(w_ih, w_ih.shape),
        weight_grad(w_hh, w_hh.shape),
        weight_grad(w_ih, w_ih.shape[0]),
        weight_grad(w_hr, w_hr.shape) if w_hr is not None else x.new_empty(0),
    )


# --- GRU -------------------------------------------------------------------------------------

_gru_forward = torch.ops.lstm_fused.gru_layer_forward
_gru_inference = torch.ops.lstm_fused.gru_layer_inference


def gru_layer(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    reverse: bool = False,
) -> Tuple[Tensor, Tensor]:
    """One GRU layer in one direction over a time-major sequence (nn.GRU's formulation and gate
    order r, z, n). x is [T, B, I], h0 [B, H]; `lengths` and `reverse` as for `lstm_layer`.
    Returns (y [T, B, H], h_n [B, H]). Without gradients the inference op runs (no reserve);
    float16 and bfloat16 on the CPU compute in float32."""
    upcast = _cpu_half_in_float32(x, h0, w_ih, w_hh, b_ih, b_hh)
    if upcast is not None:
        return tuple(out.to(x.dtype) for out in gru_layer(*upcast, lengths=lengths, reverse=reverse))
    if not _needs_grad(x, h0, w_ih, w_hh, b_ih, b_hh):
        return _call_inference(_gru_inference, x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse)
    y, h_n, _ = _gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse)
    return y, h_n


@torch.library.register_fake("lstm_fused::gru_layer_forward")
def _gru_layer_forward_fake(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse):
    _register_inductor_fallbacks()
    _check_devices(x, h0=h0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
    seq_len, batch, _ = x.shape
    hidden = w_ih.shape[0] // 3
    return (
        x.new_empty(seq_len, batch, hidden),
        x.new_empty(batch, hidden),
        x.new_empty(gru_reserve_numel(seq_len, batch, hidden)),
    )


@torch.library.register_fake("lstm_fused::gru_layer_inference")
def _gru_layer_inference_fake(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse):
    y, h_n, _ = _gru_layer_forward_fake(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, reverse)
    return y, h_n


@torch.library.register_fake("lstm_fused::gru_layer_backward")
def _gru_layer_backward_fake(grad_y, grad_h_n, x, h0, w_ih, w_hh, y, reserve, lengths, reverse,
                             need_grad_x=True, need_grad_weights=True):
    _check_devices(x, grad_y=grad_y, grad_h_n=grad_h_n, h0=h0, w_ih=w_ih, w_hh=w_hh, y=y, reserve=reserve)

    def weight_grad(w, shape):
        return w.new_empty(shape) if need_grad_weights else x.new_empty(0)

    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if need_grad_x else x.new_empty(0),
        torch.empty_like(h0, memory_format=torch.contiguous_format),
        weight_grad(w_ih, w_ih.shape),
        weight_grad(w_hh, w_hh.shape),
        weight_grad(w_ih, w_ih.shape[0]),
        weight_grad(w_ih, w_ih.shape[0]),
    )


@torch.library.register_fake("lstm_fused::lstm_layer_bidirectional")
def _lstm_layer_bidirectional_fake(x, state, weights, weights_reverse, lengths):
    outputs = []
    for (h0, c0), w in ((state[:2], weights), (state[2:], weights_reverse)):
        outputs += _lstm_layer_inference_fake(x, h0, c0, *w, lengths, False)
    return outputs


@torch.library.register_fake("lstm_fused::gru_layer_bidirectional")
def _gru_layer_bidirectional_fake(x, state, weights, weights_reverse, lengths):
    outputs = []
    for h0, w in ((state[0], weights), (state[1], weights_reverse)):
        outputs += _gru_layer_inference_fake(x, h0, *w, lengths, False)
    return outputs


def _inference_backward(ctx, *grads):
    raise RuntimeError(
        "lstm_fused: the *_layer_inference ops keep no reserve and have no backward; "
        "call lstm_fused.ops.lstm_layer / gru_layer, which use the forward op when a gradient is wanted"
    )


torch.library.register_autograd("lstm_fused::lstm_layer_inference", _inference_backward)
torch.library.register_autograd("lstm_fused::gru_layer_inference", _inference_backward)
