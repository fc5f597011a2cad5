"""The CUDA sources (csrc/cuda: host code and kernels) run on the CPU in the SIMT emulator
(csrc/simt), through lstm_fused._simt's ops, against the float64 reference.

The tolerance is the one the CPU tests use: our error against float64 at most twice that of a
plain PyTorch computation in the same dtype (the reference run in that dtype), plus a small floor.
A kernel with a missing barrier, a wrong fragment index or a wrong ping-pong buffer is off by
O(1), far outside it."""
import contextlib
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from lstm_fused.reference import gru_layer_reference, lstm_layer_reference

pytestmark = pytest.mark.simt

try:
    import lstm_fused._simt  # noqa: F401  (registers torch.ops.lstm_fused_simt)

    SIMT = torch.ops.lstm_fused_simt
except ImportError:  # pragma: no cover - depends on the build
    SIMT = None

needs_simt = pytest.mark.skipif(
    SIMT is None, reason="lstm_fused._simt was not built (LSTM_FUSED_SIMT=0 at build time)"
)

ROOT = Path(__file__).resolve().parent.parent
H100 = (132, 227 * 1024, True, 9)
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# The floor, in roundings of the dtype at the result's scale: a few for the half types (the kernels
# compute in float32 and round once), 16 for float32 and float64, as the CPU path tests allow.
FLOOR_ROUNDINGS = {torch.float64: 16, torch.float32: 16, torch.float16: 4, torch.bfloat16: 4}


@pytest.fixture
def device_of(monkeypatch):
    """Sets the virtual device for one test and restores the default after it."""
    def set_device(sm_count, shared_optin, cooperative=True, cc_major=9):
        SIMT.set_virtual_device(sm_count, shared_optin, cooperative, cc_major)

    yield set_device
    if SIMT is not None:
        SIMT.set_virtual_device(*H100)


def kernels_launched(report):
    return set(Path(report).read_text().split()) if Path(report).exists() else set()


def rand(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def lengths_for(T, B, gen):
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0] = T
    return lengths.sort(descending=True).values


