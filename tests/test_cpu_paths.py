"""The CPU kernels' own paths. The LSTM's two time loops: the weight-stationary one (one OpenMP
team; chosen without projection for steps up to ~100 MFLOP) and the per-step one (projection,
larger steps); LSTM_FUSED_CPU_LOOP=stationary|step forces either. Also the float32 activations
of AVX-512 builds, and the inference ops (no reserve) of both cells."""
import platform
import sys

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils._python_dispatch import TorchDispatchMode

import lstm_fused
from helpers import assert_error_bounded, cpu_vendor
from lstm_fused.ops import gru_layer, lstm_layer
from lstm_fused.reference import gru_layer_reference, lstm_layer_reference
from test_ops import check_backward_op, gradcheck_layer, make_gru_args, make_layer_args, outputs_and_grads, random_lengths


def torch_nn_layer(*args, lengths=None, reverse=False):
    """What torch.nn computes for a layer op's arguments (x, h0[, c0], weights, in their dtype):
    nn.LSTM (when c0 is given: 8 arguments) or nn.GRU with those tensors as its weights
    (functional_call, so gradients reach them), each row over its first lengths[b] steps, in
    reverse from its own last one; a row of length 0 keeps its state and outputs zeros, as the op
    does. The tolerance of a float32 path is torch.nn's own float32 error against the float64
    reference."""
    is_lstm = len(args) == 8
    x = args[0]
    states = args[1:3] if is_lstm else args[1:2]
    w_ih, w_hh, b_ih, b_hh = args[3:7] if is_lstm else args[2:6]
    w_hr = args[7] if is_lstm else None
    T, B, I = x.shape
    H = w_hh.shape[1] if w_hr is None else w_hr.shape[1]
    if is_lstm:
        module = nn.LSTM(I, H, bias=b_ih is not None, proj_size=0 if w_hr is None else w_hr.shape[0])
    else:
        module = nn.GRU(I, H, bias=b_ih is not None)
    names = ["weight_ih_l0", "weight_hh_l0"] + (["bias_ih_l0", "bias_hh_l0"] if b_ih is not None else [])
    values = [w_ih, w_hh] + ([b_ih, b_hh] if b_ih is not None else [])
    if w_hr is not None:
        names, values = names + ["weight_hr_l0"], values + [w_hr]
    module = module.to(x.dtype)
    lengths = torch.full((B,), T) if lengths is None else lengths
    steps = torch.arange(T).unsqueeze(1)
    # The step each row reads at each position: its own steps backwards in reverse (an involution,
    # so the same gather puts the outputs back in the op's order).
    order = torch.where(steps < lengths, lengths - 1 - steps, steps) if reverse else steps.expand(T, B)
    rows = lengths > 0
    xs = x.gather(0, order.unsqueeze(-1).expand(T, B, I))[:, rows]
    hx = tuple(s[rows].unsqueeze(0) for s in states)
    out, final = torch.func.functional_call(module, dict(zip(names, values)), (
        pack_padded_sequence(xs, lengths[rows], enforce_sorted=False), hx if is_lstm else hx[0]))
    y_rows, _ = pad_packed_sequence(out, total_length=T)
    y = x.new_zeros(T, B, y_rows.shape[-1]).index_put((torch.arange(T).unsqueeze(1), rows.nonzero().T), y_rows)
    y = y.gather(0, order.unsqueeze(-1).expand(T, B, y.shape[-1]))
    final = final if is_lstm else (final,)
    finals = [s.index_put((rows.nonzero()[:, 0],), f[0]) for s, f in zip(states, final)]
    return (y, *finals)

def rounding_floor(exact, roundings=16):
    """The floor of an error bound against torch.nn's float32 error: a few float32 roundings at
    the result's scale. Both errors are a handful of such roundings; where torch.nn's happens to be
    one or two, a factor on it alone would fail a method that is as accurate by any other measure.
    The scale is at least 1, the size of the gates and states a result is summed from: a small h_n
    (0.004, say) can be the difference of terms near 1, and carry their roundings."""
    scale = exact.abs().max().item() if exact.numel() else 0.0
    return roundings * torch.finfo(torch.float32).eps * max(scale, 1.0)


@pytest.mark.parametrize("cell,proj,bias", [("lstm", 0, True), ("lstm", 3, False), ("gru", 0, True), ("gru", 0, False)])
@pytest.mark.parametrize("use_lengths,reverse", [(False, False), (True, False), (True, True)])
def test_torch_nn_layer_computes_the_op_definition(cell, proj, bias, use_lengths, reverse):
    """The torch.nn yardstick above is the layer op's definition: in float64 it gives the
    reference's outputs and gradients (lengths with zeros among them)."""
    T, B, I, H = 6, 5, 3, 7
    args = (make_layer_args(T, B, I, H, proj, bias, "cpu", seed=21) if cell == "lstm"
            else make_gru_args(T, B, I, H, bias, "cpu", seed=22))
    lengths = torch.tensor([6, 4, 4, 1, 0]) if use_lengths else None
    reference = lstm_layer_reference if cell == "lstm" else gru_layer_reference
    exact, weights = outputs_and_grads(reference, args, lengths, reverse)
    theirs, _ = outputs_and_grads(lambda *a, lengths, reverse: torch_nn_layer(*a, lengths=lengths, reverse=reverse),
                                  args, lengths, reverse, weights)
    for a, e in zip(theirs, exact):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


