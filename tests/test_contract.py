"""The torch.nn contract (LSTM, LSTMCell, GRU, GRUCell): packed sequences, modes, edge inputs,
the module surface, and torch.compile. PyTorch's own module samples are in test_torch_samples.py."""
import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence
from torch.utils._pytree import tree_flatten

import lstm_fused
from helpers import assert_error_bounded, run_with_grads

PAIRS = {nn.LSTM: lstm_fused.LSTM, nn.LSTMCell: lstm_fused.LSTMCell,
         nn.GRU: lstm_fused.GRU, nn.GRUCell: lstm_fused.GRUCell}


def _packed_batch(lengths, input_size, seed):
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randn(n, input_size, generator=gen, dtype=torch.float64) for n in lengths]
    return pack_sequence(seqs, enforce_sorted=False)


@pytest.mark.parametrize("lengths", [[3, 7, 1, 5], [4, 4, 2], [1], [6, 2, 6, 1, 3]])
def test_packed_bidirectional_multilayer_projection(lengths):
    kwargs = dict(input_size=3, hidden_size=5, num_layers=3, bidirectional=True, proj_size=2)
    torch.manual_seed(len(lengths))
    ref = nn.LSTM(**kwargs).double()
    ours = lstm_fused.LSTM(**kwargs).double()
    ours.load_state_dict(ref.state_dict())
    packed = _packed_batch(lengths, 3, seed=sum(lengths))
    packed.data.requires_grad_()
    B = len(lengths)
    hx = (torch.randn(6, B, 2, dtype=torch.float64, requires_grad=True),
          torch.randn(6, B, 5, dtype=torch.float64, requires_grad=True))
    outs_ref, grads_ref, w = run_with_grads(ref, packed, hx)
    outs, grads, _ = run_with_grads(ours, packed, hx, w)
    for a, b in zip(outs + grads, outs_ref + grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("torch_class", [nn.LSTM, nn.GRU])
def test_packed_output_keeps_the_callers_order(torch_class):
    ref = torch_class(2, 4).double()
    ours = PAIRS[torch_class](2, 4).double()
    ours.load_state_dict(ref.state_dict())
    packed = _packed_batch([2, 5, 3], 2, seed=1)
    out_ref, _ = ref(packed)
    out, _ = ours(packed)
    assert torch.equal(out.sorted_indices, out_ref.sorted_indices)
    assert torch.equal(out.unsorted_indices, out_ref.unsorted_indices)
    padded, lengths = pad_packed_sequence(out)
    padded_ref, lengths_ref = pad_packed_sequence(out_ref)
    assert torch.equal(lengths, lengths_ref)
    torch.testing.assert_close(padded, padded_ref, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("module_class", [lstm_fused.LSTM, lstm_fused.GRU])
def test_backward_in_eval_mode(module_class):
    ours = module_class(3, 4, num_layers=2, dropout=0.5).eval()
    x = torch.randn(5, 2, 3, requires_grad=True)
    out, _ = ours(x)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_dropout_on_in_training_off_in_eval():
    torch.manual_seed(0)
    ref = nn.LSTM(4, 8, num_layers=2, dropout=0.5)
    ours = lstm_fused.LSTM(4, 8, num_layers=2, dropout=0.5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, 4)
    ours.train()
    first, _ = ours(x)
    second, _ = ours(x)
    assert not torch.allclose(first, second), "dropout must change the output in training"
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x)[0], ref(x)[0])
    torch.testing.assert_close(ours(x)[0], ours(x)[0], rtol=0, atol=0)
    # The last layer has no dropout: with one layer, training gives the eval output.
    single = lstm_fused.LSTM(4, 8, num_layers=1, dropout=0.0).train()
    torch.testing.assert_close(single(x)[0], single.eval()(x)[0], rtol=0, atol=0)


def _both(seed=0, **kwargs):
    torch.manual_seed(seed)
    ref = nn.LSTM(**kwargs)
    ours = lstm_fused.LSTM(**kwargs)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_propagate_like_nn_lstm(value):
    ours, ref = _both(input_size=3, hidden_size=4, num_layers=2)
    x = torch.randn(5, 3, 3)
    x[2, 1, 0] = value
    for a, b in zip(tree_flatten(ours(x))[0], tree_flatten(ref(x))[0]):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_empty_batch():
    ours, ref = _both(input_size=3, hidden_size=4, num_layers=2)
    x = torch.randn(5, 0, 3, requires_grad=True)
    out, (h, c) = ours(x)
    out_ref, (h_ref, c_ref) = ref(x)
    assert out.shape == out_ref.shape and h.shape == h_ref.shape and c.shape == c_ref.shape
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_zero_length_sequence_raises_like_nn_lstm():
    ours, ref = _both(input_size=3, hidden_size=4)
    x = torch.randn(0, 2, 3)
    with pytest.raises(RuntimeError):
        ref(x)
    with pytest.raises(RuntimeError):
        ours(x)