def max_error(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_bounded(ours, in_dtype, exact, dtype, what):
    ours_err, theirs_err = max_error(ours, exact), max_error(in_dtype, exact)
    scale = exact.abs().max().item() if exact.numel() else 0.0
    floor = FLOOR_ROUNDINGS[dtype] * torch.finfo(dtype).eps * max(scale, 1e-30)
    assert ours_err <= 2 * theirs_err + floor, (
        f"{what}: error {ours_err:.3g} against float64; plain PyTorch in {dtype}: {theirs_err:.3g}"
    )


def lstm_case(T, B, I, H, proj, bias, use_lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    P = proj or H
    args = [rand(gen, T, B, I), rand(gen, B, P), rand(gen, B, H), rand(gen, 4 * H, I, scale=0.4),
            rand(gen, 4 * H, P, scale=0.4)]
    args += [rand(gen, 4 * H), rand(gen, 4 * H)] if bias else [None, None]
    args.append(rand(gen, P, H, scale=0.4) if proj else None)
    lengths = lengths_for(T, B, gen) if use_lengths else None
    grads = [rand(gen, T, B, P), rand(gen, B, P), rand(gen, B, H)]
    return args, lengths, grads


def lstm_reference_with_grads(args, lengths, reverse, grads, dtype):
    """The reference's outputs and the gradients of x, h0, c0, w_ih, w_hh, b_ih, w_hr in `dtype`."""
    leaves = [a.to(dtype).requires_grad_() if a is not None else None for a in args]
    y, h, c = lstm_layer_reference(*leaves, lengths=lengths, reverse=reverse)
    loss = sum((o * g.to(dtype)).sum() for o, g in zip((y, h, c), grads))
    wanted = [leaves[i] for i in (0, 1, 2, 3, 4, 5, 7) if leaves[i] is not None]
    found = iter(torch.autograd.grad(loss, wanted, allow_unused=True))
    grads_out = [next(found) if leaves[i] is not None else None for i in (0, 1, 2, 3, 4, 5, 7)]
    return [y, h, c], grads_out


def run_simt_lstm(args, lengths, reverse, grads, dtype):
    a = [t.to(dtype) if t is not None else None for t in args]
    y, h_n, c_n, reserve = SIMT.lstm_layer_forward(*a, lengths, reverse)
    g = [t.to(dtype) for t in grads]
    backward = SIMT.lstm_layer_backward(g[0], g[1], g[2], a[0], a[1], a[2], a[3], a[4], a[7], y, reserve,
                                        lengths, reverse)
    return [y, h_n, c_n], list(backward)


def check_lstm(args, lengths, reverse, grads, dtype, forward_bound_dtype=None):
    """forward_bound_dtype: the dtype whose plain-PyTorch error bounds the forward outputs, when the
    kernel computes at another precision than `dtype` (TF32 for float32: float16's 10-bit mantissa)."""
    outs, back = run_simt_lstm(args, lengths, reverse, grads, dtype)
    bound_dtype = forward_bound_dtype or dtype
    exact_outs, exact_grads = lstm_reference_with_grads(args, lengths, reverse, grads, torch.float64)
    dtype_outs, dtype_grads = lstm_reference_with_grads(args, lengths, reverse, grads, dtype)
    bound_outs = dtype_outs if bound_dtype == dtype else lstm_reference_with_grads(
        args, lengths, reverse, grads, bound_dtype)[0]
    for name, ours, theirs, exact in zip(("y", "h_n", "c_n"), outs, bound_outs, exact_outs):
        assert ours.dtype == dtype and ours.shape == exact.shape, name
        check_bounded(ours, theirs, exact, bound_dtype, name)
    # The backward reads the forward's reserve, whose precision is the forward's: under TF32 both
    # are bounded by the bound dtype's plain-PyTorch error.
    bound_grads = dtype_grads if bound_dtype == dtype else lstm_reference_with_grads(
        args, lengths, reverse, grads, bound_dtype)[1]
    names = ("grad_x", "grad_h0", "grad_c0", "grad_w_ih", "grad_w_hh", "grad_bias", "grad_w_hr")
    for name, ours, theirs, exact in zip(names, back, bound_grads, exact_grads):
        if exact is None:
            continue
        check_bounded(ours, theirs, exact, bound_dtype, name)


@contextlib.contextmanager
def matmul_tf32(enabled):
    """TF32 for float32 matmuls on or off, through the precision setting that the CUDA host code
    reads; torch raises where the legacy allow_tf32 flag and this setting disagree."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "tf32" if enabled else "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


def persistent_kernel_for(dtype):
    """The persistent kernel lstm_persistent.cu picks: tensor cores for the half types (and for
    float32 with TF32 allowed), FMAs otherwise."""
    tensor_cores = dtype in (torch.float16, torch.bfloat16) or (
        dtype == torch.float32 and torch.backends.cuda.matmul.fp32_precision == "tf32")
    return "lstm_persistent_tc_forward_kernel" if tensor_cores else "lstm_persistent_forward_kernel"


def persistent_backward_kernel_for(dtype):
    """The same choice for the backward kernel (one template; the launch names its product)."""
    return persistent_kernel_for(dtype).replace("forward", "backward")


def gru_case(T, B, I, H, bias, use_lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    args = [rand(gen, T, B, I), rand(gen, B, H), rand(gen, 3 * H, I, scale=0.4), rand(gen, 3 * H, H, scale=0.4)]
    args += [rand(gen, 3 * H), rand(gen, 3 * H)] if bias else [None, None]
    lengths = lengths_for(T, B, gen) if use_lengths else None
    return args, lengths, [rand(gen, T, B, H), rand(gen, B, H)]


def gru_reference_with_grads(args, lengths, reverse, grads, dtype):
    leaves = [a.to(dtype).requires_grad_() if a is not None else None for a in args]
    y, h = gru_layer_reference(*leaves, lengths=lengths, reverse=reverse)
    loss = (y * grads[0].to(dtype)).sum() + (h * grads[1].to(dtype)).sum()
    wanted = [leaf for leaf in leaves if leaf is not None]
    found = iter(torch.autograd.grad(loss, wanted, allow_unused=True))
    return [y, h], [next(found) if leaf is not None else None for leaf in leaves]


def check_gru(args, lengths, reverse, grads, dtype, bound_dtype=None):
    """bound_dtype: as check_lstm's forward_bound_dtype (float16's error bounds TF32's)."""
    bound_dtype = bound_dtype or dtype
    a = [t.to(dtype) if t is not None else None for t in args]
    y, h_n, reserve = SIMT.gru_layer_forward(*a, lengths, reverse)
    g = [t.to(dtype) for t in grads]
    back = SIMT.gru_layer_backward(g[0], g[1], a[0], a[1], a[2], a[3], y, reserve, lengths, reverse)
    exact_outs, exact_grads = gru_reference_with_grads(args, lengths, reverse, grads, torch.float64)
    dtype_outs, dtype_grads = gru_reference_with_grads(args, lengths, reverse, grads, bound_dtype)
    for name, ours, theirs, exact in zip(("y", "h_n"), (y, h_n), dtype_outs, exact_outs):
        assert ours.dtype == dtype and ours.shape == exact.shape, name
        check_bounded(ours, theirs, exact, bound_dtype, name)
    names = ("grad_x", "grad_h0", "grad_w_ih", "grad_w_hh", "grad_b_ih", "grad_b_hh")
    for name, ours, theirs, exact in zip(names, back, dtype_grads, exact_grads):
        if exact is not None:
            check_bounded(ours, theirs, exact, bound_dtype, name)


# (T, B, I, H): B=11 is not a multiple of the 8 rows per block, H=40 not of the 32 units per
# block: two blocks in each grid dimension, both with ragged edges.
SHAPE = (5, 11, 6, 40)
PATHS = [  # use_lengths, reverse
    (False, False),
    (False, True),
    (True, False),
    (True, True),
]


@needs_simt
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("use_lengths,reverse", PATHS)
@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "per_step"])
def test_lstm_kernels_match_the_float64_reference(monkeypatch, device_of, tmp_path, dtype, use_lengths, reverse,
                                                  persistent):
    report = tmp_path / "kernels.txt"
    monkeypatch.setenv("LSTM_FUSED_SIMT_REPORT", str(report))
    monkeypatch.setenv("LSTM_FUSED_PERSISTENT", "1" if persistent else "0")
    device_of(4, 227 * 1024)  # 4 SMs: the persistent plan spreads H=40 over 4 blocks of 10 units
    args, lengths, grads = lstm_case(*SHAPE, proj=0, bias=True, use_lengths=use_lengths, seed=3)
    with matmul_tf32(False):
        check_lstm(args, lengths, reverse, grads, dtype)
        expected = persistent_kernel_for(dtype), persistent_backward_kernel_for(dtype)
    launched = kernels_launched(report)
    assert all((name in launched) == persistent for name in expected), launched
    assert ("lstm_forward_step_kernel" in launched) == (not persistent)
    assert ("lstm_backward_pointwise_kernel" in launched) == (not persistent)