# Sizes chosen for the stationary loop's edges: H below, at and across one SIMD vector (16 float
# lanes, 8 double), fewer chunks than threads, row counts that do not fill a 6-row tile, and H a
# whole number of vectors in both dtypes (no zero lanes in the packed weights).
SHAPES = [
    # T, B, I, H
    (5, 1, 3, 1),
    (4, 7, 2, 15),
    (6, 13, 5, 17),
    (3, 32, 8, 40),
    (2, 9, 4, 100),
    (3, 6, 19, 32),
]


@pytest.mark.parametrize("T,B,I,H", SHAPES)
@pytest.mark.parametrize("threads", ["1", "2", "3"])
@pytest.mark.parametrize("use_lengths,reverse", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("input_projection", ["fused", "separate"])
@pytest.mark.parametrize("split", ["units", "rows"])
def test_stationary_loop_matches_reference_float64(monkeypatch, T, B, I, H, threads, use_lengths, reverse,
                                                   input_projection, split):
    """Forward and backward of the stationary loop, with the input projection inside the loop's
    product or as one GEMM before it (LSTM_FUSED_CPU_INPUT), its threads sharing each step by
    hidden units or by batch rows (LSTM_FUSED_CPU_SPLIT; with lengths, the rows split balances
    row-steps, so the threads get different row counts)."""
    monkeypatch.setenv("LSTM_FUSED_CPU_LOOP", "stationary")
    monkeypatch.setenv("LSTM_FUSED_CPU_THREADS", threads)
    monkeypatch.setenv("LSTM_FUSED_CPU_INPUT", input_projection)
    monkeypatch.setenv("LSTM_FUSED_CPU_SPLIT", split)
    seed = hash((T, B, I, H, int(threads), use_lengths, reverse)) % 10_000  # ints: the same seed in every process
    args = make_layer_args(T, B, I, H, 0, True, "cpu", seed=seed)
    lengths = random_lengths(T, B, seed) if use_lengths else None
    exact, weights = outputs_and_grads(lstm_layer_reference, args, lengths, reverse)
    ours, _ = outputs_and_grads(lstm_layer, args, lengths, reverse, weights)
    for a, b in zip(ours, exact):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("T,B,I,H", SHAPES)
@pytest.mark.parametrize("use_lengths,reverse", [(False, False), (True, True)])
def test_stationary_and_per_step_loops_agree_float32(monkeypatch, T, B, I, H, use_lengths, reverse):
    """Both float32 loops, outputs and gradients, are as close to the float64 result as torch.nn's
    float32 is."""
    seed = hash((T, B, I, H, use_lengths, reverse)) % 10_000
    args64 = make_layer_args(T, B, I, H, 0, True, "cpu", seed=seed)
    args32 = [a.detach().float().requires_grad_() if a is not None else None for a in args64]
    lengths = random_lengths(T, B, seed) if use_lengths else None
    exact, weights = outputs_and_grads(lstm_layer_reference, args64, lengths, reverse)
    theirs, _ = outputs_and_grads(lambda *a, lengths, reverse: torch_nn_layer(*a, lengths=lengths, reverse=reverse),
                                  args32, lengths, reverse, weights)
    monkeypatch.setenv("LSTM_FUSED_CPU_LOOP", "stationary")
    monkeypatch.setenv("LSTM_FUSED_CPU_SPLIT", "units")
    by_units, _ = outputs_and_grads(lstm_layer, args32, lengths, reverse, weights)
    monkeypatch.setenv("LSTM_FUSED_CPU_SPLIT", "rows")
    by_rows, _ = outputs_and_grads(lstm_layer, args32, lengths, reverse, weights)
    monkeypatch.setenv("LSTM_FUSED_CPU_LOOP", "step")
    per_step, _ = outputs_and_grads(lstm_layer, args32, lengths, reverse, weights)
    for k, (a, b, c, t, e) in enumerate(zip(by_units, per_step, by_rows, theirs, exact)):
        assert_error_bounded(a, t, e, f"stationary loop, result {k}", floor=rounding_floor(e))
        assert_error_bounded(b, t, e, f"per-step loop, result {k}", floor=rounding_floor(e))
        # a row's arithmetic is the same whichever thread does it
        torch.testing.assert_close(c, a, rtol=0, atol=0)


def test_float32_activations_over_a_wide_range():
    """One step with zero weights and the chosen pre-activations as b_ih feeds them straight to the
    gates (a bias is added per element, so a NaN stays in its own unit):
    c1 = sigmoid(f) c0 + sigmoid(i) tanh(g), y = sigmoid(o) tanh(c1), against float64 math, from
    -60 to 60 and through NaN and infinities."""
    H = 1000
    gen = torch.Generator().manual_seed(3)
    grid = torch.cat([torch.linspace(-60, 60, 4 * H - 6, dtype=torch.float64),
                      torch.tensor([0.0, -1e-8, 1e-30, float("inf"), float("-inf"), float("nan")],
                                   dtype=torch.float64)])
    pre = grid[torch.randperm(4 * H, generator=gen)]
    # Exact math on the float32-rounded inputs, so that only the kernel's own error counts.
    pre = pre.float().double()
    c0 = (torch.randn(1, H, generator=gen, dtype=torch.float64) * 3).float().double()
    i, f, g, o = pre.view(4, H)
    c1 = torch.sigmoid(f) * c0 + torch.sigmoid(i) * torch.tanh(g)
    y = torch.sigmoid(o) * torch.tanh(c1)
    out, _, c_n = lstm_layer(torch.zeros(1, 1, 1), torch.zeros(1, H), c0.float(), torch.zeros(4 * H, 1),
                             torch.zeros(4 * H, H), pre.float(), torch.zeros(4 * H), None)
    for ours, exact in ((c_n, c1), (out[0], y)):
        assert torch.equal(ours.isnan(), exact.isnan())
        finite = ~exact.isnan()
        error = (ours.double()[finite] - exact[finite]).abs() / (1 + exact[finite].abs())
        assert error.max().item() < 4e-7


def test_float32_activations_keep_their_relative_accuracy_for_small_values():
    """As above, with c0 = 0, so that c1 = sigmoid(i) tanh(g) and y = sigmoid(o) tanh(c1): tanh of
    values from 1e-12 to 10 and sigmoid down to -80 must keep their relative accuracy (a few
    float ulps). tanh as 2 sigmoid(2x) - 1 had an absolute error of ~6e-8 whatever the value,
    which left tanh(1e-6) ~5% off and an LSTM fed inputs of ~1e-5 with outputs ~3% off."""
    H = 1000
    gen = torch.Generator().manual_seed(4)

    def uniform(n, low, high):
        return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)

    half = H // 2
    signs = torch.where(torch.rand(H, generator=gen) < 0.5, -1.0, 1.0).double()
    # Units [0, half): tiny to moderate tanh arguments; units [half, H): sigmoid far in its tail.
    i = torch.cat([uniform(half, -20, 20), uniform(H - half, -80, -20)])
    g = signs * torch.cat([10 ** uniform(half, -12, 1), uniform(H - half, 1, 10)])
    o = torch.cat([uniform(half, -20, 20), uniform(H - half, -5, 5)])
    f = uniform(H, -10, 10)
    pre = torch.cat([i, f, g, o]).float().double()
    i, f, g, o = pre.view(4, H)
    c1 = torch.sigmoid(i) * torch.tanh(g)
    y = torch.sigmoid(o) * torch.tanh(c1)
    c0 = torch.zeros(1, H)
    out, _, c_n = lstm_layer(torch.zeros(1, 1, 1), torch.zeros(1, H), c0, torch.zeros(4 * H, 1),
                             torch.zeros(4 * H, H), pre.float(), torch.zeros(4 * H), None)
    for ours, exact in ((c_n[0], c1), (out[0, 0], y)):
        assert exact.abs().min().item() > 1e-37  # normal floats throughout
        relative = ((ours.double() - exact) / exact).abs()
        assert relative.max().item() < 2e-6, relative.max().item()


