"""The cells' short per-call path (modules.py): it gives what the full path and torch.nn give, it
is the path a plain call takes, it steps aside for everything it does not handle, and it follows
the module's parameters wherever they are changed."""
import pytest
import torch
from torch import nn

import lstm_fused

PAIRS = [(nn.LSTMCell, lstm_fused.LSTMCell), (nn.GRUCell, lstm_fused.GRUCell)]
IDS = ["LSTMCell", "GRUCell"]


def _pair(torch_class, our_class, input_size, hidden_size, bias=True, dtype=torch.float32):
    ref = torch_class(input_size, hidden_size, bias=bias, dtype=dtype)
    ours = our_class(input_size, hidden_size, bias=bias, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _state(torch_class, batch, hidden_size, dtype, form, requires_grad=False):
    if form == "none":
        return None
    make = lambda: torch.randn(batch, hidden_size, dtype=dtype, requires_grad=requires_grad)  # noqa: E731
    if torch_class is nn.GRUCell:
        return make()
    return (make(), make()) if form == "tuple" else [make(), make()]


def _outputs(result):
    return list(result) if isinstance(result, tuple) else [result]


def _tolerances(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)


@pytest.fixture
def full_path_refused(monkeypatch):
    """Makes the full path raise, so that a call that returns has taken the short path."""
    def refuse(self, input, hx):
        raise AssertionError("the full path ran")
    for cls in (lstm_fused.LSTMCell, lstm_fused.GRUCell):
        monkeypatch.setattr(cls, "_full_step", refuse)


@pytest.mark.parametrize("torch_class,our_class", PAIRS, ids=IDS)
@pytest.mark.parametrize("batch,input_size,hidden_size", [(1, 7, 5), (3, 4, 16), (8, 64, 64)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form", ["none", "tuple", "list"])
def test_no_grad_step_matches_torch_nn_and_the_full_path(torch_class, our_class, batch, input_size, hidden_size,
                                                          bias, dtype, form):
    if torch_class is nn.GRUCell and form == "list":
        pytest.skip("a GRU state is one tensor")
    ref, ours = _pair(torch_class, our_class, input_size, hidden_size, bias, dtype)
    x = torch.randn(batch, input_size, dtype=dtype)
    hx = _state(torch_class, batch, hidden_size, dtype, form)
    with torch.no_grad():
        expected = _outputs(ref(x, hx))
        short = _outputs(ours(x, hx))
        full = _outputs(ours._full_step(x, hx))
    for a, b, c in zip(short, full, expected):
        assert a.dtype == c.dtype and a.shape == c.shape and a.grad_fn is None
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same op on the same arguments
        torch.testing.assert_close(a, c, **_tolerances(dtype))


@pytest.mark.parametrize("torch_class,our_class", PAIRS, ids=IDS)
@pytest.mark.parametrize("wanted", ["everything", "input only", "state only", "weights only"])
@pytest.mark.parametrize("bias", [True, False])
def test_step_with_gradients_matches_torch_nn(torch_class, our_class, wanted, bias):
    ref, ours = _pair(torch_class, our_class, 6, 12, bias, torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=wanted in ("everything", "input only"))
    hx = _state(torch_class, 4, 12, torch.float64, "tuple", requires_grad=wanted in ("everything", "state only"))
    if wanted in ("input only", "state only"):
        for p in list(ref.parameters()) + list(ours.parameters()):
            p.requires_grad_(False)
    leaves_of = lambda module: [t for t in [x, *_outputs(hx), *module.parameters()] if t.requires_grad]  # noqa: E731
    results = []
    for module in (ref, ours):
        outputs = _outputs(module(x, hx))
        gen = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outputs)
        results.append(outputs + list(torch.autograd.grad(loss, leaves_of(module))))
    assert len(results[0]) == len(results[1])
    for a, b in zip(results[1], results[0]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("torch_class,our_class", PAIRS, ids=IDS)
@pytest.mark.parametrize("grad", [False, True])
def test_a_plain_batched_call_takes_the_short_path(torch_class, our_class, grad, full_path_refused):
    _, ours = _pair(torch_class, our_class, 5, 8)
    x = torch.randn(2, 5)
    with torch.set_grad_enabled(grad):
        for hx in (None, _state(torch_class, 2, 8, torch.float32, "tuple")):
            outputs = _outputs(ours(x, hx))
            assert all((o.grad_fn is not None) == grad for o in outputs)


def _contexts():
    """Calls that the short path must leave to the full path, each as (name, call(cell, x, hx))."""
    def under_autocast(cell, x, hx):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return cell(x, hx)

    def under_vmap(cell, x, hx):
        if isinstance(hx, tuple):
            return torch.func.vmap(lambda xb, h, c: cell(xb, (h, c)))(x[None], *[s[None] for s in hx])
        return torch.func.vmap(lambda xb, h: cell(xb, h))(x[None], hx[None])

    def under_forward_ad(cell, x, hx):
        import torch.autograd.forward_ad as fwAD
        with fwAD.dual_level():
            return cell(fwAD.make_dual(x, torch.randn_like(x)), hx)

    def unbatched(cell, x, hx):
        return cell(x[0], tuple(s[0] for s in hx) if isinstance(hx, tuple) else hx[0])

    def half_precision(cell, x, hx):
        cell = cell.to(torch.bfloat16)
        return cell(x.bfloat16(), tuple(s.bfloat16() for s in hx) if isinstance(hx, tuple) else hx.bfloat16())

    def input_subclass(cell, x, hx):
        return cell(nn.Parameter(x, requires_grad=False), hx)

    return {"autocast": under_autocast, "vmap": under_vmap, "forward AD": under_forward_ad,
            "unbatched": unbatched, "bfloat16": half_precision, "tensor subclass": input_subclass}


@pytest.mark.parametrize("torch_class,our_class", PAIRS, ids=IDS)
@pytest.mark.parametrize("context", list(_contexts()))
def test_the_short_path_steps_aside(torch_class, our_class, context, monkeypatch):
    _, ours = _pair(torch_class, our_class, 5, 8)
    x = torch.randn(1, 5)
    hx = _state(torch_class, 1, 8, torch.float32, "tuple")
    full_calls = []
    full_step = type(ours)._full_step

    def counting(self, input, hx):
        full_calls.append(1)
        return full_step(self, input, hx)

    monkeypatch.setattr(type(ours), "_full_step", counting)
    _contexts()[context](ours, x, hx)
    assert full_calls, f"under {context} the short path took the call"


@pytest.mark.parametrize("torch_class,our_class", PAIRS, ids=IDS)
def test_the_short_path_follows_every_change_of_the_parameters(torch_class, our_class, full_path_refused):
    ref, ours = _pair(torch_class, our_class, 5, 8)
    x = torch.randn(3, 5)
    hx = _state(torch_class, 3, 8, torch.float32, "tuple")

    def check():
        with torch.no_grad():
            for a, b in zip(_outputs(ours(x, hx)), _outputs(ref(x, hx))):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    check()
    with torch.no_grad():  # in place
        ref.weight_hh.mul_(1.5)
        ours.weight_hh.mul_(1.5)
    check()
    new_weight = torch.randn_like(ref.weight_ih)  # replaced
    ref.weight_ih = nn.Parameter(new_weight.clone())
    ours.weight_ih = nn.Parameter(new_weight.clone())
    check()
    other = torch_class(5, 8)  # loaded
    ref.load_state_dict(other.state_dict())
    ours.load_state_dict(other.state_dict())
    check()
    swapped = {name: torch.randn_like(p) for name, p in ref.named_parameters()}  # swapped by functional_call
    with torch.no_grad():
        for a, b in zip(_outputs(torch.func.functional_call(ours, swapped, (x, hx))),
                        _outputs(torch.func.functional_call(ref, swapped, (x, hx)))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    check()  # and back


@pytest.mark.parametrize("torch_class,our_class", PAIRS, ids=IDS)
def test_a_module_moved_to_float64_takes_float64_steps(torch_class, our_class, full_path_refused):
    ref, ours = _pair(torch_class, our_class, 5, 8)
    ref.double(), ours.double()
    x = torch.randn(2, 5, dtype=torch.float64)
    with torch.no_grad():
        for a, b in zip(_outputs(ours(x)), _outputs(ref(x))):
            assert a.dtype == torch.float64
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("torch_class,our_class", PAIRS, ids=IDS)
def test_bias_set_to_none_after_construction_is_taken_like_torch_nn(torch_class, our_class):
    ref, ours = _pair(torch_class, our_class, 5, 8)
    ref.bias_ih = ref.bias_hh = None
    ours.bias_ih = ours.bias_hh = None
    x = torch.randn(2, 5)
    with torch.no_grad():
        for a, b in zip(_outputs(ours(x)), _outputs(ref(x))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("torch_class,our_class", PAIRS, ids=IDS)
@pytest.mark.parametrize("grad", [False, True])
def test_refused_calls_raise_torch_nns_errors_in_either_grad_mode(torch_class, our_class, grad):
    """What the short path hands on because the op refused it (shapes, dtypes) raises torch.nn's
    error, type and message, through the full path."""
    ref, ours = _pair(torch_class, our_class, 10, 20)
    lstm = torch_class is nn.LSTMCell

    def state(*shape, dtype=torch.float32):
        return (torch.randn(*shape, dtype=dtype), torch.randn(*shape, dtype=dtype)) if lstm \
            else torch.randn(*shape, dtype=dtype)

    calls = [(torch.randn(3, 11), state(3, 20)), (torch.randn(3, 10), state(3, 21)),
             (torch.randn(3, 10), state(5, 20)), (torch.randn(3, 10), state(3, 1, 1, 20)),
             (torch.randn(3, 10, dtype=torch.float64), state(3, 20)),
             (torch.randn(3, 10), state(3, 20, dtype=torch.float64)), (torch.randn(3, 10), state(20))]
    if lstm:
        calls += [(torch.randn(3, 10), (torch.randn(3, 20), torch.randn(3, 21))),
                  (torch.randn(3, 10), (torch.randn(3, 20),)), (torch.randn(3, 10), torch.randn(2, 3, 20))]
    for x, hx in calls:
        with torch.set_grad_enabled(grad):
            with pytest.raises(Exception) as theirs:
                ref(x, hx)
            with pytest.raises(type(theirs.value)) as mine:
                ours(x, hx)
        assert str(mine.value) == str(theirs.value)
