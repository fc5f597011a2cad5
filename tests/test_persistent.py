"""The persistent whole-sequence CUDA kernel: its partitioning rule (checked here on any machine)
and, on a GPU, agreement with the per-step kernels and the float64 reference."""
import os

import pytest
import torch

import lstm_fused  # noqa: F401
from lstm_fused.ops import lstm_layer
from lstm_fused.reference import lstm_layer_reference

H100_SMS, H100_SHARED = 132, 227 * 1024


def plan(hidden, batch, element_bytes, sms=H100_SMS, shared=H100_SHARED, recurrent=None):
    usable, units, blocks, shared_bytes = torch.ops.lstm_fused._persistent_plan(
        hidden, recurrent or hidden, batch, 4, element_bytes, sms, shared)
    return bool(usable), units, blocks, shared_bytes


def test_plan_spreads_hidden_units_over_the_multiprocessors():
    usable, units, blocks, shared_bytes = plan(768, 16, 4)
    assert (units, blocks) == (6, 128)  # ceil(768 / 132) units per block, one block per SM at most
    assert shared_bytes == 4 * 6 * 768 * 4
    assert usable
    for hidden in (1, 7, 131, 132, 133, 1000, 4096):
        _, units, blocks, _ = plan(hidden, 1, 2)
        assert blocks <= H100_SMS and units * blocks >= hidden and units * (blocks - 1) < hidden


def test_plan_refuses_weights_that_do_not_fit_on_chip():
    assert not plan(2048, 16, 4)[0]  # 4 gates x 16 units x 2048 x 4 bytes = 512 KB per block
    assert plan(2048, 16, 2)[0] is False  # bf16 still 256 KB
    assert plan(1024, 16, 2)[0]  # 4 x 8 x 1024 x 2 = 64 KB
    assert not plan(768, 16, 4, shared=48 * 1024)[0]  # a device with 48 KB per block


def test_plan_refuses_large_batches():
    assert plan(1024, 64, 2)[0]  # 64 rows x 8 units = 512 pairs
    assert not plan(1024, 65, 2)[0]
    assert not plan(1024, 256, 2)[0]  # B=256: the per-step kernel's wider grid


def test_plan_rejects_degenerate_sizes():
    assert not plan(0, 16, 4)[0]
    assert not plan(16, 0, 4)[0]
    assert not plan(16, 4, 4, sms=0)[0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the persistent kernel runs on CUDA only; none here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("use_lengths,reverse", [(False, False), (True, True), (True, False)])
def test_persistent_and_per_step_kernels_agree(monkeypatch, dtype, use_lengths, reverse):
    T, B, I, H = 9, 5, 6, 40
    gen = torch.Generator().manual_seed(7)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    args64 = [make(T, B, I), make(B, H), make(B, H), make(4 * H, I) * 0.3, make(4 * H, H) * 0.3,
              make(4 * H), make(4 * H)]
    lengths = torch.tensor([9, 7, 7, 3, 1]) if use_lengths else None
    args = [a.to("cuda", dtype) for a in args64]
    results = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("LSTM_FUSED_PERSISTENT", setting)
        results[setting] = lstm_layer(*args, lengths=lengths, reverse=reverse)
    reference = lstm_layer_reference(*args64, lengths=lengths, reverse=reverse)
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    for persistent, per_step, exact in zip(results["1"], results["0"], reference):
        torch.testing.assert_close(persistent.double(), exact.cuda(), rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(persistent, per_step, rtol=tolerance, atol=tolerance)