@pytest.mark.parametrize("T,B,I,H", [(20, 64, 5, 256), (7, 3, 4, 9)])
@pytest.mark.parametrize("use_lengths,reverse", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("loop,input_projection", [("stationary", "fused"), ("stationary", "separate"),
                                                   ("step", "separate")])
def test_inference_op_matches_forward_op(monkeypatch, T, B, I, H, use_lengths, reverse, loop, input_projection):
    """lstm_layer_inference (no reserve) gives the forward op's y, h_n, c_n. In float64 at B=64,
    H=256 one step's input projection is 512 KB, so the CPU kernel projects the input in several
    segments (8 + 8 + 4 steps), on either time loop; or inside the stationary loop's product."""
    monkeypatch.setenv("LSTM_FUSED_CPU_LOOP", loop)
    monkeypatch.setenv("LSTM_FUSED_CPU_INPUT", input_projection)
    seed = hash((T, B, I, H, use_lengths, reverse)) % 10_000
    args = make_layer_args(T, B, I, H, 0, True, "cpu", requires_grad=False, seed=seed)
    lengths = random_lengths(T, B, seed) if use_lengths else None
    expected = torch.ops.lstm_fused.lstm_layer_forward(*args, lengths, reverse)[:3]
    got = torch.ops.lstm_fused.lstm_layer_inference(*args, lengths, reverse)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


class _OpLog(TorchDispatchMode):
    """Records which lstm_fused ops reach the kernels."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "lstm_fused":
            self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_inference_op_is_used_only_without_gradients(cell):
    if cell == "lstm":
        args, layer, forward, inference = (make_layer_args(4, 3, 2, 5, 0, True, "cpu", seed=1), lstm_layer,
                                           "lstm_layer_forward", "lstm_layer_inference")
    else:
        args, layer, forward, inference = (make_gru_args(4, 3, 2, 5, True, "cpu", seed=1), gru_layer,
                                           "gru_layer_forward", "gru_layer_inference")
    frozen = [a.detach() if a is not None else None for a in args]
    calls = {}
    for name, tensors, grad in (("grad", args, True), ("no_grad", args, False), ("frozen", frozen, True)):
        with torch.set_grad_enabled(grad), _OpLog() as log:
            layer(*tensors)
        calls[name] = log.ops
    assert calls == {"grad": [forward], "no_grad": [inference], "frozen": [inference]}


def test_large_steps_take_the_per_step_loop_on_intel(monkeypatch):
    """Above ~100 MFLOP per step the default is the per-step loop (MKL) on Intel CPUs and the
    stationary loop on other vendors' (lstm_stationary.h: large_steps_to_mkl): forcing the loop
    it took changes nothing; either loop gives y, h_n and c_n as close to the float64 result,
    within torch.nn's own float32 error. (T = 4: shorter sequences take the per-step loop whatever
    their step size.)"""
    args = make_layer_args(4, 64, 8, 512, 0, True, "cpu", dtype=torch.float32, requires_grad=False, seed=4)
    exact = lstm_layer_reference(*[None if a is None else a.double() for a in args])
    with torch.no_grad():
        theirs = torch_nn_layer(*args)
    default = torch.ops.lstm_fused.lstm_layer_forward(*args, None, False)
    monkeypatch.setenv("LSTM_FUSED_CPU_LOOP", "step")
    per_step = torch.ops.lstm_fused.lstm_layer_forward(*args, None, False)
    monkeypatch.setenv("LSTM_FUSED_CPU_LOOP", "stationary")
    stationary = torch.ops.lstm_fused.lstm_layer_forward(*args, None, False)
    taken = per_step if cpu_vendor() in ("GenuineIntel", None) else stationary
    for a, b in zip(default, taken):
        assert torch.equal(a, b)
    for name, a, c, t, e in zip(("y", "h_n", "c_n"), per_step, stationary, theirs, exact):
        assert_error_bounded(a, t, e, f"default loop, {name}", floor=rounding_floor(e))
        assert_error_bounded(c, t, e, f"stationary loop, {name}", floor=rounding_floor(e))


@pytest.mark.parametrize("T,B,I,H", [(20, 64, 5, 256), (7, 3, 4, 9)])
@pytest.mark.parametrize("use_lengths,reverse", [(False, False), (True, False), (True, True)])
def test_gru_inference_op_matches_forward_op(T, B, I, H, use_lengths, reverse):
    """As for the LSTM: at B=64, H=256 in float64 the input is projected in two segments."""
    seed = hash((T, B, I, H, use_lengths, reverse)) % 10_000
    args = make_gru_args(T, B, I, H, True, "cpu", requires_grad=False, seed=seed)
    lengths = random_lengths(T, B, seed) if use_lengths else None
    expected = torch.ops.lstm_fused.gru_layer_forward(*args, lengths, reverse)[:2]
    got = torch.ops.lstm_fused.gru_layer_inference(*args, lengths, reverse)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        for a, b in zip(gru_layer(*args, lengths=lengths, reverse=reverse), expected):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T,B,I,H", SHAPES)
@pytest.mark.parametrize("threads", ["1", "2", "3"])
@pytest.mark.parametrize("use_lengths,reverse", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gru_stationary_inference_matches_reference(monkeypatch, T, B, I, H, threads, use_lengths, reverse, bias,
                                                    dtype):
    """The GRU's stationary inference loop (csrc/cpu/gru_stationary.h), its threads sharing each
    step by batch rows (with lengths, balanced by row-steps), against the float64 reference; in
    float32 as close to it as torch.nn's float32 is."""
    monkeypatch.setenv("LSTM_FUSED_CPU_LOOP", "stationary")
    monkeypatch.setenv("LSTM_FUSED_CPU_THREADS", threads)
    monkeypatch.setenv("LSTM_FUSED_CPU_SPLIT", "rows")
    seed = hash((T, B, I, H, int(threads), use_lengths, reverse, bias)) % 10_000  # ints: the same seed in every process
    args = make_gru_args(T, B, I, H, bias, "cpu", requires_grad=False, seed=seed)
    lengths = random_lengths(T, B, seed) if use_lengths else None
    exact = gru_layer_reference(*args, lengths=lengths, reverse=reverse)
    args = [a if a is None else a.to(dtype) for a in args]
    got = torch.ops.lstm_fused.gru_layer_inference(*args, lengths, reverse)
    theirs = torch_nn_layer(*args, lengths=lengths, reverse=reverse) if dtype == torch.float32 else None
    for k, (a, b) in enumerate(zip(got, exact)):
        assert a.dtype == dtype
        if dtype == torch.float64:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        else:
            assert_error_bounded(a, theirs[k], b, f"result {k}", floor=rounding_floor(b))


