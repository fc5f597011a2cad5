"""lstm_fused.LSTM and GRU against torch.nn.LSTM and GRU loaded with the same weights."""
import copy
import random

import pytest
import torch
from torch import nn

import lstm_fused
from helpers import assert_error_bounded, run_with_grads


CLASSES = {"LSTM": (lstm_fused.LSTM, nn.LSTM), "GRU": (lstm_fused.GRU, nn.GRU)}


@pytest.fixture(params=list(CLASSES))
def cell(request):
    return request.param


def make_pair(device, dtype, seed, cell="LSTM", **kwargs):
    ours_class, torch_class = CLASSES[cell]
    torch.manual_seed(seed)
    ref = torch_class(**kwargs).to(device, dtype)
    ours = ours_class(**kwargs).to(device, dtype)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def random_config(seed):
    rng = random.Random(seed)
    return dict(
        input_size=rng.randint(1, 9),
        hidden_size=rng.randint(1, 20),
        num_layers=rng.randint(1, 3),
        bias=rng.random() < 0.7,
        batch_first=rng.random() < 0.5,
    ), rng.choice([1, rng.randint(2, 12)]), rng.choice([1, rng.randint(2, 6)])


def make_input(T, B, config, device, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (B, T, config["input_size"]) if config["batch_first"] else (T, B, config["input_size"])
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()


def make_state(T, B, config, device, dtype, seed, cell="LSTM"):
    gen = torch.Generator().manual_seed(seed + 1)
    L, H = config["num_layers"], config["hidden_size"]
    states = tuple(torch.randn(L, B, H, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()
                   for _ in range(2 if cell == "LSTM" else 1))
    return states if cell == "LSTM" else states[0]


def detached64(hx):
    if isinstance(hx, tuple):
        return tuple(h.detach().double().requires_grad_() for h in hx)
    return hx.detach().double().requires_grad_()


SEEDS = list(range(12))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("with_state", [False, True])
def test_float64_matches_torch_nn(device, cell, seed, with_state):
    config, T, B = random_config(seed)
    ours, ref = make_pair(device, torch.float64, seed, cell, **config)
    x = make_input(T, B, config, device, torch.float64, seed)
    hx = make_state(T, B, config, device, torch.float64, seed, cell) if with_state else None
    outs_ref, grads_ref, w = run_with_grads(ref, x, hx)
    outs, grads, _ = run_with_grads(ours, x, hx, w)
    for a, b in zip(outs + grads, outs_ref + grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("seed", SEEDS[:8])
def test_float32_error_bounded_by_torch_nn(device, cell, seed):
    config, T, B = random_config(100 + seed)
    ours, ref = make_pair(device, torch.float32, seed, cell, **config)
    exact = copy.deepcopy(ref).double()
    x = make_input(T, B, config, device, torch.float32, seed)
    hx = make_state(T, B, config, device, torch.float32, seed, cell)
    outs_exact, grads_exact, w = run_with_grads(exact, x.detach().double().requires_grad_(), detached64(hx))
    outs_ref, grads_ref, _ = run_with_grads(ref, x, hx, w)
    outs, grads, _ = run_with_grads(ours, x, hx, w)
    state_names = ["h", "c"] if cell == "LSTM" else ["h"]
    names = (["output"] + [f"{n}_n" for n in state_names] + ["grad input"] + [f"grad {n}0" for n in state_names]
             + [f"grad {n}" for n, _ in ref.named_parameters()])
    for a, b, e, name in zip(outs + grads, outs_ref + grads_ref, outs_exact + grads_exact, names):
        assert_error_bounded(a, b, e, name)


def test_gradcheck_module(device, cell):
    torch.manual_seed(0)
    module = CLASSES[cell][0](3, 4, num_layers=2, batch_first=True, bidirectional=True).to(device, torch.float64)
    x = torch.randn(2, 5, 3, dtype=torch.float64, device=device, requires_grad=True)
    states = tuple(torch.randn(4, 2, 4, dtype=torch.float64, device=device, requires_grad=True)
                   for _ in range(2 if cell == "LSTM" else 1))
    names = [n for n, _ in module.named_parameters()]

    def fn(x, *tensors):
        hx = tensors[: len(states)]
        out, state = torch.func.functional_call(
            module, dict(zip(names, tensors[len(states):])), (x, hx if cell == "LSTM" else hx[0]))
        return (out,) + (state if isinstance(state, tuple) else (state,))

    assert torch.autograd.gradcheck(fn, (x,) + states + tuple(module.parameters()))


def test_parameters_match_torch_nn(cell):
    kwargs = dict(input_size=5, hidden_size=7, num_layers=3, bias=True, bidirectional=True)
    torch.manual_seed(42)
    ref = CLASSES[cell][1](**kwargs)
    torch.manual_seed(42)
    ours = CLASSES[cell][0](**kwargs)
    ref_params = list(ref.named_parameters())
    our_params = list(ours.named_parameters())
    assert [n for n, _ in our_params] == [n for n, _ in ref_params]
    for (_, a), (_, b) in zip(our_params, ref_params):
        assert a.shape == b.shape
        assert torch.equal(a, b), "same seed must give the same initialisation as torch.nn"


def test_state_dict_round_trip(cell):
    kwargs = dict(input_size=3, hidden_size=6, num_layers=2, bias=False)
    ours_class, torch_class = CLASSES[cell]
    ref = torch_class(**kwargs)
    ours = ours_class(**kwargs)
    ours.load_state_dict(ref.state_dict())
    back = torch_class(**kwargs)
    back.load_state_dict(ours.state_dict())
    for a, b in zip(back.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_input_without_grad_and_no_grad_mode(cell):
    ours, ref = make_pair("cpu", torch.float32, 0, cell, input_size=4, hidden_size=5, num_layers=2)
    x = torch.randn(6, 3, 4)
    with torch.no_grad():
        out, state = ours(x)
        out_ref, state_ref = ref(x)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(state, state_ref)
    assert not out.requires_grad


def _expect_same_error(ours, ref, *args):
    with pytest.raises(Exception) as ref_error:
        ref(*args)
    with pytest.raises(type(ref_error.value)):
        ours(*args)


BAD_INPUTS = {
    "4-D input": lambda: (torch.randn(2, 3, 4, 5),),
    "1-D input": lambda: (torch.randn(4),),
    "wrong feature size": lambda: (torch.randn(5, 3, 7),),
    "state batch mismatch": lambda: (torch.randn(5, 3, 4), (torch.randn(2, 2, 6), torch.randn(2, 3, 6))),
    "state hidden mismatch": lambda: (torch.randn(5, 3, 4), (torch.randn(2, 3, 5), torch.randn(2, 3, 5))),
    "cell state mismatch": lambda: (torch.randn(5, 3, 4), (torch.randn(2, 3, 6), torch.randn(2, 3, 5))),
    "state layer mismatch": lambda: (torch.randn(5, 3, 4), (torch.randn(1, 3, 6), torch.randn(1, 3, 6))),
    "2-D state with batched input": lambda: (torch.randn(5, 3, 4), (torch.randn(3, 6), torch.randn(3, 6))),
    "input dtype mismatch": lambda: (torch.randn(5, 3, 4, dtype=torch.float64),),
    "state dtype mismatch": lambda: (torch.randn(5, 3, 4), (torch.randn(2, 3, 6, dtype=torch.float64),
                                                            torch.randn(2, 3, 6, dtype=torch.float64))),
    "integer input": lambda: (torch.randint(0, 5, (5, 3, 4)),),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_like_torch_nn(cell, case):
    if cell == "GRU" and case == "cell state mismatch":
        pytest.skip("a GRU has no cell state")
    ours, ref = make_pair("cpu", torch.float32, 0, cell, input_size=4, hidden_size=6, num_layers=2)
    args = BAD_INPUTS[case]()
    if cell == "GRU" and len(args) == 2:
        args = (args[0], args[1][0])  # a GRU's state is h alone
    _expect_same_error(ours, ref, *args)


HALF_DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("seed", SEEDS[:4])
def test_half_precision_error_bounded_by_torch_nn(device, cell, dtype, seed):
    """In float16 / bfloat16 our error against float64 may be at most twice torch.nn's (cuDNN's
    on CUDA, oneDNN's or ATen's on the CPU) in the same dtype. On the CPU the half types are
    computed in float32 (lstm_fused.ops)."""
    config, T, B = random_config(200 + seed)
    ours, ref = make_pair(device, dtype, seed, cell, **config)
    exact = copy.deepcopy(ref).double()
    x = make_input(T, B, config, device, dtype, seed)
    hx = make_state(T, B, config, device, dtype, seed, cell)
    outs_exact, grads_exact, w = run_with_grads(exact, x.detach().double().requires_grad_(), detached64(hx))
    outs_ref, grads_ref, _ = run_with_grads(ref, x, hx, w)
    outs, grads, _ = run_with_grads(ours, x, hx, w)
    for k, (a, b, e) in enumerate(zip(outs + grads, outs_ref + grads_ref, outs_exact + grads_exact)):
        assert a.dtype == dtype
        assert_error_bounded(a, b, e, f"{cell} {dtype} tensor {k}", floor=1e-3)
