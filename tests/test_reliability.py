"""Reliability: mixed precision, determinism, long sequences and memory, threads, property-based
comparison with torch.nn, distributed training, and faults in the environment."""
import os
import runpy
import subprocess
import sys
import threading
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pack_sequence
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import lstm_fused
from lstm_fused import modules as fused_modules
from helpers import assert_error_bounded, run_with_grads

ROOT = os.path.join(os.path.dirname(__file__), "..")
PAIRS = {"LSTM": (lstm_fused.LSTM, nn.LSTM), "GRU": (lstm_fused.GRU, nn.GRU),
         "LSTMCell": (lstm_fused.LSTMCell, nn.LSTMCell), "GRUCell": (lstm_fused.GRUCell, nn.GRUCell)}


def make_pair(cell, seed=0, device="cpu", **kwargs):
    ours_class, torch_class = PAIRS[cell]
    torch.manual_seed(seed)
    ref = torch_class(**kwargs).to(device)
    ours = ours_class(**kwargs).to(device)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


# --- mixed precision ---------------------------------------------------------------------------
#
# Under CPU autocast what torch.nn does depends on the CPU. nn.LSTM without projection on a padded
# input runs oneDNN's RNN where ATen's use_mkldnn chooses it (a float32 input; a bfloat16 one where
# oneDNN has bfloat16 on this CPU; a float16 one outside grad mode where it has float16), and its
# mkldnn_rnn_layer is on autocast's list, so all its results come in the autocast dtype; or, where
# oneDNN has no primitive for that dtype on this CPU, nn.LSTM raises "could not create a primitive
# descriptor" (bfloat16 on an AVX2 EPYC; float16 with gradients on this project's AVX-512 FP16
# Xeon). Everything else runs torch.nn's composite cell. So these tests ask torch.nn on the machine
# at hand: where it returns, ours gives its dtypes; where it raises, ours does not, and gives what
# that oneDNN path gives where the primitive exists: the autocast dtype for the module's results,
# the leaves' own dtypes for their gradients. Either way ours computes in float32 and rounds once,
# so its values are the float32 computation (ours without autocast, on the same values in float32)
# to the autocast dtype's precision, and no farther from it than torch.nn's are.

ONEDNN_MISSING = "could not create a primitive descriptor"
HALF_TYPES = (torch.float16, torch.bfloat16)


class _OneDNNWithoutHalfTypes(TorchDispatchMode):
    """oneDNN as on a CPU without half-type RNN kernels (an AVX2 EPYC): no primitive for a
    half-type LSTM layer."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mkldnn_rnn_layer.default and args[0].dtype in HALF_TYPES:
            raise RuntimeError(f"{ONEDNN_MISSING} for the LSTM forward propagation primitive (simulated)")
        return func(*args, **(kwargs or {}))


class _OnACpuWithoutHalfOneDNN:
    """A torch.nn module run as it runs on such a CPU: use_mkldnn refuses a half-type input there
    (as it refuses every input with oneDNN switched off), which takes the composite cell; a float32
    input takes oneDNN's RNN, which autocast casts to a half type that has no primitive there."""

    def __init__(self, module):
        self.module = module

    def parameters(self):
        return self.module.parameters()

    def __call__(self, *args):
        x = args[0].data if isinstance(args[0], PackedSequence) else args[0]
        if x.dtype in HALF_TYPES:
            with warnings.catch_warnings():  # flags() warns about Intel GPUs' TF32 every time
                warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
                with torch.backends.mkldnn.flags(enabled=False):
                    return self.module(*args)
        with _OneDNNWithoutHalfTypes():
            return self.module(*args)


@pytest.fixture(params=["this-cpu", "cpu-without-half-onednn"])
def as_on_cpu(request, monkeypatch):
    """How a torch.nn module runs: as it does on this machine, or as on a CPU whose oneDNN has
    neither bfloat16 nor float16 (simulated: torch's two support questions answer False, our
    modules ask them again, and torch.nn runs as _OnACpuWithoutHalfOneDNN says)."""
    if request.param == "this-cpu":
        return lambda module: module
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False)
    monkeypatch.setattr(fused_modules, "_ONEDNN_HALF_TYPES", fused_modules._ask_onednn_half_types())
    assert fused_modules._ONEDNN_HALF_TYPES == ()
    return _OnACpuWithoutHalfOneDNN