@pytest.mark.parametrize("T,B,I,H", [(30, 8, 3, 64), (12, 32, 16, 128), (9, 5, 7, 100)])
def test_gru_inference_by_default_matches_the_step_loop(monkeypatch, T, B, I, H):
    """The GRU inference op as the modules call it (at these sizes it takes the stationary loop,
    on one thread or by rows) and the per-step loop, in float32: each against the float64
    reference, bounded by torch.nn's own float32 error (two float32 summation orders differ by
    what rounding gives on each CPU, which no fixed tolerance between them sets)."""
    args = make_gru_args(T, B, I, H, True, "cpu", dtype=torch.float32, requires_grad=False, seed=T + B)
    lengths = random_lengths(T, B, seed=B)
    exact = gru_layer_reference(*[a.double() for a in args], lengths=lengths, reverse=True)
    with torch.no_grad():
        theirs = torch_nn_layer(*args, lengths=lengths, reverse=True)
    default = torch.ops.lstm_fused.gru_layer_inference(*args, lengths, True)
    monkeypatch.setenv("LSTM_FUSED_CPU_LOOP", "step")
    per_step = torch.ops.lstm_fused.gru_layer_inference(*args, lengths, True)
    for name, a, b, t, e in zip(("y", "h_n"), default, per_step, theirs, exact):
        assert_error_bounded(a, t, e, f"default loop, {name}", floor=rounding_floor(e))
        assert_error_bounded(b, t, e, f"per-step loop, {name}", floor=rounding_floor(e))


