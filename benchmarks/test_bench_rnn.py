"""LSTM and GRU speed: lstm_fused against torch.nn (oneDNN on CPU, cuDNN on GPU) and a naive
Python loop over nn.LSTMCell / nn.GRUCell, in inference and in training (forward + backward).

Run:  python -m pytest benchmarks --benchmark-only
The ratios that matter are against torch.nn measured in the same run (benchmarks/report.py).
"""
import pytest
import torch
from torch import nn

import lstm_fused
from conftest import DEVICES

# (B, T, I, H): the configs of the CPU speed issue
CONFIGS = {
    "B32-T100-I32-H128": (32, 100, 32, 128),
    "B64-T50-I256-H256": (64, 50, 256, 256),
    "B8-T200-I1-H64": (8, 200, 1, 64),
    "B128-T35-I512-H512": (128, 35, 512, 512),
}
MODELS = {
    ("lstm", "lstm_fused"): lstm_fused.LSTM, ("lstm", "torch"): nn.LSTM,
    ("gru", "lstm_fused"): lstm_fused.GRU, ("gru", "torch"): nn.GRU,
}


class CellLoop(nn.Module):
    """The naive baseline: one nn.LSTMCell / nn.GRUCell stepped from Python, as people first
    write it."""

    def __init__(self, cell, input_size, hidden_size):
        super().__init__()
        self.is_lstm = cell == "lstm"
        self.cell = (nn.LSTMCell if self.is_lstm else nn.GRUCell)(input_size, hidden_size)

    def forward(self, x):
        h = x.new_zeros(x.shape[1], self.cell.hidden_size)
        c = torch.zeros_like(h)
        outputs = []
        for x_t in x:
            if self.is_lstm:
                h, c = self.cell(x_t, (h, c))
            else:
                h = self.cell(x_t, h)
            outputs.append(h)
        return torch.stack(outputs), (h, c)


def make_model(cell, impl, I, H, device):
    torch.manual_seed(0)
    if impl == "naive":
        return CellLoop(cell, I, H).to(device)
    return MODELS[cell, impl](I, H).to(device)


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


# The implementation varies fastest (pytest iterates the top decorator innermost), so that the
# three are timed one right after the other for each case. With the implementation outermost,
# ours and torch.nn's blocks of one case ran ~20 s apart, and this machine's speed drifts by up
# to 40% within that: LSTM B=64 inference read 0.79-0.80x that way in two sessions, against
# 1.00-1.07x paired.
@pytest.mark.parametrize("impl", ["lstm_fused", "torch", "naive"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn(benchmark, cell, impl, mode, config, device):
    B, T, I, H = CONFIGS[config]
    model = make_model(cell, impl, I, H, device)
    x = torch.randn(T, B, I, device=device)
    benchmark.group = f"{cell}-{device}-{mode}-{config}"
    benchmark.extra_info.update(dict(cell=cell, impl=impl, mode=mode, device=device, B=B, T=T, I=I, H=H,
                                     threads=torch.get_num_threads()))

    if mode == "inference":
        model.eval()

        def run():
            with torch.inference_mode():
                model(x)
            synchronize(device)
    else:
        model.train()
        x.requires_grad_()

        def run():
            out, _ = model(x)
            out.sum().backward()
            synchronize(device)

    run()  # warm-up (allocator, oneDNN primitive cache)
    benchmark(run)


GEMM_SIZE = 1024


def test_gemm_rate(benchmark):
    """The machine's float32 GEMM rate (torch.mm, GEMM_SIZE^3, all threads), measured within the
    run it bounds: report.py reads GFLOP/s against it. (Measured at report time instead, it read
    151 GFLOP/s after a run whose kernels had reached 250.)"""
    a, b = torch.randn(GEMM_SIZE, GEMM_SIZE), torch.randn(GEMM_SIZE, GEMM_SIZE)
    benchmark.group = "gemm"
    benchmark.extra_info.update(dict(impl="gemm", n=GEMM_SIZE, threads=torch.get_num_threads()))
    a @ b
    benchmark(torch.mm, a, b)