def _results(out):
    """A module's floating-point results, flat (a packed output by its data)."""
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


def check_like_torch_nn(run_torch, run_ours, run_float32, low, leaf_dtypes=()):
    """Each run_* gives a flat list: the module's results, then the gradients of leaves of
    `leaf_dtypes` (if any). Checks ours against torch.nn as the section's comment says; returns
    whether torch.nn raised."""
    try:
        theirs = run_torch()
    except RuntimeError as error:
        if ONEDNN_MISSING not in str(error):
            raise
        theirs = None
    ours, exact = run_ours(), run_float32()
    assert len(ours) == len(exact) and (theirs is None or len(theirs) == len(ours))
    if theirs is None:
        expected = [low] * (len(ours) - len(leaf_dtypes)) + list(leaf_dtypes)
    else:
        expected = [t.dtype for t in theirs]
    assert [t.dtype for t in ours] == expected, f"torch.nn {'raised' if theirs is None else 'returned'}"
    eps, tiny = torch.finfo(low).eps, torch.finfo(low).tiny
    for k, (a, e) in enumerate(zip(ours, exact)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), e.float(), rtol=eps, atol=tiny)
        if theirs is not None:
            assert_error_bounded(a, theirs[k], e, f"result {k}", factor=1.0,
                                 floor=eps * e.abs().max().item() if e.numel() else 0.0)
    return theirs is None