@pytest.mark.parametrize("loop", ["stationary", "step"])
@pytest.mark.parametrize("reverse", [False, True])
def test_lengths_all_shorter_than_the_sequence(monkeypatch, loop, reverse):
    """max(lengths) < T: a forward row stops early, and in reverse every row starts late (the first
    processed steps advance no row at all)."""
    monkeypatch.setenv("LSTM_FUSED_CPU_LOOP", loop)
    T, B, I, H = 7, 4, 3, 20
    args = make_layer_args(T, B, I, H, 0, True, "cpu", seed=11)
    lengths = torch.tensor([5, 5, 3, 1])
    exact, weights = outputs_and_grads(lstm_layer_reference, args, lengths, reverse)
    ours, _ = outputs_and_grads(lstm_layer, args, lengths, reverse, weights)
    for a, b in zip(ours, exact):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    with torch.no_grad():
        frozen = [a.detach() if a is not None else None for a in args]
        for a, b in zip(lstm_layer(*frozen, lengths=lengths, reverse=reverse), exact):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_inference_ops_refuse_backward():
    args = make_layer_args(3, 2, 2, 4, 0, True, "cpu", seed=2)
    y, _, _ = torch.ops.lstm_fused.lstm_layer_inference(*args, None, False)
    with pytest.raises(RuntimeError, match="no backward"):
        y.sum().backward()
    gru_args = make_gru_args(3, 2, 2, 4, True, "cpu", seed=2)
    y, _ = torch.ops.lstm_fused.gru_layer_inference(*gru_args, None, False)
    with pytest.raises(RuntimeError, match="no backward"):
        y.sum().backward()


def test_compile_fullgraph_traces_the_inference_ops():
    """Under no_grad the modules call the inference ops; torch.compile(fullgraph=True) traces them
    (fake kernels) and matches eager."""
    torch.manual_seed(0)
    lstm = lstm_fused.LSTM(8, 16, num_layers=2, bidirectional=True)
    gru = lstm_fused.GRU(8, 16)

    def f(x):
        return lstm(x)[0].sum() + gru(x)[0].sum()

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for T, B in ((5, 3), (7, 2)):
            x = torch.randn(T, B, 8)
            torch.testing.assert_close(compiled(x), f(x))


