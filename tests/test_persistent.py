"""The persistent whole-sequence CUDA kernel: its partitioning rule (checked here on any machine)
and, on a GPU, agreement with the per-step kernels and the float64 reference."""
import os

import pytest
import torch

import lstm_fused  # noqa: F401
from lstm_fused.ops import lstm_layer
from lstm_fused.reference import lstm_layer_reference

H100_SMS, H100_SHARED = 132, 227 * 1024


def plan(hidden, batch, element_bytes, sms=H100_SMS, shared=H100_SHARED):
    """The FMA persistent LSTM forward's plan: the product plan with N = 4U columns and K = H."""
    values = torch.ops.lstm_fused._persistent_product_plan(hidden, batch, 4, hidden, element_bytes,
                                                           8 if element_bytes == 8 else 4, False, sms, shared)
    return bool(values[0]), values[1], values[2], values[-1]


def test_plan_spreads_hidden_units_over_the_multiprocessors():
    usable, units, blocks, shared_bytes = plan(768, 16, 4)
    assert (units, blocks) == (6, 128)  # ceil(768 / 132) units per block, one block per SM at most
    # the W_hh slice (24 rows of 768), the partial sums (16 x 24), h_{t-1} staged (16 x 768)
    assert shared_bytes == 4 * 6 * 768 * 4 + 16 * 24 * 4 + 16 * 768 * 4
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


def tc_plan(hidden, batch, element_bytes, sms=H100_SMS, shared=H100_SHARED):
    fields = ("usable", "units", "blocks", "m_tiles", "n_tiles", "k_tiles", "k_split", "row_stride", "shared_bytes")
    values = torch.ops.lstm_fused._persistent_tc_plan(hidden, batch, element_bytes, sms, shared)
    return dict(zip(fields, values))


@pytest.mark.parametrize("sms,shared", [(132, 227 * 1024), (16, 99 * 1024)], ids=["h100-h200", "small-16sm-99kb"])
@pytest.mark.parametrize("hidden", [1, 40, 256, 512, 768, 1000, 1024])
@pytest.mark.parametrize("batch", [1, 8, 16, 64])
def test_tensor_core_plan_tiles_cover_the_layer(sms, shared, hidden, batch):
    p = tc_plan(hidden, batch, 2, sms, shared)
    assert p["units"] % 2 == 0 and p["n_tiles"] * 8 == 4 * p["units"]  # whole n8 tiles
    assert p["blocks"] <= sms and p["units"] * p["blocks"] >= hidden > p["units"] * (p["blocks"] - 1)
    assert p["m_tiles"] * 16 >= batch > (p["m_tiles"] - 1) * 16 and p["k_tiles"] * 16 >= hidden
    assert 1 <= p["k_split"] <= p["k_tiles"]
    # K is split only to give idle warps work: never more jobs than warps because of it
    assert p["k_split"] == 1 or p["n_tiles"] * p["k_split"] <= 8
    assert p["row_stride"] * 2 % 16 == 0  # ldmatrix rows 16-byte aligned
    rows, cols = 16 * p["m_tiles"], 4 * p["units"]
    assert p["shared_bytes"] == (cols + rows) * p["row_stride"] * 2 + p["k_split"] * rows * cols * 4
    assert p["usable"] == (p["shared_bytes"] <= shared and batch * p["units"] <= 512)


def test_tensor_core_plan_at_the_goal_configs():
    # B=16 H=768 bf16 (issue 17's headline): 128 blocks of 6 units, 3 n tiles x 2 K ranges, 65 KB.
    p = tc_plan(768, 16, 2)
    assert (p["usable"], p["units"], p["blocks"], p["n_tiles"], p["k_split"]) == (1, 6, 128, 3, 2)
    assert p["shared_bytes"] < 70 * 1024
    assert tc_plan(768, 16, 4)["usable"]  # fp32 as TF32: 124 KB
    assert tc_plan(512, 64, 4)["usable"]  # B=64 H=512 fp32: 4 m tiles
    assert tc_plan(256, 8, 4)["usable"]  # B=8 H=256: 128 blocks of 2 units, K split 8 ways
    assert not tc_plan(1024, 256, 2)["usable"]  # B=256: the per-step path's wider grid
    assert not tc_plan(1024, 64, 4, sms=16, shared=99 * 1024)["usable"]  # 64 units per block: too big


