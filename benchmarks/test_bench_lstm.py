"""LSTM speed: lstm_fused.LSTM against torch.nn.LSTM (oneDNN on CPU, cuDNN on GPU) and a naive
Python loop over nn.LSTMCell, in inference and in training (forward + backward).

Run:  python -m pytest benchmarks --benchmark-only
The ratios that matter are against torch.nn measured in the same run (benchmarks/report.py).
"""
import pytest
import torch
from torch import nn

import lstm_fused
from conftest import DEVICES

# (B, T, I, H)
CONFIGS = {
    "B32-T100-I32-H128": (32, 100, 32, 128),
    "B64-T50-I256-H256": (64, 50, 256, 256),
}


class CellLoop(nn.Module):
    """The naive baseline: one nn.LSTMCell stepped from Python, as people first write it."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.cell = nn.LSTMCell(input_size, hidden_size)

    def forward(self, x):
        h = x.new_zeros(x.shape[1], self.cell.hidden_size)
        c = torch.zeros_like(h)
        outputs = []
        for x_t in x:
            h, c = self.cell(x_t, (h, c))
            outputs.append(h)
        return torch.stack(outputs), (h, c)


def make_model(impl, I, H, device):
    torch.manual_seed(0)
    if impl == "naive":
        return CellLoop(I, H).to(device)
    return (lstm_fused.LSTM if impl == "lstm_fused" else nn.LSTM)(I, H).to(device)


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("mode", ["inference", "training"])
@pytest.mark.parametrize("impl", ["lstm_fused", "torch", "naive"])
def test_lstm(benchmark, impl, mode, config, device):
    B, T, I, H = CONFIGS[config]
    model = make_model(impl, I, H, device)
    x = torch.randn(T, B, I, device=device)
    benchmark.group = f"lstm-{device}-{mode}-{config}"
    benchmark.extra_info.update(dict(cell="lstm", impl=impl, mode=mode, device=device, B=B, T=T, I=I, H=H,
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
            out, (h, c) = model(x)
            (out.sum() + h.sum() + c.sum()).backward()
            synchronize(device)

    run()  # warm-up (allocator, oneDNN primitive cache)
    benchmark(run)