@needs_simt
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("use_lengths,reverse", PATHS)
@pytest.mark.parametrize("sm_count,B", [(4, 20), (132, 11)], ids=["4sm-2mtiles", "h100-ksplit"])
def test_tensor_core_persistent_kernel(monkeypatch, device_of, tmp_path, dtype, use_lengths, reverse, sm_count, B):
    """4 SMs: 4 blocks of 10 units (5 n tiles), B=20 in two m tiles. 132 SMs: 20 blocks of 2 units,
    one n tile whose K range is split over 3 warps. float32 runs as TF32 (allow_tf32)."""
    report = tmp_path / "kernels.txt"
    monkeypatch.setenv("LSTM_FUSED_SIMT_REPORT", str(report))
    device_of(sm_count, 227 * 1024)
    args, lengths, grads = lstm_case(5, B, 6, 40, proj=0, bias=True, use_lengths=use_lengths, seed=12)
    with matmul_tf32(dtype == torch.float32):
        check_lstm(args, lengths, reverse, grads, dtype,
                   forward_bound_dtype=torch.float16 if dtype == torch.float32 else None)
    assert {"lstm_persistent_tc_forward_kernel", "lstm_persistent_tc_backward_kernel"} <= kernels_launched(report)


@needs_simt
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("sm_count,B,H,use_lengths,reverse", [
    (4, 7, 37, True, False),    # 4H = 148: rows not 16-byte aligned in bf16, K ends inside a chunk
    (4, 33, 38, False, True),   # 4H = 152: aligned rows, a ragged last chunk; B=33 in 3 m tiles
    (2, 5, 36, True, True),     # 18 units per block: 3 n tiles, K split over 2 warps each
    (132, 16, 64, False, False),  # the H100 plan: 64 blocks of one unit, one n tile, K split 8 ways
])
def test_tensor_core_persistent_backward_edges(monkeypatch, device_of, tmp_path, dtype, sm_count, B, H, use_lengths,
                                               reverse):
    """The backward kernel's tensor-core product: K tails, unaligned rows, several m and n tiles."""
    report = tmp_path / "kernels.txt"
    monkeypatch.setenv("LSTM_FUSED_SIMT_REPORT", str(report))
    device_of(sm_count, 227 * 1024)
    args, lengths, grads = lstm_case(4, B, 5, H, proj=0, bias=True, use_lengths=use_lengths, seed=14)
    with matmul_tf32(dtype == torch.float32):
        check_lstm(args, lengths, reverse, grads, dtype,
                   forward_bound_dtype=torch.float16 if dtype == torch.float32 else None)
    assert "lstm_persistent_tc_backward_kernel" in kernels_launched(report)


