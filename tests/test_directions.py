"""The *_layer_bidirectional ops (csrc/directions.cpp): both directions of a layer in one call, side
by side on the CPU when torch has two threads (an OpenMP worker runs the reverse direction
under the caller's thread-local state), one after the other otherwise. That the two directions ran
on two threads is seen in the profiler's thread ids; the speed is measured in benchmarks/."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence
from torch.utils._python_dispatch import TorchDispatchMode

import lstm_fused
from helpers import assert_error_bounded, run_with_grads

lstm_op = torch.ops.lstm_fused.lstm_layer_bidirectional
gru_op = torch.ops.lstm_fused.gru_layer_bidirectional


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _pair(torch_class, **kwargs):
    torch.manual_seed(0)
    ref = torch_class(**kwargs)
    ours = getattr(lstm_fused, torch_class.__name__)(**kwargs)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@pytest.mark.parametrize("torch_class,kwargs", [
    (nn.LSTM, dict(input_size=3, hidden_size=20, num_layers=2)),
    (nn.LSTM, dict(input_size=3, hidden_size=20, bias=False)),
    (nn.LSTM, dict(input_size=3, hidden_size=8, proj_size=3)),
    (nn.LSTM, dict(input_size=3, hidden_size=130)),  # above the LSTM's side-by-side limit
    (nn.GRU, dict(input_size=3, hidden_size=20, num_layers=2)),
])
@pytest.mark.parametrize("packed", [False, True])
def test_side_by_side_matches_one_thread_and_torch_nn(two_threads, torch_class, kwargs, packed):
    """Outputs and gradients with two threads (side by side) against one thread (one direction after
    the other) and against torch.nn."""
    ours, ref = _pair(torch_class, bidirectional=True, **kwargs)
    gen = torch.Generator().manual_seed(5)
    if packed:
        inputs = pack_sequence([torch.randn(n, 3, generator=gen) for n in (7, 5, 2)])
    else:
        inputs = torch.randn(6, 4, 3, generator=gen)

    def run(module):
        x = inputs.data if packed else inputs
        leaf = x.clone().requires_grad_()
        given = type(inputs)(leaf, *inputs[1:]) if packed else leaf
        outs, grads, _ = run_with_grads(module, given)  # grads[0] is the input's (leaf's)
        return outs + grads

    side_by_side = run(ours)
    torch.set_num_threads(1)
    one_thread = run(ours)
    torch.set_num_threads(2)
    theirs = run(ref)
    inputs = type(inputs)(inputs.data.double(), *inputs[1:]) if packed else inputs.double()
    exact = run(ref.double())
    # Two float32 summation orders differ by what rounding gives on each CPU: each is bounded by
    # torch.nn's own float32 error against the float64 result instead.
    for k, (a, b, t, e) in enumerate(zip(side_by_side, one_thread, theirs, exact)):
        assert_error_bounded(a, t, e, f"side by side, result {k}")
        assert_error_bounded(b, t, e, f"one thread, result {k}")


def _lstm_args(H=6, B=3, I=4, T=5, requires_grad=False):
    gen = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_(requires_grad)

    x = rand(T, B, I)
    state = [rand(B, H) for _ in range(4)]
    weights = [[rand(4 * H, I), rand(4 * H, H), rand(4 * H), rand(4 * H), None] for _ in range(2)]
    return x, state, weights


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_the_worker_thread_runs_under_the_callers_grad_mode(two_threads, mode):
    x, state, (w, w_rev) = _lstm_args(requires_grad=True)
    if mode == "grad":
        outs = lstm_op(x, state, w, w_rev, None)
        assert all(o.grad_fn is not None for o in outs)
    elif mode == "no_grad":
        with torch.no_grad():
            outs = lstm_op(x, state, w, w_rev, None)
        assert all(o.grad_fn is None for o in outs)
    else:
        with torch.inference_mode():
            outs = lstm_op(x, state, w, w_rev, None)
        assert all(o.is_inference() for o in outs)
    # the same op per direction as the modules would call: the forward op with grad, else inference
    op = torch.ops.lstm_fused.lstm_layer_forward if mode == "grad" else torch.ops.lstm_fused.lstm_layer_inference
    with torch.no_grad():
        forward = op(x, state[0], state[1], *w, None, False)
        reverse = op(x, state[2], state[3], *w_rev, None, True)
    for got, expected in zip(outs, forward[:3] + reverse[:3]):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("broken", ["forward", "reverse"])
def test_an_error_in_either_direction_is_raised_to_the_caller(two_threads, broken):
    x, state, (w, w_rev) = _lstm_args()
    target = w if broken == "forward" else w_rev
    target[1] = torch.randn(5, 5)  # a w_hh of the wrong shape
    with pytest.raises(RuntimeError, match="w_hh"):
        lstm_op(x, state, w, w_rev, None)
    with pytest.raises(RuntimeError, match="required"):
        lstm_op(x, state, [None] * 5, w_rev, None)


def test_gru_op_matches_two_calls(two_threads):
    gen = torch.Generator().manual_seed(2)
    x, H = torch.randn(6, 3, 4, generator=gen), 5
    state = [torch.randn(3, H, generator=gen) for _ in range(2)]
    weights = [[torch.randn(3 * H, 4, generator=gen), torch.randn(3 * H, H, generator=gen), None, None]
               for _ in range(2)]
    lengths = torch.tensor([6, 4, 1])
    outs = gru_op(x, state, weights[0], weights[1], lengths)
    expected = [*torch.ops.lstm_fused.gru_layer_inference(x, state[0], *weights[0], lengths, False),
                *torch.ops.lstm_fused.gru_layer_inference(x, state[1], *weights[1], lengths, True)]
    for got, e in zip(outs, expected):
        torch.testing.assert_close(got, e, rtol=0, atol=0)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_dispatch_mode_sees_both_directions_on_its_own_thread(two_threads):
    """Python dispatch modes are per thread: under one, both directions run on the caller's thread,
    one after the other, so that the mode sees both (the op's autograd kernel, above the mode,
    calls the per-direction ops)."""
    x, state, (w, w_rev) = _lstm_args()
    recorder = _Recorder()
    with recorder:
        outs = lstm_op(x, state, w, w_rev, None)
    assert recorder.ops == ["lstm_fused.lstm_layer_inference.default"] * 2, recorder.ops
    plain = lstm_op(x, state, w, w_rev, None)
    for a, b in zip(outs, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _lstm_args64(bias=True, proj=0, lengths=False, seed=3):
    gen = torch.Generator().manual_seed(seed)
    T, B, I, H = 4, 3, 2, 3
    P = proj or H

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    x = rand(T, B, I)
    state = [rand(B, P), rand(B, H), rand(B, P), rand(B, H)]
    weights = [[rand(4 * H, I), rand(4 * H, P), rand(4 * H) if bias else None, rand(4 * H) if bias else None,
                rand(P, H) if proj else None] for _ in range(2)]
    return x, state, weights, (torch.tensor([4, 2, 1]) if lengths else None)


def _gru_args64(bias=True, lengths=False, seed=4):
    gen = torch.Generator().manual_seed(seed)
    T, B, I, H = 4, 3, 2, 3

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    x = rand(T, B, I)
    state = [rand(B, H), rand(B, H)]
    weights = [[rand(3 * H, I), rand(3 * H, H), rand(3 * H) if bias else None, rand(3 * H) if bias else None]
               for _ in range(2)]
    return x, state, weights, (torch.tensor([4, 2, 1]) if lengths else None)


def _as_function(op, x, state, weights, lengths):
    """The op as a function of its tensors (for gradcheck), and those tensors."""
    leaves = [x, *state] + [w for ws in weights for w in ws if w is not None]

    def fn(*tensors):
        it = iter(tensors)
        xx = next(it)
        ss = [next(it) for _ in state]
        ww = [[next(it) if w is not None else None for w in ws] for ws in weights]
        return tuple(op(xx, ss, ww[0], ww[1], lengths))

    return fn, leaves


@pytest.mark.parametrize("cell,bias,proj,lengths", [
    ("lstm", True, 0, False), ("lstm", False, 2, True), ("gru", True, 0, True), ("gru", False, 0, False),
])
def test_pair_function_gradcheck_and_gradgradcheck(two_threads, cell, bias, proj, lengths):
    """The pair autograd function (both directions' backward ops side by side) against numerical
    gradients, and its differentiable backward (create_graph) against numerical second order."""
    if cell == "lstm":
        op, (x, state, weights, lens) = lstm_op, _lstm_args64(bias, proj, lengths)
        function_name = "LstmPairFunction"
    else:
        op, (x, state, weights, lens) = gru_op, _gru_args64(bias, lengths)
        function_name = "GruPairFunction"
    fn, leaves = _as_function(op, x, state, weights, lens)
    assert function_name in fn(*leaves)[0].grad_fn.name(), "two threads and a gradient: the pair function runs"
    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


@pytest.mark.parametrize("wanted", ["input only", "weights only", "reverse weights only", "states only"])
def test_pair_function_computes_what_autograd_wants(two_threads, wanted):
    """Each direction's backward op skips the input-gradient GEMM or its weight gradients as the
    inputs' requires_grad says; the gradients that are wanted match the single-direction ops'."""
    x, state, weights, lengths = _lstm_args64(bias=True, proj=0, lengths=True)
    for t in [x, *state] + [w for ws in weights for w in ws if w is not None]:
        t.requires_grad_(False)
    chosen = {"input only": [x], "weights only": [w for ws in weights for w in ws if w is not None],
              "reverse weights only": [w for w in weights[1] if w is not None], "states only": state}[wanted]
    for t in chosen:
        t.requires_grad_(True)
    outs = lstm_op(x, state, weights[0], weights[1], lengths)
    if wanted == "reverse weights only":  # the forward direction needs no gradient: its inference op
        assert outs[0].grad_fn is None and "PairFunction" not in outs[3].grad_fn.name()
    else:
        assert "LstmPairFunction" in outs[0].grad_fn.name()
    gen = torch.Generator().manual_seed(9)
    probes = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
    got = torch.autograd.grad(sum((o * p).sum() for o, p in zip(outs, probes)), chosen)
    single = []
    for reverse in (False, True):
        w = weights[reverse]
        single += torch.ops.lstm_fused.lstm_layer_forward(x, state[2 * reverse], state[2 * reverse + 1], *w,
                                                          lengths, reverse)[:3]
    expected = torch.autograd.grad(sum((o * p).sum() for o, p in zip(single, probes)), chosen)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_opcheck_pair_ops(two_threads):
    x, state, weights, lengths = _lstm_args64(bias=True, proj=2, lengths=True)
    torch.library.opcheck(lstm_op, (x.float(), [s.float() for s in state],
                                    *[[w.float() if w is not None else None for w in ws] for ws in weights], lengths))
    x, state, weights, lengths = _gru_args64(bias=False, lengths=False)
    torch.library.opcheck(gru_op, (x, state, weights[0], weights[1], lengths))


def test_a_direction_that_needs_no_gradient_runs_its_inference_op(two_threads):
    """With only the forward direction's weights trainable and data as input, the reverse
    direction needs no reserve and no backward: it takes the inference op, not the pair function."""
    x, state, weights, lengths = _lstm_args64(bias=True, proj=0, lengths=True)
    for t in [x, *state] + [w for w in weights[1] if w is not None]:
        t.requires_grad_(False)
    outs = lstm_op(x, state, weights[0], weights[1], lengths)
    assert outs[3].grad_fn is None and outs[0].grad_fn is not None
    with torch.autograd.profiler.profile() as profile:
        lstm_op(x, state, weights[0], weights[1], lengths)[0].sum().backward()
    names = [event.name for event in profile.function_events]
    assert names.count("lstm_fused::lstm_layer_inference") == 1, names
    assert names.count("lstm_fused::lstm_layer_forward") == 1
    assert names.count("lstm_fused::lstm_layer_backward") == 1


def test_with_another_team_size_the_directions_take_turns():
    """Side by side is only taken with exactly two threads (the one size measured): with three,
    each direction runs on the whole team in turn, through its own op and autograd."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        x, state, weights, lengths = _lstm_args64()
        outs = lstm_op(x, state, weights[0], weights[1], lengths)
        assert "PairFunction" not in outs[0].grad_fn.name()
        expected = torch.ops.lstm_fused.lstm_layer_forward(x, state[0], state[1], *weights[0], lengths, False)
        torch.testing.assert_close(outs[0], expected[0], rtol=0, atol=0)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_the_directions_run_on_two_threads(two_threads, mode):
    """With two threads, the two directions' ops (forward and, in training, backward) are seen by
    the profiler on two different threads; with one, on one."""
    x, state, weights, lengths = _lstm_args64()
    op_name = "lstm_fused::lstm_layer_forward" if mode == "training" else "lstm_fused::lstm_layer_inference"

    def threads_of(names):
        with torch.autograd.profiler.profile() as profile:
            with torch.set_grad_enabled(mode == "training"):
                outs = lstm_op(x, state, weights[0], weights[1], lengths)
            if mode == "training":
                sum(o.sum() for o in outs).backward()
        return {name: {e.thread for e in profile.function_events if e.name == name} for name in names}

    names = [op_name] + (["lstm_fused::lstm_layer_backward"] if mode == "training" else [])
    for name, threads in threads_of(names).items():
        assert len(threads) == 2, (name, threads)
    torch.set_num_threads(1)
    for name, threads in threads_of(names).items():
        assert len(threads) == 1, (name, threads)