def backward_plan(hidden, batch, element_bytes, tensor_cores, sms=H100_SMS, shared=H100_SHARED, acc_bytes=None,
                  columns_per_unit=1, depth=None):
    """plan_persistent_product_layer; by default the LSTM backward's (N = U, K = 4H)."""
    fields = ("usable", "units", "blocks", "m_rows", "n_cols", "n_tiles", "chunks", "k_split", "row_stride",
              "stage_a", "shared_bytes")
    acc = acc_bytes or (8 if element_bytes == 8 else 4)
    values = torch.ops.lstm_fused._persistent_product_plan(hidden, batch, columns_per_unit, depth or 4 * hidden,
                                                           element_bytes, acc, tensor_cores, sms, shared)
    return dict(zip(fields, values))


@pytest.mark.parametrize("sms,shared", [(132, 227 * 1024), (16, 99 * 1024)], ids=["h100-h200", "small-16sm-99kb"])
@pytest.mark.parametrize("hidden", [1, 37, 40, 256, 512, 768, 1000, 1024])
@pytest.mark.parametrize("batch", [1, 8, 16, 64])
@pytest.mark.parametrize("element_bytes,tensor_cores", [(2, True), (4, True), (4, False), (8, False)])
@pytest.mark.parametrize("kind", ["lstm-backward", "gru-forward", "gru-backward"])
def test_product_plan_covers_the_layer(sms, shared, hidden, batch, element_bytes, tensor_cores, kind):
    """plan_persistent_product_layer for each kernel that uses it: N = columns_per_unit * U, K."""
    columns_per_unit, K = {"lstm-backward": (1, 4 * hidden), "gru-forward": (3, hidden),
                           "gru-backward": (1, 3 * hidden)}[kind]
    p = backward_plan(hidden, batch, element_bytes, tensor_cores, sms, shared, columns_per_unit=columns_per_unit,
                      depth=K)
    acc = 8 if element_bytes == 8 else 4
    assert p["blocks"] <= sms and p["units"] * p["blocks"] >= hidden > p["units"] * (p["blocks"] - 1)
    columns = columns_per_unit * p["units"]
    if tensor_cores:
        chunk = 64 // element_bytes  # four lanes x 16 bytes
        assert p["chunks"] * chunk >= K > (p["chunks"] - 1) * chunk
        assert p["n_tiles"] * 8 == p["n_cols"] >= columns > (p["n_tiles"] - 1) * 8
        assert p["m_rows"] % 16 == 0 and p["m_rows"] >= batch > p["m_rows"] - 16
        assert p["row_stride"] >= p["chunks"] * chunk
        # 64 bytes mod 128 between rows: the 8 lanes of an LDS.128 phase hit distinct bank groups
        assert p["row_stride"] * element_bytes % 128 == 64
        assert 1 <= p["k_split"] <= p["chunks"] and (p["k_split"] == 1 or p["n_tiles"] * p["k_split"] <= 8)
    else:
        assert (p["n_cols"], p["m_rows"], p["row_stride"]) == (columns, batch, K)
        tiles = -(-batch // 4) * -(-columns // 4)  # 4 x 4 register tiles
        assert p["k_split"] == max(1, min(8 // tiles, -(-K // 32)))  # K split only to fill idle warps
    def up16(n):  # each shared region starts 16-byte aligned
        return (n + 15) // 16 * 16

    unstaged = up16(p["n_cols"] * p["row_stride"] * element_bytes) + up16(p["k_split"] * p["m_rows"] * p["n_cols"] * acc)
    staged = p["m_rows"] * p["row_stride"] * element_bytes
    # A is staged exactly where several n tiles would read it and it fits
    several_tiles = p["n_tiles"] > 1 if tensor_cores else p["n_cols"] > 4  # the FMA product's 4-column tiles
    assert p["stage_a"] == (several_tiles and unstaged + staged <= shared)
    assert p["shared_bytes"] == unstaged + (staged if p["stage_a"] else 0)
    assert p["usable"] == (p["shared_bytes"] <= shared and batch * p["units"] <= 512)


def test_backward_plan_at_the_goal_configs():
    # B=16 H=768 bf16: 128 blocks of 6 units, one n tile, K = 3072 in 96 chunks over the 8 warps, 54 KB.
    p = backward_plan(768, 16, 2, True)
    assert (p["usable"], p["units"], p["blocks"], p["n_tiles"], p["chunks"], p["k_split"]) == (1, 6, 128, 1, 96, 8)
    assert p["shared_bytes"] < 56 * 1024
    assert backward_plan(768, 16, 4, True)["usable"]  # fp32 as TF32: 103 KB
    assert backward_plan(512, 64, 4, False)["usable"]  # B=64 H=512 fp32 FMA: 32 KB of W
    assert backward_plan(256, 8, 4, False)["usable"]  # B=8 H=256
    assert backward_plan(256, 64, 4, False)["usable"]  # packed B=64 H=256
    assert not backward_plan(1024, 256, 2, True)["usable"]  # B=256: 8 units x 256 rows, past 512 pairs
    assert not backward_plan(1024, 16, 4, True, sms=16, shared=99 * 1024)["usable"]  # 64 units: 1 MB of W


def test_gru_plans_at_the_goal_configs():
    gru_forward = dict(columns_per_unit=3, depth=768)
    # B=16 H=768 bf16: 128 blocks of 6 units, 18 columns in 3 n tiles, K = 768 in 24 chunks split 2 ways
    p = backward_plan(768, 16, 2, True, **gru_forward)
    assert (p["usable"], p["units"], p["blocks"], p["n_tiles"], p["chunks"], p["k_split"]) == (1, 6, 128, 3, 24, 2)
    assert backward_plan(768, 16, 4, True, **gru_forward)["usable"]  # TF32
    assert backward_plan(768, 16, 2, True, depth=3 * 768)["usable"]  # the GRU backward, K = 3H
    assert backward_plan(512, 64, 4, False, columns_per_unit=3, depth=512)["usable"]  # B=64 H=512 fp32 FMA
    assert backward_plan(512, 64, 4, False, depth=3 * 512)["usable"]
    assert not backward_plan(1024, 256, 2, True, columns_per_unit=3, depth=1024)["usable"]  # 2048 pairs


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the persistent kernels run on CUDA only; none here")
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("packed", [False, True])
def test_persistent_forward_and_backward_match_torch_nn(monkeypatch, cell, dtype, packed):
    """Both persistent kernels (forward and backward; LSTM and GRU) and the per-step kernels,
    against torch.nn in float64, through the modules and autograd: outputs and every gradient."""
    torch.manual_seed(17)
    reference = getattr(torch.nn, cell)(6, 40, num_layers=2, bidirectional=True).cuda().double()
    x = torch.randn(9, 5, 6, device="cuda", dtype=torch.float64)
    lengths = torch.tensor([9, 7, 7, 3, 1])
    grad_out = torch.randn(9, 5, 80, device="cuda", dtype=torch.float64)

    def run(module, x):
        x = x.detach().requires_grad_()
        inp = torch.nn.utils.rnn.pack_padded_sequence(x, lengths) if packed else x
        out = module(inp)[0]
        if packed:
            out = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=9)[0]
        grads = torch.autograd.grad((out.double() * grad_out).sum(), [x, *module.parameters()])
        return [out, *grads]

    expected = run(reference, x)
    ours = getattr(lstm_fused, cell)(6, 40, num_layers=2, bidirectional=True).cuda()
    ours.load_state_dict(reference.state_dict())
    ours.to(dtype)
    tolerance = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}[dtype]
    for setting in ("1", "0"):
        monkeypatch.setenv("LSTM_FUSED_PERSISTENT", setting)
        for got, want in zip(run(ours, x.to(dtype)), expected):
            scale = max(want.abs().max().item(), 1.0)
            assert (got.double() - want).abs().max().item() <= tolerance * scale, setting