@pytest.mark.parametrize("dtype", [pytest.param(dtype, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here")) for dtype in (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_cuda_autocast_gives_torch_dtypes_and_float32_values(cell, dtype):
    """On CUDA torch.nn's RNNs (cuDNN) and ours run in the autocast dtype."""
    device = "cuda"
    ours, ref = make_pair(cell, device=device, input_size=5, hidden_size=16, num_layers=2)
    x = torch.randn(7, 3, 5, device=device, requires_grad=True)
    with torch.autocast(device, dtype=dtype):
        outs_ref, grads_ref, w = run_with_grads(ref, x)
        outs, grads, _ = run_with_grads(ours, x, weights=w)
    outs32, grads32, _ = run_with_grads(ours, x, weights=w)
    for a, b, exact in zip(outs + grads, outs_ref + grads_ref, outs32 + grads32):
        assert a.dtype == b.dtype, "same dtype as torch.nn under autocast"
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), exact.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_cpu_autocast_with_gradients_follows_torch_nn(as_on_cpu, cell, low):
    ours, ref = make_pair(cell, input_size=5, hidden_size=16, num_layers=2)
    x = torch.randn(7, 3, 5, requires_grad=True)
    _, _, weights = run_with_grads(ours, x)
    # The loss weights exact in the low dtype: the loss's own backward then rounds nothing.
    weights = [w.to(low).double() for w in weights]

    def run(module, autocast):
        with torch.autocast("cpu", dtype=low, enabled=autocast):
            outs, grads, _ = run_with_grads(module, x, weights=weights)
        return outs + grads

    leaf_dtypes = [x.dtype] + [p.dtype for p in ours.parameters()]
    check_like_torch_nn(lambda: run(as_on_cpu(ref), True), lambda: run(ours, True), lambda: run(ours, False), low,
                        leaf_dtypes)


def _to_float32(hx):
    return None if hx is None else tree_map(lambda s: s.float(), hx)


@pytest.mark.parametrize("grad_mode", [True, False])
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("proj_size", [0, 2])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("state_dtypes", [None, (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_lstm_under_cpu_autocast_follows_torch_nn_for_every_state_dtype(as_on_cpu, proj_size, input_dtype,
                                                                        state_dtypes, low, grad_mode):
    """nn.LSTM's oneDNN path (no projection, a padded input it accepts) gives the autocast dtype;
    its composite cell gives c_n (and y, h_n without a projection) in the autocast dtype promoted
    with c_0's, or the input's; grad mode decides whether a float16 input may take oneDNN."""
    ours, ref = make_pair("LSTM", input_size=4, hidden_size=6, proj_size=proj_size, num_layers=2)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 3, 4, generator=gen).to(input_dtype)
    hx = None if state_dtypes is None else (torch.randn(2, 3, proj_size or 6, generator=gen).to(state_dtypes[0]),
                                            torch.randn(2, 3, 6, generator=gen).to(state_dtypes[1]))

    def run(module, x, hx, autocast):
        with torch.set_grad_enabled(grad_mode), torch.autocast("cpu", dtype=low, enabled=autocast):
            return _results(module(x, hx))

    check_like_torch_nn(lambda: run(as_on_cpu(ref), x, hx, True), lambda: run(ours, x, hx, True),
                        lambda: run(ours, x.float(), _to_float32(hx), False), low)


def test_lstm_state_as_a_list_under_cpu_autocast(as_on_cpu):
    """A list (h0, c0) is accepted as a tuple is, under autocast too (it had hit hx.to)."""
    ours, ref = make_pair("LSTM", input_size=4, hidden_size=6)
    x = torch.randn(5, 3, 4)
    hx = [torch.randn(1, 3, 6), torch.randn(1, 3, 6)]

    def run(module, autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return _results(module(x, hx))

    check_like_torch_nn(lambda: run(as_on_cpu(ref), True), lambda: run(ours, True), lambda: run(ours, False),
                        torch.bfloat16)


@pytest.mark.parametrize("cell,proj_size", [("LSTM", 0), ("LSTM", 2), ("GRU", 0)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("state_dtype", [None, torch.float32, torch.bfloat16])
def test_cpu_autocast_dtypes_of_composite_paths_match_torch_nn(as_on_cpu, cell, proj_size, packed, input_dtype,
                                                               state_dtype):
    """On the CPU nn.GRU, and nn.LSTM with a projection or a packed input, run a composite cell
    under autocast: the results take the autocast dtype promoted with the last state's dtype.
    Ours had returned bf16 for a packed LSTM (nn: float32) and refused a GRU whose h_0 dtype
    differs from the input's. (The padded LSTM without projection is here for contrast.)"""
    kwargs = {"proj_size": proj_size} if proj_size else {}
    ours, ref = make_pair(cell, input_size=4, hidden_size=6, **kwargs)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(5, 3, 4, generator=gen).to(input_dtype)
    hx = None
    if state_dtype is not None:
        h0 = torch.randn(1, 3, proj_size or 6, generator=gen).to(state_dtype)
        hx = (h0, torch.randn(1, 3, 6, generator=gen).to(state_dtype)) if cell == "LSTM" else h0

    def run(module, x, hx, autocast):
        if packed:
            x = pack_padded_sequence(x, torch.tensor([5, 4, 2]))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return _results(module(x, hx))

    check_like_torch_nn(lambda: run(as_on_cpu(ref), x, hx, True), lambda: run(ours, x, hx, True),
                        lambda: run(ours, x.float(), _to_float32(hx), False), torch.bfloat16)


def test_where_onednn_lacks_the_half_type_nn_lstm_raises_and_ours_computes(monkeypatch):
    """What the AVX2 EPYC showed, simulated on any CPU: under bfloat16 autocast nn.LSTM on a
    float32 input raises (oneDNN has no bfloat16 primitive there) and ours returns bfloat16; on a
    bfloat16 input with float32 states nn.LSTM's composite cell returns float32, and so does ours
    there, where on a CPU with bfloat16 oneDNN both return bfloat16. Also float16 with gradients,
    which raises in nn.LSTM on this project's AVX-512 FP16 Xeon as well."""
    ours, ref = make_pair("LSTM", input_size=4, hidden_size=6)
    x = torch.randn(5, 3, 4)
    hx = (torch.randn(1, 3, 6), torch.randn(1, 3, 6))
    without = _OnACpuWithoutHalfOneDNN(ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match=ONEDNN_MISSING):
            without(x, hx)
        assert {t.dtype for t in _results(ours(x, hx))} == {torch.bfloat16}
        composite = _results(without(x.bfloat16(), hx))
        assert {t.dtype for t in composite} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(RuntimeError, match=ONEDNN_MISSING):
        without(x, hx)
    monkeypatch.setattr(fused_modules, "_ONEDNN_HALF_TYPES", ())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert [t.dtype for t in _results(ours(x.bfloat16(), hx))] == [t.dtype for t in composite]
    monkeypatch.setattr(fused_modules, "_ONEDNN_HALF_TYPES", (torch.bfloat16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert {t.dtype for t in _results(ours(x.bfloat16(), hx))} == {torch.bfloat16}


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("input_dtype,state_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                     (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                     (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)])
@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell"])
def test_cells_under_cpu_autocast_give_torch_dtypes(cell, input_dtype, state_dtype, low):
    """torch.nn's cells are composite on the CPU: autocast casts their products, and the results
    take the autocast dtype promoted with the state's (or the input's). The fused cells refused a
    half input or state there ("w_ih has dtype Float")."""
    ours, ref = make_pair(cell, input_size=5, hidden_size=16)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, generator=gen).to(input_dtype)
    hx = None
    if state_dtype is not None:
        states = [torch.randn(4, 16, generator=gen).to(state_dtype) for _ in range(2 if cell == "LSTMCell" else 1)]
        hx = tuple(states) if cell == "LSTMCell" else states[0]
    with torch.autocast("cpu", dtype=low):
        out_ref, out = ref(x, hx), ours(x, hx)
    with torch.no_grad():
        exact = ours(x.float(), None if hx is None else tree_map(lambda s: s.float(), hx))
    flat = lambda v: list(v) if isinstance(v, tuple) else [v]  # noqa: E731
    for a, b, e in zip(flat(out), flat(out_ref), flat(exact)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), e.float(), rtol=0.02, atol=0.02)
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)


# --- determinism -------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_identical_runs_are_bitwise_identical(device, cell):
    results = []
    for _ in range(2):
        ours, _ = make_pair(cell, seed=3, device=device, input_size=6, hidden_size=33, num_layers=2,
                            bidirectional=True, dropout=0.3)
        torch.manual_seed(5)  # the dropout masks
        x = torch.randn(9, 4, 6, device=device, requires_grad=True)
        outs, grads, _ = run_with_grads(ours, x)
        results.append(outs + grads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# --- long sequences and memory -----------------------------------------------------------------

@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
@pytest.mark.parametrize("gemm", [None, "onednn"])
def test_long_sequence_is_finite_and_matches_torch(monkeypatch, cell, gemm):
    """Also with the gradient GEMMs on oneDNN whatever the CPU's vendor (LSTM_FUSED_CPU_GEMM): its
    weight and bias gradients over 20000 rows are as close to float64 as torch.nn's."""
    if gemm is not None:
        if not torch.backends.mkldnn.is_available():
            pytest.skip("this torch build has no oneDNN (mkldnn)")
        monkeypatch.setenv("LSTM_FUSED_CPU_GEMM", gemm)
    ours, ref = make_pair(cell, input_size=8, hidden_size=32)
    exact = make_pair(cell, input_size=8, hidden_size=32)[1].double()
    x = torch.randn(5000, 4, 8, requires_grad=True)
    outs_exact, grads_exact, w = run_with_grads(exact, x.detach().double().requires_grad_())
    outs_ref, grads_ref, _ = run_with_grads(ref, x, weights=w)
    outs, grads, _ = run_with_grads(ours, x, weights=w)
    for a, b, e in zip(outs + grads, outs_ref + grads_ref, outs_exact + grads_exact):
        assert torch.isfinite(a).all()
        assert_error_bounded(a, b, e, f"{cell} T=5000", floor=1e-5)


MEMORY_SCRIPT = """
import os, sys, threading, time, torch, lstm_fused
from torch import nn
impl, T = sys.argv[1], int(sys.argv[2])
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
torch.manual_seed(0)
model = (lstm_fused.LSTM if impl == "fused" else nn.LSTM)(16, 128)
x = torch.randn(T, 16, 16, requires_grad=True)
model(x[:2])[0].sum().backward()  # warm-up outside the measurement
x.grad = None
for p in model.parameters():
    p.grad = None
before, peak, done = rss(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.0005)
sampler = threading.Thread(target=sample)
sampler.start()
out, _ = model(x)
out.sum().backward()
peak[0] = max(peak[0], rss())
done.set()
sampler.join()
print((peak[0] - before) / 2**20)
"""


def _training_peak_mb(impl, seq_len):
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, impl, str(seq_len)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.split()[-1])


def test_training_memory_grows_linearly_and_stays_under_nn_lstm():
    ours = {T: _training_peak_mb("fused", T) for T in (2500, 5000)}
    theirs = _training_peak_mb("torch", 5000)
    growth = ours[5000] / ours[2500]
    assert 1.6 < growth < 2.4, f"peak memory should double with T: {ours}"
    assert ours[5000] <= 1.05 * theirs, f"ours {ours[5000]:.0f} MB, nn.LSTM {theirs:.0f} MB at T=5000"


# --- threads -----------------------------------------------------------------------------------

@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_four_threads_calling_one_module(cell):
    ours, _ = make_pair(cell, input_size=5, hidden_size=24, num_layers=2)
    inputs = [torch.randn(12, 3 + k, 5) for k in range(4)]
    with torch.no_grad():
        expected = [ours(x)[0] for x in inputs]
    results, errors = [None] * 4, []

    def work(k):
        try:
            with torch.no_grad():
                for _ in range(5):
                    results[k] = ours(inputs[k])[0]
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got, want in zip(results, expected):
        assert torch.equal(got, want)


# --- property-based comparison -----------------------------------------------------------------

@st.composite
def rnn_cases(draw, cell):
    hidden = draw(st.integers(1, 7))
    config = dict(
        input_size=draw(st.integers(1, 5)),
        hidden_size=hidden,
        num_layers=draw(st.integers(1, 3)),
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        bidirectional=draw(st.booleans()),
    )
    if cell == "LSTM" and hidden > 1:
        config["proj_size"] = draw(st.integers(0, hidden - 1))
    lengths = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    packed = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return config, lengths, packed, seed


def _property_check(cell, case):
    config, lengths, packed, seed = case
    ours, ref = make_pair(cell, seed=seed, **config)
    ours.double(), ref.double()
    gen = torch.Generator().manual_seed(seed)
    if packed:
        seqs = [torch.randn(n, config["input_size"], generator=gen, dtype=torch.float64) for n in lengths]
        inputs = pack_sequence(seqs, enforce_sorted=False)
        inputs.data.requires_grad_()
    else:
        T, B = max(lengths), len(lengths)
        shape = (B, T, config["input_size"]) if config["batch_first"] else (T, B, config["input_size"])
        inputs = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    outs_ref, grads_ref, w = run_with_grads(ref, inputs)
    outs, grads, _ = run_with_grads(ours, inputs, weights=w)
    for a, b in zip(outs + grads, outs_ref + grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


@settings(max_examples=150, deadline=None)
@given(rnn_cases("LSTM"))
def test_property_lstm_matches_nn_lstm(case):
    _property_check("LSTM", case)


@settings(max_examples=150, deadline=None)
@given(rnn_cases("GRU"))
def test_property_gru_matches_nn_gru(case):
    _property_check("GRU", case)


# --- distributed -------------------------------------------------------------------------------

class _LastStepRegressor(nn.Module):
    def __init__(self, lstm_class=lstm_fused.LSTM):
        super().__init__()
        self.lstm = lstm_class(4, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def _train(model, parameters_of, rank, world_size, steps, dtype=torch.float32):
    """SGD on a fixed stream of batches; each rank takes its shard. Returns the first step's grads."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    first_grads = None
    for step in range(steps):
        x = torch.randn(8, 5, 4, generator=gen).to(dtype)
        y = torch.randn(8, 1, generator=gen).to(dtype)
        shard = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
        loss = nn.functional.mse_loss(model(x[shard]), y[shard])
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in parameters_of.named_parameters()}
        optimizer.step()
    return first_grads


def _ddp_worker(rank, world_size, init_file, out_dir, steps):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = _LastStepRegressor()
    grads = _train(DistributedDataParallel(model), model, rank, world_size, steps)
    torch.save({"grads": grads, "params": {n: p.detach() for n, p in model.named_parameters()}},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_gloo_two_processes_match_full_batch(tmp_path):
    import torch.multiprocessing as mp

    steps = 3
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), steps), nprocs=2, join=True)
    torch.manual_seed(0)
    model = _LastStepRegressor()
    # The full batch in float32 by ours and by torch.nn, and in float64 by torch.nn, from the same
    # start: the sharded run's sums differ from the full batch's in float32 by what rounding gives,
    # so each is held to torch.nn's own float32 error against float64.
    start = {name: value.clone() for name, value in model.state_dict().items()}
    full_batch_grads = _train(model, model, 0, 1, steps)
    models = {}
    for dtype in (torch.float32, torch.float64):
        models[dtype] = _LastStepRegressor(nn.LSTM)
        models[dtype].load_state_dict(start)
        models[dtype].to(dtype)
    theirs = _train(models[torch.float32], models[torch.float32], 0, 1, steps)
    exact = _train(models[torch.float64], models[torch.float64], 0, 1, steps, dtype=torch.float64)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    final = {dtype: dict(m.named_parameters()) for dtype, m in models.items()}
    for name, p in model.named_parameters():
        for what, grads, params in [(f"rank {r}", ranks[r]["grads"], ranks[r]["params"]) for r in range(2)] + [
                ("full batch", full_batch_grads, dict(model.named_parameters()))]:
            assert_error_bounded(grads[name], theirs[name], exact[name], f"{what}, first gradient of {name}")
            assert_error_bounded(params[name], final[torch.float32][name], final[torch.float64][name],
                                 f"{what}, final {name}")
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), "ranks out of sync"


# --- faults in the environment -----------------------------------------------------------------

def _load_setup_py():
    return runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="setup_under_test")


def test_build_without_nvcc_falls_back_to_cpu(monkeypatch, capsys):
    setup_py = _load_setup_py()
    monkeypatch.delenv("FORCE_CUDA", raising=False)
    monkeypatch.delenv("LSTM_FUSED_CPU_ONLY", raising=False)
    decide_cuda = setup_py["decide_cuda"]
    decide_cuda.__globals__["find_cuda_home"] = lambda: None
    assert decide_cuda() is None
    assert "building the CPU kernels only" in capsys.readouterr().out
    monkeypatch.setenv("FORCE_CUDA", "1")
    with pytest.raises(SystemExit, match="FORCE_CUDA=1"):
        decide_cuda()


def test_missing_extension_raises_import_error_saying_how_to_build():
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'lstm_fused._C':\n"
        "            raise ImportError('simulated: no compiled extension')\n"
        "sys.meta_path.insert(0, Block())\n"
        "try:\n"
        "    import lstm_fused\n"
        "except ImportError as error:\n"
        "    print('IMPORT-ERROR:', error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "IMPORT-ERROR:" in done.stdout, done.stderr
    assert "pip install --no-build-isolation -e ." in done.stdout


@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU-only torch has no CUDA dispatch to test")
def test_cuda_inputs_to_a_cpu_only_build_raise_a_clear_error():
    """Every op has a CUDA kernel: the real one, or (in a CPU-only build) one that explains."""
    for op in ("lstm_layer_forward", "lstm_layer_backward", "gru_layer_forward", "gru_layer_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lstm_fused::{op}", "CUDA")
    dump = torch._C._dispatch_dump("lstm_fused::lstm_layer_forward")
    if "cuda_missing.cpp" not in dump:
        pytest.skip("this build has the real CUDA kernels")
    x = torch.randn(3, 2, 4)
    args = (x, torch.zeros(2, 5), torch.zeros(2, 5), torch.randn(20, 4), torch.randn(20, 5), None, None, None, None,
            False)
    cuda_keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises(RuntimeError, match="no CUDA kernels"):
        torch.ops.lstm_fused.lstm_layer_forward.default.redispatch(cuda_keys, *args)
