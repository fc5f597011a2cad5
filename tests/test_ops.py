"""The layer ops against the float64 reference, gradcheck and opcheck."""
import pytest
import torch

from lstm_fused.ops import gru_layer, lstm_layer
from lstm_fused.reference import gru_layer_reference, lstm_layer_reference


def make_layer_args(T, B, I, H, proj, bias, device, dtype=torch.float64, requires_grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    P = proj or H

    def rand(*shape):
        t = torch.randn(*shape, generator=gen, dtype=dtype).to(device)
        return t.requires_grad_(requires_grad)

    args = [rand(T, B, I), rand(B, P), rand(B, H), rand(4 * H, I) * 0.5, rand(4 * H, P) * 0.5]
    args = [a.detach().requires_grad_(requires_grad) for a in args]
    args += [rand(4 * H), rand(4 * H)] if bias else [None, None]
    args.append(rand(P, H) if proj else None)
    return args


def random_lengths(T, B, seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    lengths[0] = T  # keep the longest at T, like a packed batch
    return lengths.sort(descending=True).values


def outputs_and_grads(layer, args, lengths, reverse, weights=None):
    """The layer's outputs followed by the gradients of its tensor arguments under a fixed random
    weighting of the outputs; pass the returned weights on to compare like with like."""
    outs = layer(*args, lengths=lengths, reverse=reverse)
    if weights is None:
        weights = [torch.randn(o.shape, dtype=torch.float64) for o in outs]
    loss = sum((o * w.to(o)).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, [a for a in args if a is not None])
    return list(outs) + list(grads), weights


def gradcheck_layer(layer, args, lengths, reverse):
    """gradcheck over the tensor arguments (the optional ones that are None are left out)."""
    leaves = tuple(a for a in args if a is not None)

    def fn(*tensors):
        it = iter(tensors)
        return layer(*[next(it) if a is not None else None for a in args], lengths=lengths, reverse=reverse)

    return torch.autograd.gradcheck(fn, leaves)


CASES = [
    # T, B, I, H, proj, bias, use_lengths
    (1, 1, 1, 1, 0, True, False),
    (6, 3, 4, 5, 0, True, False),
    (7, 4, 3, 8, 3, True, True),
    (5, 5, 2, 17, 0, False, True),
    (4, 2, 6, 9, 4, False, False),
    (9, 6, 3, 33, 0, True, True),
]


@pytest.mark.parametrize("T,B,I,H,proj,bias,use_lengths", CASES)
@pytest.mark.parametrize("reverse", [False, True])
def test_forward_and_backward_match_reference(device, T, B, I, H, proj, bias, use_lengths, reverse):
    seed = hash((T, B, I, H, proj, bias, use_lengths, reverse)) % 10_000
    args = make_layer_args(T, B, I, H, proj, bias, device, seed=seed)
    lengths = random_lengths(T, B, seed) if use_lengths else None
    ref, weights = outputs_and_grads(lstm_layer_reference, args, lengths, reverse)
    ours, _ = outputs_and_grads(lstm_layer, args, lengths, reverse, weights)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("proj,bias,use_lengths,reverse", [
    (0, True, False, False), (0, True, True, True), (2, False, True, False), (2, True, False, True),
])
def test_gradcheck(device, proj, bias, use_lengths, reverse):
    T, B, I, H = 4, 3, 3, 4
    args = make_layer_args(T, B, I, H, proj, bias, device, seed=7)
    lengths = torch.tensor([4, 2, 1]) if use_lengths else None
    assert gradcheck_layer(lstm_layer, args, lengths, reverse)


def check_backward_op(op, backward_args, x, state_outputs):
    """opcheck on a backward op with and without need_grad_x / need_grad_weights: what is not
    wanted is an empty tensor (its GEMMs skipped), and every other gradient is the same, bit for
    bit. Outputs 0 is grad_x, then `state_outputs` state gradients, then the weights'."""
    full = op(*backward_args)
    assert full[0].shape == x.shape
    for need_x, need_weights in ((True, True), (False, True), (True, False), (False, False)):
        args = (*backward_args, need_x, need_weights)
        torch.library.opcheck(op, args)
        partial = op(*args)
        for k, (a, b) in enumerate(zip(partial, full)):
            wanted = need_x if k == 0 else True if k <= state_outputs else need_weights
            if wanted:
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            else:
                assert a.numel() == 0, k


@pytest.mark.parametrize("proj,use_lengths", [(0, False), (3, True)])
def test_opcheck(device, proj, use_lengths):
    T, B, I, H = 5, 3, 4, 6
    args = make_layer_args(T, B, I, H, proj, True, device, dtype=torch.float32, seed=3)
    lengths = torch.tensor([5, 3, 2]) if use_lengths else None
    forward_args = (*args, lengths, False)
    torch.library.opcheck(torch.ops.lstm_fused.lstm_layer_forward.default, forward_args)

    plain = [a.detach() if a is not None else None for a in args]
    torch.library.opcheck(torch.ops.lstm_fused.lstm_layer_inference.default, (*plain, lengths, False))
    y, h_n, c_n, reserve = torch.ops.lstm_fused.lstm_layer_forward(*plain, lengths, True)
    x, h0, c0, w_ih, w_hh, _, _, w_hr = plain
    backward_args = (torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n), x, h0, c0,
                     w_ih, w_hh, w_hr, y, reserve, lengths, True)
    check_backward_op(torch.ops.lstm_fused.lstm_layer_backward.default, backward_args, x, 2)


def test_op_rejects_bad_arguments():
    args = make_layer_args(3, 2, 4, 5, 0, True, "cpu", dtype=torch.float32, requires_grad=False)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = args
    op = torch.ops.lstm_fused.lstm_layer_forward
    with pytest.raises(RuntimeError, match="x must be"):
        op(x[0], h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, None, False)
    with pytest.raises(RuntimeError, match="h0 must have shape"):
        op(x, h0[:1], c0, w_ih, w_hh, b_ih, b_hh, w_hr, None, False)
    with pytest.raises(RuntimeError, match="dtype"):
        op(x, h0.double(), c0, w_ih, w_hh, b_ih, b_hh, w_hr, None, False)
    with pytest.raises(RuntimeError, match="sorted in decreasing order"):
        op(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, torch.tensor([1, 3]), False)
    with pytest.raises(RuntimeError, match="outside"):
        op(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, torch.tensor([4, 1]), False)
    with pytest.raises(RuntimeError, match="together"):
        op(x, h0, c0, w_ih, w_hh, b_ih, None, w_hr, None, False)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        op(x.half(), h0.half(), c0.half(), w_ih.half(), w_hh.half(), b_ih.half(), b_hh.half(), None, None, False)


# --- GRU ---------------------------------------------------------------------------------------

def make_gru_args(T, B, I, H, bias, device, dtype=torch.float64, requires_grad=True, seed=0):
    """x, h0, w_ih, w_hh, b_ih, b_hh for one GRU layer (the LSTM's maker with 3 gates)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=gen, dtype=dtype) * scale).to(device)
        return t.requires_grad_(requires_grad)

    biases = [rand(3 * H), rand(3 * H)] if bias else [None, None]
    return [rand(T, B, I), rand(B, H), rand(3 * H, I, scale=0.5), rand(3 * H, H, scale=0.5)] + biases


@pytest.mark.parametrize("T,B,I,H,bias,use_lengths", [
    (1, 1, 1, 1, True, False), (6, 3, 4, 5, True, False), (7, 4, 3, 8, False, True), (9, 6, 3, 33, True, True),
])
@pytest.mark.parametrize("reverse", [False, True])
def test_gru_matches_reference(device, T, B, I, H, bias, use_lengths, reverse):
    seed = hash((T, B, I, H, bias, use_lengths, reverse)) % 10_000
    args = make_gru_args(T, B, I, H, bias, device, seed=seed)
    lengths = random_lengths(T, B, seed) if use_lengths else None
    ref, weights = outputs_and_grads(gru_layer_reference, args, lengths, reverse)
    ours, _ = outputs_and_grads(gru_layer, args, lengths, reverse, weights)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("bias,use_lengths,reverse", [(True, False, False), (False, True, True), (True, True, False)])
def test_gru_gradcheck(device, bias, use_lengths, reverse):
    args = make_gru_args(4, 3, 3, 4, bias, device, seed=11)
    lengths = torch.tensor([4, 2, 1]) if use_lengths else None
    assert gradcheck_layer(gru_layer, args, lengths, reverse)


@pytest.mark.parametrize("use_lengths", [False, True])
def test_gru_opcheck(device, use_lengths):
    args = make_gru_args(5, 3, 4, 6, True, device, dtype=torch.float32, seed=5)
    lengths = torch.tensor([5, 3, 2]) if use_lengths else None
    torch.library.opcheck(torch.ops.lstm_fused.gru_layer_forward.default, (*args, lengths, False))
    x, h0, w_ih, w_hh, b_ih, b_hh = [a.detach() for a in args]
    torch.library.opcheck(torch.ops.lstm_fused.gru_layer_inference.default,
                          (x, h0, w_ih, w_hh, b_ih, b_hh, lengths, False))
    y, h_n, reserve = torch.ops.lstm_fused.gru_layer_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, True)
    backward_args = (torch.randn_like(y), torch.randn_like(h_n), x, h0, w_ih, w_hh, y, reserve, lengths, True)
    check_backward_op(torch.ops.lstm_fused.gru_layer_backward.default, backward_args, x, 1)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_through_each_output_alone(cell, bias):
    """The autograd function (C++) receives no gradient for outputs outside the loss and must
    treat them as zeros; arguments that need no gradient get none, and the rest are exact."""
    T, B, I, H = 5, 3, 4, 6
    if cell == "lstm":
        args = make_layer_args(T, B, I, H, 0, bias, "cpu", seed=31 + bias)
        run, reference, n_outputs = lstm_layer, lstm_layer_reference, 3
    else:
        args = make_gru_args(T, B, I, H, bias, "cpu", seed=37 + bias)
        run, reference, n_outputs = gru_layer, gru_layer_reference, 2
    args[0].requires_grad_(False)  # x, as for a first layer fed with data
    leaves = [a for a in args if a is not None and a.requires_grad]
    for k in range(n_outputs):
        weight = torch.randn(run(*args)[k].shape, dtype=torch.float64)
        ours = torch.autograd.grad((run(*args)[k] * weight).sum(), leaves)
        exact = torch.autograd.grad((reference(*args)[k] * weight).sum(), leaves)
        for a, b in zip(ours, exact):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
    # x requires grad but only the weights' gradients are asked for: the backward may skip grad_x.
    args[0].requires_grad_(True)
    weight = torch.randn(run(*args)[0].shape, dtype=torch.float64)
    ours = torch.autograd.grad((run(*args)[0] * weight).sum(), leaves)
    exact = torch.autograd.grad((reference(*args)[0] * weight).sum(), leaves)
    for a, b in zip(ours, exact):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
    ours_x, = torch.autograd.grad((run(*args)[0] * weight).sum(), args[0])
    exact_x, = torch.autograd.grad((reference(*args)[0] * weight).sum(), args[0])
    torch.testing.assert_close(ours_x, exact_x, rtol=1e-7, atol=1e-12)



@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("bias,proj,use_lengths", [(True, 0, False), (False, 3, True)])
@pytest.mark.parametrize("trainable", ["none", "all but w_hh", "last only", "all"])
@pytest.mark.parametrize("x_grad", [True, False])
def test_backward_skips_only_the_unwanted_gradients(cell, bias, proj, use_lengths, trainable, x_grad):
    """The autograd function asks the backward op for grad_x only when x needs it, and for the
    weight gradients only when some weight needs one (a frozen layer). Which inputs count as
    weights depends on the optional ones given (biases, w_hr, lengths): "last only" trains only
    the last weight argument (w_hr, b_hh or w_hh). The flags are recorded below the autograd
    layer, and the gradients asked for stay exact."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordBackwardFlags(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.flags = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.name().endswith("_layer_backward"):
                schema_args = func._schema.arguments
                values = list(args) + [a.default_value for a in schema_args[len(args):]]
                self.flags.append(tuple(values[-2:]))
            return func(*args, **(kwargs or {}))

    T, B, I, H = 4, 3, 5, 6
    if cell == "lstm":
        args = make_layer_args(T, B, I, H, proj, bias, "cpu", seed=51)
        run, reference, first_weight = lstm_layer, lstm_layer_reference, 3
    else:
        args = make_gru_args(T, B, I, H, bias, "cpu", seed=53)
        run, reference, first_weight = gru_layer, gru_layer_reference, 2
    lengths = torch.tensor([4, 2, 1]) if use_lengths else None
    args[0].requires_grad_(x_grad)
    weights = [w for w in args[first_weight:] if w is not None]  # w_ih, w_hh, biases, w_hr as given
    for index, w in enumerate(weights):
        w.requires_grad_({"none": False, "all but w_hh": index != 1, "last only": index == len(weights) - 1,
                          "all": True}[trainable])
    leaves = [a for a in args if a is not None and a.requires_grad]
    weight = torch.randn(run(*args, lengths=lengths)[0].shape, dtype=torch.float64)
    recorder = RecordBackwardFlags()
    with recorder:
        ours = torch.autograd.grad((run(*args, lengths=lengths)[0] * weight).sum(), leaves)
    exact = torch.autograd.grad((reference(*args, lengths=lengths)[0] * weight).sum(), leaves)
    for a, b in zip(ours, exact):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
    assert recorder.flags == [(x_grad, trainable != "none")]


@pytest.mark.parametrize("cell,proj,bias,use_lengths,reverse", [
    ("lstm", 0, True, False, False), ("lstm", 2, True, True, True), ("lstm", 0, False, True, False),
    ("gru", 0, True, False, True), ("gru", 0, False, True, False),
])
def test_gradgradcheck(device, cell, proj, bias, use_lengths, reverse):
    """Second-order gradients: a backward run with create_graph=True recomputes the layer in
    differentiable ATen ops (csrc/composite_layers.cpp) and differentiates that."""
    T, B, I, H = 4, 3, 2, 3
    if cell == "lstm":
        args, layer = make_layer_args(T, B, I, H, proj, bias, device, seed=47), lstm_layer
    else:
        args, layer = make_gru_args(T, B, I, H, bias, device, seed=53), gru_layer
    lengths = torch.tensor([4, 2, 1]) if use_lengths else None
    leaves = tuple(a for a in args if a is not None)

    def fn(*tensors):
        it = iter(tensors)
        return layer(*[next(it) if a is not None else None for a in args], lengths=lengths, reverse=reverse)

    assert torch.autograd.gradgradcheck(fn, leaves)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_create_graph_gives_the_fused_first_order_gradient(cell):
    """create_graph=True takes the differentiable path; its first-order gradients are those of the
    fused backward, and differentiating them again matches the float64 reference's."""
    if cell == "lstm":
        args, run, reference = make_layer_args(5, 3, 4, 6, 0, True, "cpu", seed=41), lstm_layer, lstm_layer_reference
    else:
        args, run, reference = make_gru_args(5, 3, 4, 6, True, "cpu", seed=43), gru_layer, gru_layer_reference
    lengths = torch.tensor([5, 3, 2])
    leaves = [a for a in args if a is not None]
    first_order = torch.autograd.grad(run(*args, lengths=lengths)[0].pow(2).sum(), leaves)
    with_graph = torch.autograd.grad(run(*args, lengths=lengths)[0].pow(2).sum(), leaves, create_graph=True)
    exact = torch.autograd.grad(reference(*args, lengths=lengths)[0].pow(2).sum(), leaves, create_graph=True)
    for a, b in zip(with_graph, first_order):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    penalty = sum(g.pow(2).sum() for g in with_graph)
    exact_penalty = sum(g.pow(2).sum() for g in exact)
    for a, b in zip(torch.autograd.grad(penalty, leaves), torch.autograd.grad(exact_penalty, leaves)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_backward_op_called_directly_is_not_differentiable():
    """The backward kernels are not differentiable: differentiating their outputs must raise, not
    treat them as constants (which would give silent zeros)."""
    args = make_layer_args(3, 2, 4, 5, 0, True, "cpu", requires_grad=False, seed=41)
    y, h_n, c_n, reserve = torch.ops.lstm_fused.lstm_layer_forward(*args, None, False)
    grad_y = torch.randn_like(y, requires_grad=True)
    x, h0, c0, w_ih, w_hh = args[:5]
    grads = torch.ops.lstm_fused.lstm_layer_backward(grad_y, torch.zeros_like(h_n), torch.zeros_like(c_n), x, h0,
                                                     c0, w_ih, w_hh, None, y, reserve, None, False)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(grads[3].sum(), grad_y)


def _relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("use_lengths,reverse", [(False, False), (True, True), (True, False)])
def test_float32_kernels_against_float64_reference(device, cell, use_lengths, reverse):
    """float32 runs the fast paths (on the CPU: MKL's packed GEMM when every row advances, sgemm
    when some have finished); the float64 reference bounds their error, forward and backward."""
    T, B, I, H = 11, 6, 7, 24
    seed = 21 + use_lengths + 2 * reverse
    if cell == "lstm":
        args64 = make_layer_args(T, B, I, H, 0, True, device, seed=seed)
        run, reference = lstm_layer, lstm_layer_reference
    else:
        args64 = make_gru_args(T, B, I, H, True, device, seed=seed)
        run, reference = gru_layer, gru_layer_reference
    args32 = [a.detach().float().requires_grad_() if a is not None else None for a in args64]
    lengths = random_lengths(T, B, seed) if use_lengths else None
    exact, weights = outputs_and_grads(reference, args64, lengths, reverse)
    ours, _ = outputs_and_grads(run, args32, lengths, reverse, weights)
    n_outputs = 3 if cell == "lstm" else 2
    for k, (a, b) in enumerate(zip(ours, exact)):
        assert _relative_error(a, b) < (1e-5 if k < n_outputs else 1e-4)