@needs_simt
def test_persistent_fma_setting_keeps_the_fma_backward(monkeypatch, tmp_path):
    """LSTM_FUSED_PERSISTENT=fma: both persistent kernels on FMAs, even for bf16."""
    report = tmp_path / "kernels.txt"
    monkeypatch.setenv("LSTM_FUSED_SIMT_REPORT", str(report))
    monkeypatch.setenv("LSTM_FUSED_PERSISTENT", "fma")
    args, lengths, grads = lstm_case(3, 6, 4, 24, proj=0, bias=False, use_lengths=True, seed=15)
    check_lstm(args, lengths, False, grads, torch.bfloat16)
    launched = kernels_launched(report)
    assert {"lstm_persistent_forward_kernel", "lstm_persistent_backward_kernel"} <= launched, launched
    assert not {"lstm_persistent_tc_forward_kernel", "lstm_persistent_tc_backward_kernel"} & launched


COUNTER_NAMES = ("launches", "blocks", "threads", "block_barriers", "warp_collectives", "grid_barriers", "mma",
                 "ldmatrix", "cp_async", "context_switches")


@needs_simt
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("blocks,k_split", [(2, 3), (3, 1), (4, 5)])
def test_plan_overrides_for_the_tile_sweep(monkeypatch, device_of, tmp_path, cell, dtype, blocks, k_split):
    """LSTM_FUSED_PERSISTENT_BLOCKS / _K_SPLIT (gpu_bench's sweep): the persistent kernels run on the
    plan they ask for (fewer, wider blocks; other K splits) and stay right."""
    report = tmp_path / "kernels.txt"
    monkeypatch.setenv("LSTM_FUSED_SIMT_REPORT", str(report))
    monkeypatch.setenv("LSTM_FUSED_PERSISTENT_BLOCKS", str(blocks))
    monkeypatch.setenv("LSTM_FUSED_PERSISTENT_K_SPLIT", str(k_split))
    device_of(4, 227 * 1024)
    SIMT.reset_counters()
    if cell == "lstm":
        args, lengths, grads = lstm_case(4, 7, 5, 40, proj=0, bias=True, use_lengths=True, seed=20)
        check_lstm(args, lengths, True, grads, dtype)
    else:
        args, lengths, grads = gru_case(4, 7, 5, 40, bias=True, use_lengths=True, seed=20)
        check_gru(args, lengths, True, grads, dtype)
    counts = dict(zip(COUNTER_NAMES, SIMT.counters()))
    assert counts["launches"] == 2 and counts["blocks"] == 2 * blocks, counts  # forward and backward kernels
    assert counts["grid_barriers"] > 0


