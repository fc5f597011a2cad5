"""Shared test helpers: running a module and collecting every gradient, and error bounds."""
import re

import torch
from torch.nn.utils.rnn import PackedSequence


def _tensor_of(out):
    return out.data if isinstance(out, PackedSequence) else out


def run_with_grads(module, inputs, hx=None, weights=None):
    """Run `module(inputs, hx)`, back-propagate a random but fixed combination of every output,
    and return (outputs, gradients, weights) with flat lists: output, h_n (, c_n), then the
    gradients of the input, of the state tensors (when given) and of every parameter, in
    torch.nn's order. Pass the returned weights to the next module to compare like with like."""
    x = _tensor_of(inputs)
    states = [] if hx is None else list(hx) if isinstance(hx, tuple) else [hx]
    leaves = [x] + states + list(module.parameters())
    output, state = module(inputs, hx) if hx is not None else module(inputs)
    outs = [_tensor_of(output)] + list(state if isinstance(state, tuple) else (state,))
    if weights is None:
        gen = torch.Generator().manual_seed(1234)
        weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
    loss = sum((o * w.to(o)).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [o.detach() for o in outs], list(grads), weights


def max_error(a, b):
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def assert_error_bounded(ours, theirs, exact, what, factor=2.0, floor=1e-6):
    """Our error against the float64 result may be at most `factor` times PyTorch's own error in
    the same dtype, plus a small absolute floor."""
    ours_err = max_error(ours, exact)
    theirs_err = max_error(theirs, exact)
    assert ours_err <= factor * theirs_err + floor, (
        f"{what}: error {ours_err:.3g} against float64, nn.LSTM's is {theirs_err:.3g}"
    )


def cpu_vendor():
    """The CPU's vendor_id from /proc/cpuinfo ("GenuineIntel", "AuthenticAMD"), or None where
    there is none. Some choices of the CPU kernels follow it (lstm_stationary.h:
    large_steps_to_mkl)."""
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"^vendor_id\s*:\s*(\S+)", f.read(), re.M)
    except OSError:
        return None
    return found.group(1) if found else None