def every_other(t, dtype):
    """The values of t in dtype, as a non-contiguous view (every other element of a buffer twice
    as long in the last dimension), requiring grad."""
    buffer = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=dtype)
    buffer[..., ::2] = t.detach()
    return buffer[..., ::2].requires_grad_()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("B,I,H", [(1, 1, 1), (5, 3, 17), (33, 9, 64), (16, 40, 37), (3, 1, 20), (2, 256, 160), (8, 200, 200)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_single_step_path_matches_reference(cell, B, I, H, bias, dtype):
    """T = 1 with every row advancing (an LSTMCell / GRUCell call) has its own path: up to
    B = 16 the products dotted from the weights into the cell update (csrc/cpu/small_step.h: the
    sizes take every batch tile of 1-4 rows, unit blocks with tails, and the split over
    threads by MACs (B=16) and by weight bytes (H=160); with AVX2 steps above 1M MACs (B=8 H=200)
    do not), above it MKL's sgemm into the gates
    buffer. Forward, the reserve backward reads, and the inference op, with non-contiguous
    arguments; float32 against the float64 reference, as close to it as torch.nn's float32 is."""
    seed = 1000 + 100 * B + 10 * I + H + bias
    if cell == "lstm":
        args64 = make_layer_args(1, B, I, H, 0, bias, "cpu", seed=seed)
        run, reference, n_outputs = lstm_layer, lstm_layer_reference, 3
    else:
        args64 = make_gru_args(1, B, I, H, bias, "cpu", seed=seed)
        run, reference, n_outputs = gru_layer, gru_layer_reference, 2
    exact, weights = outputs_and_grads(reference, args64, None, False)
    args = [None if a is None else every_other(a, dtype) for a in args64]
    assert not any(a.is_contiguous() for a in args if a is not None and a.numel() > 1)
    ours, _ = outputs_and_grads(run, args, None, False, weights)
    with torch.no_grad():
        inference = list(run(*args))
    if dtype == torch.float64:
        for a, b in zip(ours + inference, exact + exact[:n_outputs]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
        return
    contiguous = [None if a is None else a.detach().to(dtype).requires_grad_() for a in args64]
    theirs, _ = outputs_and_grads(lambda *a, lengths, reverse: torch_nn_layer(*a, lengths=lengths, reverse=reverse),
                                  contiguous, None, False, weights)
    for k, (a, t, e) in enumerate(zip(ours + inference, theirs + theirs[:n_outputs], exact + exact[:n_outputs])):
        assert_error_bounded(a, t, e, f"result {k}", floor=rounding_floor(e))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("B,I,H,bias", [(1, 3, 5, True), (6, 4, 19, False), (16, 2, 3, True)])
def test_single_step_backward_gradcheck_and_partial_gradients(cell, B, I, H, bias):
    """The single step's own backward (B <= 16: the pointwise backward, then one pass over each
    weight for its gradient, its input's and the bias's): gradcheck in float64, and the backward
    op asked for fewer gradients (frozen weights, data input) gives the others bit for bit."""
    seed = 7000 + 10 * B + H
    if cell == "lstm":
        args = make_layer_args(1, B, I, H, 0, bias, "cpu", seed=seed)
        assert gradcheck_layer(lstm_layer, args, None, False)
        plain = [a.detach() if a is not None else None for a in args]
        y, h_n, c_n, reserve = torch.ops.lstm_fused.lstm_layer_forward(*plain, None, False)
        x, h0, c0, w_ih, w_hh = plain[:5]
        backward_args = (torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n), x, h0, c0, w_ih, w_hh,
                         None, y, reserve, None, False)
        check_backward_op(torch.ops.lstm_fused.lstm_layer_backward.default, backward_args, x, 2)
    else:
        args = make_gru_args(1, B, I, H, bias, "cpu", seed=seed)
        assert gradcheck_layer(gru_layer, args, None, False)
        x, h0, w_ih, w_hh, b_ih, b_hh = [None if a is None else a.detach() for a in args]
        y, h_n, reserve = torch.ops.lstm_fused.gru_layer_forward(x, h0, w_ih, w_hh, b_ih, b_hh, None, False)
        backward_args = (torch.randn_like(y), torch.randn_like(h_n), x, h0, w_ih, w_hh, y, reserve, None, False)
        check_backward_op(torch.ops.lstm_fused.gru_layer_backward.default, backward_args, x, 1)


def test_single_step_with_a_finished_row_takes_the_general_path():
    """T = 1 where a row does not advance (lengths [1, 0]): that row keeps h0, c0 and y is 0."""
    args = make_layer_args(1, 2, 3, 5, 0, True, "cpu", seed=61)
    lengths = torch.tensor([1, 0])
    exact, weights = outputs_and_grads(lstm_layer_reference, args, lengths, False)
    ours, _ = outputs_and_grads(lstm_layer, args, lengths, False, weights)
    for a, b in zip(ours, exact):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert torch.equal(ours[1][1], args[1][1]) and not ours[0][0, 1].any()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_ops_under_autocast_compute_in_their_arguments_dtype(cell):
    """Called directly under CPU autocast, the ops compute in float32 like their float32
    arguments: the GEMMs inside the kernels (input projection, gradients) must not be cast to
    bfloat16 behind their back."""
    if cell == "lstm":
        args = [a.detach().float().requires_grad_() if a is not None else None
                for a in make_layer_args(6, 4, 5, 8, 0, True, "cpu", seed=67)]
        run = lstm_layer
    else:
        args = [a.detach().float().requires_grad_() for a in make_gru_args(6, 4, 5, 8, True, "cpu", seed=71)]
        run = gru_layer
    plain, weights = outputs_and_grads(run, args, None, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast, _ = outputs_and_grads(run, args, None, False, weights)
    for a, b in zip(autocast, plain):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# The gradient GEMMs after the backward loop go to oneDNN on x86 CPUs of vendors other than
# Intel, to MKL (at::mm) elsewhere (csrc/gradient_gemms.h); LSTM_FUSED_CPU_GEMM forces either.
# Sizes of at least 512 rows and 2^20 multiply-adds, where the vendor rule applies (in the first
# test, which forces oneDNN, smaller ones too); the LSTM's combined
# weight-gradient GEMM (I <= P) and its two separate ones (I > P), with a projection, the GRU's
# gathered and ungathered h_{t-1}.
GEMM_CASES = [
    # cell, T, B, I, H, proj, use_lengths, reverse
    ("lstm", 12, 24, 20, 48, 0, False, False),
    ("lstm", 12, 24, 20, 48, 0, True, True),
    ("lstm", 10, 20, 70, 40, 0, False, False),
    ("lstm", 10, 20, 30, 40, 24, True, False),
    ("gru", 12, 24, 40, 48, 0, False, False),
    ("gru", 12, 24, 40, 48, 0, True, True),
]
needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                  reason="this torch build has no oneDNN (mkldnn)")


def gemm_case(cell, T, B, I, H, proj, use_lengths, reverse):
    seed = hash((cell, T, B, I, H, proj, use_lengths, reverse)) % 10_000
    args64 = (make_layer_args(T, B, I, H, proj, True, "cpu", seed=seed) if cell == "lstm"
              else make_gru_args(T, B, I, H, True, "cpu", seed=seed))
    args32 = [a.detach().float().requires_grad_() if a is not None else None for a in args64]
    lengths = random_lengths(T, B, seed) if use_lengths else None
    return args64, args32, lengths


@needs_onednn
@pytest.mark.parametrize("cell,T,B,I,H,proj,use_lengths,reverse", GEMM_CASES)
@pytest.mark.parametrize("buffers", ["onednn-memory", "dense", "dense-in-blocks"])
def test_gradient_gemms_on_onednn_match_reference(monkeypatch, cell, T, B, I, H, proj, use_lengths, reverse, buffers):
    """With oneDNN's GEMMs, on operands that live in oneDNN's memory from the start (the gate
    gradients, and the LSTM's [x | h_{t-1}]: the default where oneDNN runs them), or on dense
    ones converted in one block of rows or in several (LSTM_FUSED_CPU_GEMM_BLOCK: here blocks of
    at most 50 kB, the last one shorter; 64 MB by default), the outputs and gradients
    are as close to the float64 result as
    torch.nn's float32 ones, or as those of our MKL path (which the rest of the suite holds to
    torch.nn's error), whichever is further off: the projected LSTM's float32 gradients at these
    sizes carry errors that vary by a few times between summation orders."""
    args64, args32, lengths = gemm_case(cell, T, B, I, H, proj, use_lengths, reverse)
    reference, layer = (lstm_layer_reference, lstm_layer) if cell == "lstm" else (gru_layer_reference, gru_layer)
    exact, weights = outputs_and_grads(reference, args64, lengths, reverse)
    theirs, _ = outputs_and_grads(lambda *a, lengths, reverse: torch_nn_layer(*a, lengths=lengths, reverse=reverse),
                                  args32, lengths, reverse, weights)
    monkeypatch.setenv("LSTM_FUSED_CPU_GEMM", "mkl")
    mkl, _ = outputs_and_grads(layer, args32, lengths, reverse, weights)
    monkeypatch.setenv("LSTM_FUSED_CPU_GEMM", "onednn")
    if buffers != "onednn-memory":
        monkeypatch.setenv("LSTM_FUSED_CPU_GEMM_BUFFERS", "dense")
    if buffers == "dense-in-blocks":
        monkeypatch.setenv("LSTM_FUSED_CPU_GEMM_BLOCK", "50000")
    onednn, _ = outputs_and_grads(layer, args32, lengths, reverse, weights)
    for k, (a, t, m, e) in enumerate(zip(onednn, theirs, mkl, exact)):
        yardstick = max((t, m), key=lambda r: (r.double() - e).abs().max().item() if r.numel() else 0.0)
        assert_error_bounded(a, yardstick, e, f"oneDNN, result {k}", floor=rounding_floor(e))


@needs_onednn
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the lookup by symbol is only relied on for Linux")
def test_gradient_gemm_operands_can_live_in_onednn_memory():
    """ATen's function that gives a oneDNN tensor's memory (looked up by its symbol at run time,
    csrc/gradient_gemms.cpp) is found in this torch: without it the backward silently falls back
    to copying its operands into oneDNN's tensors (~5% of a training step at B=128 H=512 on a
    Zen 3 EPYC, and 14% more peak memory)."""
    assert torch.ops.lstm_fused._onednn_operand_buffers()


@needs_onednn
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the lookup by symbol is only relied on for Linux")
def test_gradient_gemm_operands_in_onednn_memory_are_not_copied(monkeypatch):
    """Where the gradient GEMMs run on oneDNN, the LSTM backward hands oneDNN its gate gradients
    and [x | h_{t-1}] without converting them (no aten::to_mkldnn call in the profile), where
    dense operands (LSTM_FUSED_CPU_GEMM_BUFFERS=dense) are converted: the oneDNN-memory path
    is the one taken, not a fallback that gives the same numbers."""
    _, args32, _ = gemm_case("lstm", 12, 24, 20, 48, 0, False, False)
    monkeypatch.setenv("LSTM_FUSED_CPU_GEMM", "onednn")

    def conversions():
        out = lstm_layer(*args32)
        loss = out[0].square().sum()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            torch.autograd.grad(loss, [a for a in args32 if a is not None])
        return sum(e.count for e in prof.key_averages() if e.key == "aten::to_mkldnn")

    assert conversions() == 0
    monkeypatch.setenv("LSTM_FUSED_CPU_GEMM_BUFFERS", "dense")
    assert conversions() >= 2


@needs_onednn
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradient_gemms_follow_the_vendor_rule(monkeypatch, cell):
    """The default takes oneDNN on non-Intel x86 CPUs and MKL on Intel ones (and elsewhere): its
    weight gradients are bitwise those of the library it took, and the two libraries differ."""
    vendor = cpu_vendor()
    if vendor is None:
        pytest.skip("no vendor_id in /proc/cpuinfo here")
    _, args32, _ = gemm_case(cell, 24, 24, 40, 48, 0, False, False)
    layer = lstm_layer if cell == "lstm" else gru_layer

    def grads(gemm):
        if gemm is None:
            monkeypatch.delenv("LSTM_FUSED_CPU_GEMM", raising=False)
        else:
            monkeypatch.setenv("LSTM_FUSED_CPU_GEMM", gemm)
        out = layer(*args32)
        return torch.autograd.grad(out[0].square().sum(), [a for a in args32 if a is not None])

    default, onednn, mkl = grads(None), grads("onednn"), grads("mkl")
    w_ih = 3 if cell == "lstm" else 2
    if torch.equal(onednn[w_ih], mkl[w_ih]):
        pytest.skip("oneDNN and MKL agree bitwise on this CPU: the default's choice cannot be told from its result")
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    expected = onednn if x86 and vendor != "GenuineIntel" else mkl
    for k, (a, b) in enumerate(zip(default, expected)):
        assert torch.equal(a, b), f"vendor {vendor}, gradient {k}: the default took the other library"


@needs_onednn
def test_gradient_gemms_leave_float64_and_small_steps_to_mkl(monkeypatch):
    """float64 (which oneDNN does not do) runs whatever LSTM_FUSED_CPU_GEMM says, and gives the
    float64 reference's gradients. GEMMs below 2^20 multiply-adds or below 512 rows (the step of
    an LSTMCell at B=64) are MKL's under the vendor rule: the default gives MKL's gradients
    bitwise, where forcing oneDNN gives others."""
    monkeypatch.setenv("LSTM_FUSED_CPU_GEMM", "onednn")
    args64, _, _ = gemm_case("lstm", 12, 24, 20, 48, 0, False, False)
    exact, weights = outputs_and_grads(lstm_layer_reference, args64, None, False)
    ours, _ = outputs_and_grads(lstm_layer, args64, None, False, weights)
    for a, e in zip(ours, exact):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11)
    told_apart = []
    for T, B, I, H in [(3, 8, 16, 16), (1, 64, 200, 256)]:
        _, small, _ = gemm_case("lstm", T, B, I, H, 0, False, False)
        results = {}
        for gemm in (None, "mkl", "onednn"):
            if gemm is None:
                monkeypatch.delenv("LSTM_FUSED_CPU_GEMM", raising=False)
            else:
                monkeypatch.setenv("LSTM_FUSED_CPU_GEMM", gemm)
            out = lstm_layer(*small)
            results[gemm] = torch.autograd.grad(out[0].square().sum(), [a for a in small if a is not None])
        if all(torch.equal(a, b) for a, b in zip(results["mkl"], results["onednn"])):
            continue  # the two libraries agree bitwise on this CPU: nothing to tell apart (counted below)
        told_apart.append((T, B))
        for k, (a, b) in enumerate(zip(results[None], results["mkl"])):
            assert torch.equal(a, b), f"T={T} B={B} I={I} H={H}, gradient {k}: the default did not take MKL"
    if not told_apart:
        pytest.skip("oneDNN and MKL agree bitwise on this CPU at both sizes: the default's choice cannot be told apart")