def test_non_contiguous_input_and_state():
    ours, ref = _both(input_size=4, hidden_size=5, num_layers=2, batch_first=True)
    ours.double(), ref.double()
    x = torch.randn(4, 9, 6, dtype=torch.float64)[:, ::2, 1:5].requires_grad_()
    h0 = torch.randn(5, 4, 2, dtype=torch.float64).permute(2, 1, 0).requires_grad_()
    c0 = torch.randn(5, 4, 2, dtype=torch.float64).permute(2, 1, 0).requires_grad_()
    assert not x.is_contiguous() and not h0.is_contiguous()
    outs_ref, grads_ref, w = run_with_grads(ref, x, (h0, c0))
    outs, grads, _ = run_with_grads(ours, x, (h0, c0), w)
    for a, b in zip(outs + grads, outs_ref + grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def test_module_surface():
    ours, ref = _both(input_size=3, hidden_size=4, num_layers=2, bidirectional=True, proj_size=2)
    ours.flatten_parameters()
    assert repr(ours).replace("lstm_fused.", "") == repr(ref)
    assert ours.extra_repr() == ref.extra_repr()
    assert [[p.shape for p in layer] for layer in ours.all_weights] == [
        [p.shape for p in layer] for layer in ref.all_weights]
    x = torch.randn(5, 2, 3)
    restored = pickle.loads(pickle.dumps(ours))
    torch.testing.assert_close(restored(x)[0], ours(x)[0], rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x)[0], ours(x)[0], rtol=0, atol=0)
    twin = copy.deepcopy(ours)
    torch.testing.assert_close(twin(x)[0], ours(x)[0], rtol=0, atol=0)

    doubled = copy.deepcopy(ours).double()
    assert all(p.dtype == torch.float64 for p in doubled.parameters())
    torch.testing.assert_close(doubled(x.double())[0], ref.double()(x.double())[0], rtol=1e-7, atol=1e-10)
    half = copy.deepcopy(ours).half()
    assert all(p.dtype == torch.float16 for p in half.parameters())
    moved = copy.deepcopy(ours).to(torch.float64)
    assert moved.weight_ih_l0.dtype == torch.float64


def test_functional_call_uses_the_given_weights():
    ours, _ = _both(input_size=3, hidden_size=4)
    x = torch.randn(5, 2, 3)
    zeros = {name: torch.zeros_like(p) for name, p in ours.named_parameters()}
    out, (h, c) = torch.func.functional_call(ours, zeros, (x,))
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(c, torch.zeros_like(c))
    out_again, _ = ours(x)
    assert out_again.abs().sum() > 0, "functional_call must not change the module's own weights"



@pytest.mark.parametrize("torch_class", [nn.LSTM, nn.GRU])
def test_functional_call_with_weights_of_another_dtype(torch_class):
    """functional_call with float64 weights on a float32 module runs in float64, as on torch.nn
    (the dtype check must read the weights given, not a cache of the module's own)."""
    torch.manual_seed(0)
    ref = torch_class(3, 5)
    ours = PAIRS[torch_class](3, 5)
    ours.load_state_dict(ref.state_dict())
    weights = {name: p.detach().double() for name, p in ref.named_parameters()}
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    expected = torch.func.functional_call(ref, weights, (x,))
    got = torch.func.functional_call(ours, weights, (x,))
    for a, b in zip(tree_flatten(got)[0], tree_flatten(expected)[0]):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError):  # and a float64 input to the float32 module itself is refused
        ours(x)


def test_lstm_cell_float64_with_grads():
    torch.manual_seed(0)
    ref = nn.LSTMCell(5, 7).double()
    ours = lstm_fused.LSTMCell(5, 7).double()
    ours.load_state_dict(ref.state_dict())
    for batched in (True, False):
        shape = (3, 5) if batched else (5,)
        state = (3, 7) if batched else (7,)
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        hx = tuple(torch.randn(*state, dtype=torch.float64, requires_grad=True) for _ in range(2))
        for with_state in (True, False):
            args = (x, hx) if with_state else (x,)
            inputs = [x] + (list(hx) if with_state else [])
            out_ref = ref(*args)
            out = ours(*args)
            g_ref = torch.autograd.grad(out_ref[0].sum() + 2 * out_ref[1].sum(), inputs + list(ref.parameters()))
            g = torch.autograd.grad(out[0].sum() + 2 * out[1].sum(), inputs + list(ours.parameters()))
            for a, b in zip(list(out) + list(g), list(out_ref) + list(g_ref)):
                torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)