@needs_simt
def test_tensor_core_kernel_needs_sm80(monkeypatch, tmp_path):
    """On a virtual device below compute capability 8.0 the bf16 layer takes the FMA kernel."""
    report = tmp_path / "kernels.txt"
    monkeypatch.setenv("LSTM_FUSED_SIMT_REPORT", str(report))
    try:
        SIMT.set_virtual_device(4, 96 * 1024, True, 7)
        args, lengths, grads = lstm_case(3, 5, 4, 40, proj=0, bias=True, use_lengths=False, seed=13)
        check_lstm(args, lengths, False, grads, torch.bfloat16)
    finally:
        SIMT.set_virtual_device(*H100)
    launched = kernels_launched(report)
    assert {"lstm_persistent_forward_kernel", "lstm_persistent_backward_kernel"} <= launched
    assert not {"lstm_persistent_tc_forward_kernel", "lstm_persistent_tc_backward_kernel"} & launched


@needs_simt
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("use_lengths,reverse", PATHS)
def test_gemm_step_path(monkeypatch, tmp_path, cell, dtype, use_lengths, reverse):
    """The large-step form of the per-step path (LSTM_FUSED_STEP=gemm): h_{t-1} W_hh^T by the GEMM
    (ATen's on the CPU here, cuBLAS on a GPU) and one pointwise kernel per step."""
    report = tmp_path / "kernels.txt"
    monkeypatch.setenv("LSTM_FUSED_SIMT_REPORT", str(report))
    monkeypatch.setenv("LSTM_FUSED_PERSISTENT", "0")
    monkeypatch.setenv("LSTM_FUSED_STEP", "gemm")
    with matmul_tf32(False):
        if cell == "lstm":
            args, lengths, grads = lstm_case(*SHAPE, proj=0, bias=True, use_lengths=use_lengths, seed=18)
            check_lstm(args, lengths, reverse, grads, dtype)
        else:
            args, lengths, grads = gru_case(*SHAPE, bias=True, use_lengths=use_lengths, seed=18)
            check_gru(args, lengths, reverse, grads, dtype)
    launched = kernels_launched(report)
    assert f"{cell}_forward_pointwise_kernel" in launched and f"{cell}_forward_step_kernel" not in launched


@needs_simt
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("B,H,gemm", [(32, 512, True), (11, 40, False), (64, 200, False)])
def test_large_steps_take_the_gemm_by_default(monkeypatch, tmp_path, cell, B, H, gemm):
    """Without a persistent plan, steps of >= 32 rows and >= 64 x 256 rows x units take the GEMM."""
    report = tmp_path / "kernels.txt"
    monkeypatch.setenv("LSTM_FUSED_SIMT_REPORT", str(report))
    monkeypatch.setenv("LSTM_FUSED_PERSISTENT", "0")
    monkeypatch.delenv("LSTM_FUSED_STEP", raising=False)
    if cell == "lstm":
        args, lengths, grads = lstm_case(2, B, 3, H, proj=0, bias=True, use_lengths=False, seed=19)
        run_simt_lstm(args, lengths, False, grads, torch.float32)
    else:
        args, lengths, grads = gru_case(2, B, 3, H, bias=True, use_lengths=False, seed=19)
        check_gru(args, lengths, False, grads, torch.float32)
    launched = kernels_launched(report)
    assert (f"{cell}_forward_pointwise_kernel" in launched) == gemm
    assert (f"{cell}_forward_step_kernel" in launched) == (not gemm)


@needs_simt
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("use_lengths,reverse", [(False, False), (True, True)])
def test_lstm_with_projection_and_no_bias(dtype, use_lengths, reverse):
    args, lengths, grads = lstm_case(4, 9, 5, 37, proj=23, bias=False, use_lengths=use_lengths, seed=5)
    check_lstm(args, lengths, reverse, grads, dtype)


@needs_simt
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("use_lengths,reverse", PATHS)
@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "per_step"])
def test_gru_kernels_match_the_float64_reference(monkeypatch, device_of, tmp_path, dtype, use_lengths, reverse,
                                                 persistent):
    report = tmp_path / "kernels.txt"
    monkeypatch.setenv("LSTM_FUSED_SIMT_REPORT", str(report))
    monkeypatch.setenv("LSTM_FUSED_PERSISTENT", "1" if persistent else "0")
    device_of(4, 227 * 1024)  # 4 blocks of 10 units: 30 columns forward (4 n tiles on tensor cores)
    args, lengths, grads = gru_case(*SHAPE, bias=True, use_lengths=use_lengths, seed=4)
    with matmul_tf32(False):
        check_gru(args, lengths, reverse, grads, dtype)
        expected = {persistent_kernel_for(dtype).replace("lstm", "gru"),
                    persistent_backward_kernel_for(dtype).replace("lstm", "gru")}
    launched = kernels_launched(report)
    assert all((name in launched) == persistent for name in expected), launched
    assert {"gru_forward_step_kernel", "gru_backward_pointwise_kernel"}.isdisjoint(launched) == persistent


@needs_simt
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("sm_count,B,H,use_lengths,reverse", [
    (4, 20, 37, True, False),   # 10 units: 30 columns in 4 n tiles; K = 37 and 111 end inside a chunk
    (3, 33, 36, False, True),   # 12 units: 36 columns in 5 n tiles; B=33 in 3 m tiles
    (132, 16, 64, True, True),  # the H100 plan: 64 blocks of one unit, K split over the 8 warps
])
def test_gru_tensor_core_persistent_kernels(monkeypatch, device_of, tmp_path, dtype, sm_count, B, H, use_lengths,
                                            reverse):
    report = tmp_path / "kernels.txt"
    monkeypatch.setenv("LSTM_FUSED_SIMT_REPORT", str(report))
    device_of(sm_count, 227 * 1024)
    args, lengths, grads = gru_case(4, B, 5, H, bias=True, use_lengths=use_lengths, seed=16)
    with matmul_tf32(dtype == torch.float32):
        check_gru(args, lengths, reverse, grads, dtype, bound_dtype=torch.float16 if dtype == torch.float32 else None)
    assert {"gru_persistent_tc_forward_kernel", "gru_persistent_tc_backward_kernel"} <= kernels_launched(report)


@needs_simt
def test_gru_without_bias():
    args, lengths, grads = gru_case(3, 9, 4, 35, bias=False, use_lengths=True, seed=6)
    check_gru(args, lengths, False, grads, torch.float32)


@needs_simt
def test_persistent_kernel_on_the_h100_plan(monkeypatch, tmp_path):
    """The plan of the real device (132 SMs: one hidden unit per block, 40 blocks at H=40)."""
    report = tmp_path / "kernels.txt"
    monkeypatch.setenv("LSTM_FUSED_SIMT_REPORT", str(report))
    SIMT.set_virtual_device(*H100)
    args, lengths, grads = lstm_case(3, 5, 4, 40, proj=0, bias=True, use_lengths=True, seed=8)
    with matmul_tf32(False):
        check_lstm(args, lengths, True, grads, torch.float32)
    assert {"lstm_persistent_forward_kernel", "lstm_persistent_backward_kernel"} <= kernels_launched(report)


@needs_simt
@pytest.mark.parametrize("sm_count,shared,cooperative,why", [
    (4, 4 * 1024, True, "W_hh slice does not fit in shared memory"),
    (4, 227 * 1024, False, "no cooperative launch"),
])
def test_persistent_plan_falls_back_to_the_per_step_kernel(monkeypatch, device_of, tmp_path, sm_count, shared,
                                                           cooperative, why):
    report = tmp_path / "kernels.txt"
    monkeypatch.setenv("LSTM_FUSED_SIMT_REPORT", str(report))
    device_of(sm_count, shared, cooperative)
    args, lengths, grads = lstm_case(*SHAPE, proj=0, bias=True, use_lengths=False, seed=9)
    check_lstm(args, lengths, False, grads, torch.float32)
    args, lengths, grads = gru_case(*SHAPE, bias=True, use_lengths=False, seed=9)
    check_gru(args, lengths, False, grads, torch.float32)
    launched = kernels_launched(report)
    assert not {"lstm_persistent_forward_kernel", "lstm_persistent_backward_kernel", "gru_persistent_forward_kernel",
                "gru_persistent_backward_kernel"} & launched, why
    assert {"lstm_forward_step_kernel", "lstm_backward_pointwise_kernel", "gru_forward_step_kernel",
            "gru_backward_pointwise_kernel"} <= launched, why