def _cell_call(cell, x, state):
    return cell(x, state) if isinstance(cell, (nn.LSTMCell, lstm_fused.LSTMCell)) else cell(x, state[0])


@pytest.mark.parametrize("torch_class", [nn.LSTMCell, nn.GRUCell])
@pytest.mark.parametrize("input_size,hidden_size", [(0, 4), (3, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cells_with_an_empty_size_match_torch_nn(torch_class, input_size, hidden_size, dtype):
    """torch.nn's cells accept input_size 0 (the gates come from h and the biases alone) and
    hidden_size 0; BLAS refuses such empty products, so the kernels must handle them."""
    torch.manual_seed(0)
    ref = torch_class(input_size, hidden_size, dtype=dtype)
    ours = PAIRS[torch_class](input_size, hidden_size, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, input_size, dtype=dtype)
    state = (torch.randn(5, hidden_size, dtype=dtype), torch.randn(5, hidden_size, dtype=dtype))
    for a, b in zip(tree_flatten(_cell_call(ours, x, state))[0], tree_flatten(_cell_call(ref, x, state))[0]):
        torch.testing.assert_close(a, b)


CELL_BAD_INPUTS = {
    "float64 input, float32 cell": lambda: (torch.randn(3, 4, dtype=torch.float64), None),
    "batched input, 1-D state": lambda: (torch.randn(2, 4), torch.randn(6)),
    "unbatched input, 2-D state": lambda: (torch.randn(4), torch.randn(1, 6)),
    "state batch mismatch": lambda: (torch.randn(2, 4), torch.randn(3, 6)),
    "3-D input": lambda: (torch.randn(1, 2, 4), None),
    "bfloat16 input, float32 cell": lambda: (torch.randn(3, 4, dtype=torch.bfloat16), None),
}


@pytest.mark.parametrize("torch_class", [nn.LSTMCell, nn.GRUCell])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cells_in_half_precision_on_the_cpu(torch_class, dtype):
    """torch.nn's cells run float16 and bfloat16 on the CPU; ours compute those in float32 and
    return the same dtype, with gradients in it too, within the half type's rounding of the
    float64 result (at most twice torch.nn's own error, plus one rounding step)."""
    torch.manual_seed(0)
    ref = torch_class(6, 10).to(dtype)
    ours = PAIRS[torch_class](6, 10).to(dtype)
    ours.load_state_dict(ref.state_dict())
    exact = copy.deepcopy(ref).double()
    x = torch.randn(4, 6).to(dtype)
    h = torch.randn(4, 10).to(dtype)
    state = (h, h) if torch_class is nn.LSTMCell else h
    state64 = (h.double(), h.double()) if torch_class is nn.LSTMCell else h.double()
    results = []
    for model, inputs in ((ours, (x, state)), (ref, (x, state)), (exact, (x.double(), state64))):
        out = tree_flatten(model(*inputs))[0]
        grads = torch.autograd.grad(sum(o.float().sum() for o in out), list(model.parameters()))
        results.append(out + list(grads))
    for a, b, e in zip(*results):
        assert a.dtype == dtype
        ours_error = (a.double() - e).abs().max().item()
        torch_error = (b.double() - e).abs().max().item()
        assert ours_error <= 2 * torch_error + torch.finfo(dtype).eps * e.abs().max().item(), (ours_error, torch_error)


@pytest.mark.parametrize("torch_class", [nn.LSTMCell, nn.GRUCell])
@pytest.mark.parametrize("case", list(CELL_BAD_INPUTS))
def test_cell_bad_input_raises_like_torch_nn(torch_class, case):
    ref, ours = torch_class(4, 6), PAIRS[torch_class](4, 6)
    x, h = CELL_BAD_INPUTS[case]()
    args = (x,) if h is None else (x, (h, h)) if torch_class is nn.LSTMCell else (x, h)
    with pytest.raises(Exception) as ref_error:
        ref(*args)
    with pytest.raises(type(ref_error.value)):
        ours(*args)


@pytest.mark.parametrize("torch_class", [nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell])
def test_parametrized_weights_are_followed_like_torch_nn(torch_class):
    """A parametrization (here weight norm on weight_hh) replaces the parameter by a computed
    tensor read through the module's attribute; the modules must read it there on every call,
    and gradients must reach the parametrization's own parameters."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    ref = torch_class(3, 5).double()
    ours = PAIRS[torch_class](3, 5).double()
    ours.load_state_dict(ref.state_dict())
    name = "weight_hh_l0" if torch_class in (nn.LSTM, nn.GRU) else "weight_hh"
    weight_norm(ref, name), weight_norm(ours, name)
    with torch.no_grad():  # change the norm: the computed weight must change with it
        ref.parametrizations[name].original0.mul_(1.5)
        ours.parametrizations[name].original0.mul_(1.5)
    x = torch.randn(4, 2, 3, dtype=torch.float64) if torch_class in (nn.LSTM, nn.GRU) else \
        torch.randn(2, 3, dtype=torch.float64)
    out_ref, out = tree_flatten(ref(x))[0], tree_flatten(ours(x))[0]
    for a, b in zip(out, out_ref):
        torch.testing.assert_close(a, b)
    grads_ref = torch.autograd.grad(sum(o.sum() for o in out_ref), list(ref.parameters()))
    grads = torch.autograd.grad(sum(o.sum() for o in out), list(ours.parameters()))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)

class Forecaster(nn.Module):
    def __init__(self, lstm_class, bidirectional=False):
        super().__init__()
        self.lstm = lstm_class(3, 8, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(16 if bidirectional else 8, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


@pytest.mark.parametrize("module_class", [lstm_fused.LSTM, lstm_fused.GRU])
def test_torch_compile_fullgraph_matches_eager(module_class):
    torch.manual_seed(0)
    model = Forecaster(module_class)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for B, T in [(4, 6), (7, 3), (2, 9)]:
        x = torch.randn(B, T, 3, requires_grad=True)
        eager = model(x)
        traced = compiled(x)
        torch.testing.assert_close(traced, eager)
        leaves = [x] + list(model.parameters())
        for a, b in zip(torch.autograd.grad(traced.sum(), leaves), torch.autograd.grad(eager.sum(), leaves)):
            torch.testing.assert_close(a, b)



_COMPILE_UNDER_CI = """
import torch, lstm_fused
torch.manual_seed(0)
for cls in (lstm_fused.LSTM, lstm_fused.GRU):
    for bidirectional in (False, True):
        m = cls(3, 8, num_layers=2, bidirectional=bidirectional)
        for dynamic in (False, True):
            torch.compiler.reset()  # one code object compiled for each case: no recompile limit
            f = torch.compile(lambda x: m(x)[0].sum(), fullgraph=True, dynamic=dynamic)
            for grad in (True, False):
                x = torch.randn(5, 4, 3)
                with torch.set_grad_enabled(grad):
                    torch.testing.assert_close(f(x), m(x)[0].sum())
print("compiled", flush=True)
"""


def test_torch_compile_with_the_ci_variable_set(tmp_path):
    """With CI set in the environment (as CI services set it), inductor refuses an implicit
    fallback for an op that has an entry in torch's global decomposition table, as the layer ops
    have for the ONNX exporter (onnx.py): they must get explicit fallbacks (ops.py). A fresh
    process, so that no earlier compile has registered them already, with an empty inductor cache,
    so that inductor lowers every graph; static and dynamic shapes, the forward and the inference
    ops, one and two directions. This failed the project's CI."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, CI="true", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    done = subprocess.run([sys.executable, "-c", _COMPILE_UNDER_CI], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("module_class", [lstm_fused.LSTM, lstm_fused.GRU])
def test_compiled_autograd_gives_the_eager_gradients(module_class):
    """Compiled autograd (torch._dynamo.compiled_autograd) traces the backward graph, C++
    autograd functions included; it refuses functions with outputs marked non-differentiable,
    which is why the reserve leaves the autograd function another way (csrc/autograd.cpp)."""
    compiled_autograd = pytest.importorskip("torch._dynamo.compiled_autograd")
    if not hasattr(compiled_autograd, "_enable"):
        pytest.skip("this torch has no torch._dynamo.compiled_autograd._enable")
    torch.manual_seed(0)
    model = module_class(3, 8, num_layers=2)
    x = torch.randn(5, 4, 3, requires_grad=True)
    leaves = [x] + list(model.parameters())
    eager = torch.autograd.grad(model(x)[0].pow(2).sum(), leaves)
    loss = model(x)[0].pow(2).sum()
    with compiled_autograd._enable(torch.compile(backend="eager")):
        loss.backward()
    for leaf, expected in zip(leaves, eager):
        torch.testing.assert_close(leaf.grad, expected)


@pytest.mark.parametrize("module_class", [lstm_fused.LSTM, lstm_fused.GRU])
def test_torch_export_keeps_the_fused_ops(module_class):
    """torch.export traces the model to a graph with the fused ops in it (their fake kernels
    give the shapes), and the exported program computes what the module does on new inputs."""
    torch.manual_seed(0)
    model = Forecaster(module_class)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = torch.export.export(model, (torch.randn(4, 6, 3),))
    assert not [w for w in caught if "_flat_weights" in str(w.message)], "forward must not re-assign module state"
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any(target.startswith("lstm_fused.") for target in targets), targets
    x = torch.randn(4, 6, 3)
    torch.testing.assert_close(program.module()(x), model(x))


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("module_class", [lstm_fused.LSTM, lstm_fused.GRU])
def test_torch_jit_trace_matches_eager(module_class, bidirectional):
    """torch.jit.trace records the fused ops (torch.jit.script is not supported: README). The
    tracer cannot record the bidirectional ops' Tensor?[] arguments: it gets one op per direction."""
    torch.manual_seed(0)
    model = Forecaster(module_class, bidirectional=bidirectional)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values it treats as constants
        traced = torch.jit.trace(model, torch.randn(4, 6, 3), check_trace=False)
    assert "lstm_fused::" in str(traced.inlined_graph)
    x = torch.randn(4, 6, 3)
    torch.testing.assert_close(traced(x), model(x))

def test_nn_lstm_itself_graph_breaks():
    """Why the modules subclass RNNBase: fullgraph tracing refuses nn.LSTM."""
    model = Forecaster(nn.LSTM)
    with pytest.raises(Exception):
        torch.compile(model, fullgraph=True)(torch.randn(2, 4, 3))


def test_import_in_a_fresh_interpreter_without_torch_first():
    """`import lstm_fused` alone must work: the extension needs torch's libraries loaded first."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import lstm_fused; print(lstm_fused.LSTM)"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def _module_pair(torch_class, seed=0, **kwargs):
    """A torch.nn module and ours with the same float64 weights."""
    torch.manual_seed(seed)
    ref = torch_class(**kwargs).double()
    ours = PAIRS[torch_class](**kwargs).double()
    ours.load_state_dict(ref.state_dict())
    return ours, ref


SECOND_ORDER_CASES = [
    (nn.LSTM, dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True, proj_size=2)),
    (nn.GRU, dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)),
    (nn.LSTMCell, dict(input_size=3, hidden_size=4)),
    (nn.GRUCell, dict(input_size=3, hidden_size=4)),
]


def _first_output(module, x):
    out = module(x)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("torch_class,kwargs", SECOND_ORDER_CASES)
def test_gradient_penalty_matches_torch_nn(torch_class, kwargs):
    """Double backward through the modules (a gradient penalty on the input gradient, as in WGAN-GP):
    the parameters' gradients of the penalty match torch.nn's."""
    ours, ref = _module_pair(torch_class, **kwargs)
    x = torch.randn(5, 2, 3, dtype=torch.float64) if "num_layers" in kwargs else torch.randn(2, 3, dtype=torch.float64)
    results = []
    for module in (ours, ref):
        leaf = x.clone().requires_grad_()
        grad_x, = torch.autograd.grad(_first_output(module, leaf).tanh().sum(), leaf, create_graph=True)
        penalty = (grad_x.norm() - 1).pow(2)
        results.append(torch.autograd.grad(penalty, [leaf] + list(module.parameters())))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("torch_class,kwargs", SECOND_ORDER_CASES)
def test_torch_func_grad_and_per_sample_grads_match_torch_nn(torch_class, kwargs):
    """torch.func.grad over functional_call (the layers run in differentiable ATen ops there:
    functorch refuses C++ autograd functions), and vmap(grad) for per-sample gradients."""
    from torch.func import functional_call, grad, vmap

    ours, ref = _module_pair(torch_class, **kwargs)
    batched = "num_layers" in kwargs
    x = torch.randn(4, 5, 3, dtype=torch.float64)  # 4 samples of 5 steps (or 5 cell inputs)

    def loss(module):
        def f(params, sample):
            inputs = sample.unsqueeze(1) if batched else sample
            return _first_output(lambda v: functional_call(module, params, (v,)), inputs).pow(2).sum()
        return f

    params = {name: p.detach() for name, p in ref.named_parameters()}
    per_sample = vmap(grad(loss(ours)), in_dims=(None, 0))(params, x)
    for k in range(len(x)):  # torch.nn's own vmap(grad) fails with a projection: compare per sample
        expected = grad(loss(ref))(params, x[k])
        assert expected.keys() == per_sample.keys()
        got = grad(loss(ours))(params, x[k])
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(per_sample[name][k], expected[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("torch_class", [nn.LSTM, nn.GRU])
def test_torch_func_hessian_and_vmap_match_torch_nn(torch_class, bidirectional):
    """hessian runs grad transforms twice (the layers in differentiable ATen ops); vmap alone keeps
    the fused ops, called per sample by functorch's fallback."""
    from torch.func import hessian, vmap

    ours, ref = _module_pair(torch_class, input_size=2, hidden_size=3, bidirectional=bidirectional)
    x = torch.randn(3, 1, 2, dtype=torch.float64)
    h_ours, h_ref = (hessian(lambda v, m=m: m(v)[0].sin().sum())(x) for m in (ours, ref))
    torch.testing.assert_close(h_ours, h_ref, rtol=1e-9, atol=1e-12)
    batch = torch.randn(4, 3, 2, 2, dtype=torch.float64)  # vmap over a leading dimension
    with warnings.catch_warnings(), torch.autograd.profiler.profile() as profile:
        warnings.simplefilter("ignore")  # functorch's note that the ops have no batching rule of their own
        mapped = vmap(lambda v: ours(v)[0])(batch)
    names = {event.name for event in profile.function_events}
    assert "lstm_fused::lstm_layer_forward" in names or "lstm_fused::gru_layer_forward" in names, names
    assert "aten::sigmoid" not in names, "vmap alone must not take the composite path"
    # torch.nn's RNNs have no vmap support at all ("Batching rule not implemented"): a loop instead
    torch.testing.assert_close(mapped, torch.stack([ref(v)[0] for v in batch]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("torch_class,kwargs", SECOND_ORDER_CASES)
def test_forward_mode_ad_matches_torch_nn(torch_class, kwargs):
    """Forward-mode AD: torch.func.jacfwd and jvp (functorch dropped the tangent through the C++
    autograd function, silently), and torch.autograd.forward_ad under no_grad (where the modules
    would otherwise take the inference op)."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import jacfwd, jvp

    ours, ref = _module_pair(torch_class, **kwargs)
    x = torch.randn(4, 2, 3, dtype=torch.float64) if "num_layers" in kwargs else torch.randn(2, 3, dtype=torch.float64)
    tangent = torch.randn_like(x)
    jac_ours, jac_ref = (jacfwd(lambda v, m=m: _first_output(m, v))(x) for m in (ours, ref))
    torch.testing.assert_close(jac_ours, jac_ref, rtol=1e-9, atol=1e-12)
    jvp_ours, jvp_ref = (jvp(lambda v, m=m: _first_output(m, v), (x,), (tangent,))[1] for m in (ours, ref))
    torch.testing.assert_close(jvp_ours, jvp_ref, rtol=1e-9, atol=1e-12)
    results = []
    for module in (ours, ref):
        with torch.no_grad(), fwAD.dual_level():
            results.append(fwAD.unpack_dual(_first_output(module, fwAD.make_dual(x, tangent))).tangent)
    assert results[0] is not None
    torch.testing.assert_close(results[0], results[1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("torch_class", [nn.LSTMCell, nn.GRUCell])
def test_gradient_penalty_through_a_cell_loop_matches_torch_nn(torch_class):
    """Several steps of a cell share its weights and carry the state: the differentiable backward
    must count each path once (differentiating with respect to the saved tensors themselves would
    count the paths through the earlier steps again). h0 is also c0 in the LSTM's first step."""
    ours, ref = _module_pair(torch_class, input_size=3, hidden_size=4)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    h0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    results = []
    for module in (ours, ref):
        state = (h0, h0) if torch_class is nn.LSTMCell else h0
        for step in x:
            state = module(step, state)
        h = state[0] if isinstance(state, tuple) else state
        leaves = [h0] + list(module.parameters())
        grads = torch.autograd.grad(h.pow(2).sum(), leaves, create_graph=True)
        penalty = sum(g.pow(2).sum() for g in grads)
        results.append(list(grads) + list(torch.autograd.grad(penalty, leaves)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_create_graph_under_autocast_computes_in_the_arguments_dtype():
    """The recomputation of a differentiable backward runs without autocast, as the fused ops do,
    wherever backward is called from."""
    torch.manual_seed(0)
    model = lstm_fused.LSTM(3, 4)
    x = torch.randn(5, 2, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)[0]
        inside, = torch.autograd.grad(y.float().pow(2).sum(), x, create_graph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x)[0].float().pow(2).sum()
    fused, = torch.autograd.grad(loss, x)
    # Both backward passes receive this gradient at the output: each, in float32, is as close to
    # float64's answer as torch.nn's float32 is (a bfloat16 recomputation would be off by at least
    # bfloat16's rounding: 2e-4 here, against a bound near 1e-6).
    upstream = 2 * y.detach().float()
    ref = nn.LSTM(3, 4)
    ref.load_state_dict(model.state_dict())
    x32 = x.detach().requires_grad_()
    theirs, = torch.autograd.grad(ref(x32)[0], x32, upstream)
    x64 = x.detach().double().requires_grad_()
    exact, = torch.autograd.grad(ref.double()(x64)[0], x64, upstream.double())
    assert_error_bounded(inside, theirs, exact, "create_graph backward")
    assert_error_bounded(fused, theirs, exact, "fused backward")


@pytest.mark.parametrize("torch_class,kwargs", [(nn.GRU, {}), (nn.GRU, {"bidirectional": True}), (nn.LSTM, {}),
                                                 (nn.LSTM, {"bidirectional": True}), (nn.LSTMCell, {}),
                                                 (nn.GRUCell, {})])
def test_bias_changed_in_place_before_backward_is_accepted_like_torch_nn(torch_class, kwargs):
    """torch.nn's backward does not read the biases, so a bias changed in place (under no_grad)
    between forward and backward is not refused; nor is it here, and the gradients are the same.
    A backward with create_graph=True recomputes the layer from its arguments: there it must be
    refused, not computed over the new bias."""
    ours, ref = _module_pair(torch_class, input_size=3, hidden_size=4, **kwargs)
    is_cell = torch_class in (nn.LSTMCell, nn.GRUCell)
    x = torch.randn(2, 3, dtype=torch.float64) if is_cell else torch.randn(5, 2, 3, dtype=torch.float64)
    name = "bias_hh" if is_cell else "bias_hh_l0"
    grads = []
    for module in (ours, ref):
        out = module(x)
        loss = (out[0] if isinstance(out, tuple) else out).sum()
        with torch.no_grad():
            getattr(module, name).add_(1.0)
        loss.backward()
        grads.append([p.grad for p in module.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    out = ours(x)
    loss = (out[0] if isinstance(out, tuple) else out).sum()
    with torch.no_grad():
        getattr(ours, name).add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, ours.weight_hh if is_cell else ours.weight_hh_l0, create_graph=True)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_grad_of_vmap_matches_a_loop(bidirectional):
    """grad over a vmapped model (the batched tensors inside vmap report requires_grad False: the
    forward op must still be chosen; functorch has no vmap fallback for the bidirectional ops'
    tensor lists, so under a transform the directions go one by one)."""
    from torch.func import functional_call, grad, vmap

    ours, ref = _module_pair(nn.LSTM, input_size=3, hidden_size=4, bidirectional=bidirectional)
    params = {name: p.detach() for name, p in ref.named_parameters()}
    batch = torch.randn(3, 5, 1, 3, dtype=torch.float64)

    def loss(module):
        def f(p):
            return vmap(lambda v: functional_call(module, p, (v,))[0])(batch).pow(2).sum()
        return f

    got = grad(loss(ours))(params)
    expected = torch.autograd.grad(sum(ref(v)[0].pow(2).sum() for v in batch), list(ref.parameters()))
    for (name, g), e in zip(got.items(), expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


def test_plain_vmap_without_grad_takes_the_inference_op():
    """Under vmap alone with no gradient wanted, the layers keep no reserve (the inference op);
    under an outer grad transform they take the forward op (checked in test_grad_of_vmap...)."""
    from torch.func import vmap

    ours, _ = _module_pair(nn.LSTM, input_size=3, hidden_size=4)
    batch = torch.randn(3, 5, 1, 3, dtype=torch.float64)
    with torch.no_grad(), warnings.catch_warnings(), torch.autograd.profiler.profile() as profile:
        warnings.simplefilter("ignore")  # functorch's note that the ops have no batching rule
        vmap(lambda v: ours(v)[0])(batch)
    names = {event.name for event in profile.function_events}
    assert "lstm_fused::lstm_layer_inference" in names and "lstm_fused::lstm_layer_forward" not in names, names


@pytest.mark.parametrize("torch_class", [nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell])
@pytest.mark.parametrize("on_meta", ["a parameter", "the state"])
def test_an_argument_on_the_meta_device_raises_like_torch_nn(torch_class, on_meta):
    """A parameter left on the meta device (deferred init, then a checkpoint without it) or a
    state on meta, with a real CPU input: the call went to the fake kernels, which returned
    uninitialised memory. torch.nn raises RuntimeError; so must we, for every module."""
    torch.manual_seed(0)
    is_cell, is_lstm = torch_class in (nn.LSTMCell, nn.GRUCell), torch_class in (nn.LSTM, nn.LSTMCell)
    x = torch.randn(3, 4) if is_cell else torch.randn(5, 3, 4)
    state = torch.randn(3, 6) if is_cell else torch.randn(1, 3, 6)
    for module_class in (torch_class, PAIRS[torch_class]):
        module = module_class(4, 6)
        if on_meta == "a parameter":
            name = "bias_hh" if is_cell else "bias_hh_l0"
            setattr(module, name, nn.Parameter(torch.empty_like(getattr(module, name), device="meta")))
            hx = None
        else:
            meta = state.to("meta")
            hx = (meta, state.clone()) if is_lstm else meta
        with pytest.raises(RuntimeError):
            module(x, hx)


LSTM_BAD_STATES = {
    "three states": lambda h, c: (h, c, c),
    "one state": lambda h, c: (h,),
    "h and c stacked in one tensor": lambda h, c: torch.stack([h, c]),
}


@pytest.mark.parametrize("torch_class", [nn.LSTM, nn.LSTMCell])
@pytest.mark.parametrize("case", list(LSTM_BAD_STATES))
@pytest.mark.parametrize("batched", [True, False])
def test_lstm_state_that_is_not_two_tensors_is_taken_like_torch_nn(torch_class, case, batched):
    """A single tensor was split along its first dimension into (h, c), and a third state was
    ignored; with a batched input torch.nn raises TypeError / RuntimeError / IndexError. With an
    unbatched one it takes hx[0] and hx[1] of whatever it is given: the same results then."""
    torch.manual_seed(0)
    shape = (3, 6) if torch_class is nn.LSTMCell else (1, 3, 6)
    x = torch.randn(3, 4) if torch_class is nn.LSTMCell else torch.randn(5, 3, 4)
    if not batched:
        shape, x = shape[:-2] + shape[-1:], x[..., 0, :] if torch_class is nn.LSTM else x[0]
    hx = LSTM_BAD_STATES[case](torch.randn(shape), torch.randn(shape))
    ref = torch_class(4, 6)
    ours = PAIRS[torch_class](4, 6)
    ours.load_state_dict(ref.state_dict())
    try:
        expected = ref(x, hx)
    except Exception as error:
        with pytest.raises(type(error)):
            ours(x, hx)
        return
    torch.testing.assert_close(ours(x, hx), expected)


@pytest.mark.parametrize("torch_class", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("batched", [True, False])
def test_input_made_under_inference_mode_is_taken_like_torch_nn(torch_class, batch_first, batched):
    """An input created under torch.inference_mode, then used for training: torch.nn refuses to
    save it ("Inference tensors cannot be saved for backward") unless it copies it first, which it
    does for a batch-first input; ours refused that case too."""
    ours, ref = _module_pair(torch_class, input_size=3, hidden_size=4, batch_first=batch_first)
    with torch.inference_mode():
        x = torch.randn(2, 5, 3, dtype=torch.float64) if batched else torch.randn(5, 3, dtype=torch.float64)
    try:
        ref(x)[0].sum().backward()
    except RuntimeError:
        with pytest.raises(RuntimeError, match="Inference tensors"):
            ours(x)[0].sum().backward()
        return
    ours(x)[0].sum().backward()
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_lstm_cell_3d_input_with_a_tensor_state_raises_the_input_error_like_torch_nn():
    x, hx = torch.randn(2, 3, 4), torch.randn(2, 3, 6)
    with pytest.raises(Exception) as ref_error:
        nn.LSTMCell(4, 6)(x, hx)
    with pytest.raises(type(ref_error.value)):
        lstm_fused.LSTMCell(4, 6)(x, hx)