@needs_simt
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("T,B,H", [(3, 4, 0), (3, 0, 5), (0, 3, 5)], ids=["hidden0", "batch0", "steps0"])
def test_empty_sizes(cell, T, B, H):
    """hidden_size 0 is legal in torch.nn's cells: nothing is launched (a zero-block grid would
    be refused by CUDA) and the results have the right shapes."""
    if cell == "lstm":
        args, lengths, grads = lstm_case(T, B, 2, H, proj=0, bias=True, use_lengths=False, seed=1)
        check_lstm(args, lengths, False, grads, torch.float32)
    else:
        args, lengths, grads = gru_case(T, B, 2, H, bias=True, use_lengths=False, seed=1)
        check_gru(args, lengths, False, grads, torch.float32)


def global_kernels_in_sources():
    names = set()
    for path in (ROOT / "csrc").rglob("*"):
        if path.suffix in (".cu", ".cuh", ".h") and "simt" not in path.parts:
            names |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)", path.read_text()))
    return names


@needs_simt
def test_every_cuda_kernel_runs_in_emulation(monkeypatch, device_of, tmp_path):
    report = tmp_path / "kernels.txt"
    monkeypatch.setenv("LSTM_FUSED_SIMT_REPORT", str(report))
    device_of(4, 227 * 1024)
    for setting, step, dtype in (("1", "fused", torch.bfloat16), ("1", "fused", torch.float32),
                                 ("0", "fused", torch.float32), ("0", "gemm", torch.float32)):
        monkeypatch.setenv("LSTM_FUSED_PERSISTENT", setting)
        monkeypatch.setenv("LSTM_FUSED_STEP", step)
        args, lengths, grads = lstm_case(3, 5, 4, 9, proj=0, bias=True, use_lengths=True, seed=2)
        with matmul_tf32(False):
            run_simt_lstm(args, lengths, False, grads, dtype)
            gru_args, gru_lengths, gru_grads = gru_case(3, 5, 4, 9, bias=True, use_lengths=True, seed=2)
            check_gru(gru_args, gru_lengths, False, gru_grads, dtype)
    in_sources = global_kernels_in_sources()
    assert in_sources, "no __global__ kernel found under csrc/: the pattern is out of date"
    missing = in_sources - kernels_launched(report)
    assert not missing, f"kernels never launched in emulation: {sorted(missing)}"


sys.path.insert(0, str(ROOT / "tests" / "simt"))
import simt_programs  # noqa: E402


@pytest.mark.skipif(simt_programs.GXX is None, reason="no g++ to build the race-mode program")
def test_kernels_have_no_shared_memory_races():
    """Race mode: every kernel once (the tensor-core one in bf16 and TF32), on multi-block shapes,
    under ThreadSanitizer, which reports two threads of a block touching the same word between
    barriers (one writing), as compute-sanitizer's racecheck does on a GPU."""
    program = simt_programs.build("kernel_races", [ROOT / "tests" / "simt" / "kernel_races.cpp"], tsan=True,
                                  depends=sorted((ROOT / "csrc" / "cuda").glob("*.cuh")) +
                                  [ROOT / "csrc" / "cell_math.h", ROOT / "csrc" / "persistent_plan.h"])
    result = simt_programs.run([program], tsan=True, env={"LSTM_FUSED_SIMT_REPORT": ""}, timeout=600)
    assert simt_programs.races(result.stderr) == [], result.stderr[-6000:]
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    assert "0 launch failures" in result.stdout
