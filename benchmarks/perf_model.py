"""A performance model of the CUDA kernels: predicted microseconds per step on an H100/H200, for
the goal configs of issue 17, beside cuDNN's published figure. Nothing here is measured: it turns
each kernel's per-step work (from the same plan functions the kernels use, torch.ops.lstm_fused.
_persistent_tc_plan / _persistent_product_plan) into time with published latencies, so that the first GPU
run (benchmarks/gpu_check.sh prints the measured figures beside these) tells us where it is wrong.

    python benchmarks/perf_model.py            # the table
    python benchmarks/perf_model.py --json     # the same as JSON (gpu_check.sh keeps it)
    python benchmarks/perf_model.py --emulate  # also run each kernel, forward and backward, for 2 steps in the
                                               # SIMT emulator (lstm_fused._simt) on a virtual
                                               # H100 and print what it counted per step and block

Latencies and rates (cycles at the SM clock; "est." where no public figure was found):
- SM clock under load: 1.755 GHz (H100 SXM boost is 1.98 GHz; sustained under tensor-core load
  lower; est.).
- L2 hit latency ~260 cycles, shared memory ~30 cycles: Luo et al., "Benchmarking and Dissecting
  the Nvidia Hopper GPU Architecture", arXiv 2402.13499 (measured on H800); Chips and Cheese,
  "Nvidia's H100: Funny L2, and Tons of Bandwidth" (2023) for the L2's two partitions (a far hit
  costs more: we take 260 as the average, est.).
- mma.sync m16n8k16 (bf16/fp16 -> fp32) dependent-issue latency ~32 cycles, m16n8k8 tf32 ~32
  (Luo et al. report mma.sync latencies of this order on Hopper; est. for the exact figure).
- A grid-wide barrier (cooperative_groups grid.sync over ~128 blocks): ~1.0 us (est.; 0.5-2 us
  depending on the implementation and the number of blocks).
- A kernel launch through ATen from the host: ~5 us when the host is the bottleneck (est.; a
  CUDA launch is ~2-3 us of CPU time plus ATen's dispatch).
- cuDNN (nn.LSTM, fp16, H100 SXM, B=16 T=1024 I=H=768): 2.01 ms forward, 5.19 ms forward+backward
  (FlashRNN's published benchmark; ../shared/cuda-facts.md).
"""
import argparse
import json
import math

import torch

import lstm_fused  # noqa: F401  (registers the plan ops)

CLOCK_GHZ = 1.755
L2_CYCLES = 260
SHARED_CYCLES = 30
MMA_CYCLES = 32
L2_BYTES_PER_US = 5.5e6  # H100 L2 read bandwidth, ~5.5 TB/s (Chips and Cheese's H100 article; est. for H200)
GRID_SYNC_US = 1.0
LAUNCH_US = 5.0
SMS, SHARED_OPTIN = 132, 227 * 1024
OUTSTANDING_LOADS = 8  # independent loads a thread keeps in flight before the first returns (est.)
CUDNN_US_PER_STEP = {(16, 768, "fp16"): (2.01e3 / 1024, 5.19e3 / 1024)}

GOAL_CONFIGS = [  # (B, T, I, H, dtype): issue 17's table
    (16, 1024, 768, 768, "bf16"),
    (16, 1024, 768, 768, "fp32-tf32"),
    (64, 100, 512, 512, "fp32"),
    (8, 512, 128, 256, "fp32"),
    (256, 50, 1024, 1024, "bf16"),
    (64, 400, 256, 256, "fp32-packed"),
]


def us(cycles):
    return cycles / (CLOCK_GHZ * 1e3)


def element_bytes(dtype):
    return 2 if dtype in ("bf16", "fp16") else 4


def tensor_cores(dtype, allow_tf32):
    return dtype in ("bf16", "fp16") or (dtype.startswith("fp32") and allow_tf32)


def load_rounds(loads_per_thread):
    return math.ceil(loads_per_thread / OUTSTANDING_LOADS)


def tc_persistent_step(B, H, dtype):
    """lstm_persistent_tc_forward_kernel: per step, the staging of h_{t-1} (16-byte cp.async.cg
    from L2), the dependent mma chain of the longest warp job (two accumulators), the cell (its
    input projection already loaded before the staging), then grid.sync."""
    es = element_bytes(dtype)
    plan = torch.ops.lstm_fused._persistent_tc_plan(H, B, es, SMS, SHARED_OPTIN)
    usable, units, blocks, m_tiles, n_tiles, k_tiles, k_split, _, shared = plan
    if not usable:
        return None
    chunks_per_thread = math.ceil(B * H * es / 16 / 256)
    stage = load_rounds(chunks_per_thread) * L2_CYCLES + SHARED_CYCLES
    k_per_job = math.ceil(k_tiles / k_split)
    mma_per_k16 = 2 if dtype.startswith("fp32") else 1
    jobs_per_warp = math.ceil(n_tiles * k_split / 8)
    # two independent chains of k_per_job / 2 each; ldmatrix / lane loads overlap the mma latency
    chain = jobs_per_warp * m_tiles * (math.ceil(k_per_job / 2) * mma_per_k16 * MMA_CYCLES + 2 * SHARED_CYCLES)
    cell = k_split * SHARED_CYCLES + 120 + L2_CYCLES  # partial sums, activations, the stores
    barriers = 2 * 40  # two __syncthreads
    counts = dict(blocks=blocks, units_per_block=units, m_tiles=m_tiles, n_tiles=n_tiles, k_split=k_split,
                  shared_bytes=shared, stage_chunks_per_thread=chunks_per_thread,
                  mma_per_warp_per_step=jobs_per_warp * m_tiles * k_per_job * mma_per_k16, grid_syncs=1,
                  block_barriers=2)
    return us(stage + chain + cell + barriers) + GRID_SYNC_US, counts


def per_step_kernel_step(B, H, dtype):
    """lstm_forward_step_kernel: ceil(H/32) x ceil(B/8) blocks, K in tiles of 32, each tile's 17
    loads per thread serialised (a run-time-strided loop), one launch per step."""
    tiles = math.ceil(H / 32)
    blocks = tiles * math.ceil(B / 8)
    waves = math.ceil(blocks / (SMS * 8))
    per_tile = 17 * L2_CYCLES * 0.7 + 2 * 40 + 32 * 4 * 2  # loads partly overlap across warps (est.)
    device = us(waves * tiles * per_tile)
    return max(device, LAUNCH_US), dict(blocks=blocks, k_tiles=tiles, launches=1)


def gemm_step(B, H, dtype, gates=4, tensor_core=True):
    """The per-step path's GEMM form (StepForm in csrc/cuda/recurrent_step.cuh: >= 32 rows and
    >= 64 x 256 rows x units): cuBLAS for h_{t-1} W_hh^T (est. 400 TFLOP/s for bf16 / fp16 / TF32, 50
    for FP32) and one pointwise kernel, two launches per step: host-bound below ~10 us."""
    gemm_us = 2 * B * gates * H * H / (400e12 if tensor_core else 50e12) * 1e6
    device = gemm_us + us(3 * L2_CYCLES)
    return max(device, 2 * LAUNCH_US), dict(launches=2, gemm_us=gemm_us)


def uses_gemm_step(B, H):
    return B >= 32 and B * H >= 64 * 256


def per_step_backward_step(B, H, dtype):
    """The per-step backward (where no persistent plan fits): a pointwise kernel and a cuBLAS GEMM
    (dG_t W_hh) launched per step: host-bound at small batches."""
    es = element_bytes(dtype)
    gemm_flops = 2 * B * 4 * H * H
    gemm_us = gemm_flops / (400e12 if es == 2 else 50e12) * 1e6 + us(3 * L2_CYCLES)
    return max(2 * LAUNCH_US, gemm_us + 2.0), dict(launches=2)


def product_plan(B, H, dtype, tensor_core, columns_per_unit, depth):
    es = element_bytes(dtype)
    fields = ("usable", "units", "blocks", "m_rows", "n_cols", "n_tiles", "chunks", "k_split", "row_stride",
              "stage_a", "shared_bytes")
    values = torch.ops.lstm_fused._persistent_product_plan(H, B, columns_per_unit, depth, es, 4, tensor_core, SMS,
                                                           SHARED_OPTIN)
    return dict(zip(fields, values))


# The product-generic persistent kernels (csrc/cuda/persistent_recurrent.cuh): N columns per
# unit and K of each, by kernel.
PRODUCT_KERNELS = {
    "lstm_forward": (4, lambda H: H),  # FMA only: the tensor-core LSTM forward is its own kernel
    "lstm_backward": (1, lambda H: 4 * H),
    "gru_forward": (3, lambda H: H),
    "gru_backward": (1, lambda H: 3 * H),
}


def tc_product_step(B, H, dtype, kernel):
    """A product-generic persistent kernel on tensor cores: per step every block reads all of A
    ([B, K], written by every block before the barrier) through L2, by 16-byte lane loads straight
    into registers (one n tile: each element once per block) or staged once into shared memory by
    cp.async (several n tiles); two mma.sync per 64-byte chunk into two accumulators; the pointwise
    work of its pairs (inputs loaded before the product); grid.sync. The step moves
    blocks x B x K elements through L2: the LSTM backward at B=16 H=768 bf16, 128 x 98 KB = 12.6 MB."""
    es = element_bytes(dtype)
    columns_per_unit, depth = PRODUCT_KERNELS[kernel]
    K = depth(H)
    p = product_plan(B, H, dtype, True, columns_per_unit, K)
    if not p["usable"]:
        return None
    m_tiles = p["m_rows"] // 16
    jobs_per_warp = math.ceil(p["n_tiles"] * p["k_split"] / 8)
    chunks_per_job = math.ceil(p["chunks"] / p["k_split"])
    if p["stage_a"]:
        stage = load_rounds(math.ceil(B * K * es / 16 / 256)) * L2_CYCLES + 40  # cp.async, then a barrier
        per_job = m_tiles * (chunks_per_job * MMA_CYCLES + SHARED_CYCLES)
    else:
        stage = 0
        per_job = m_tiles * max(chunks_per_job * MMA_CYCLES,  # each chunk adds one mma to each of two chains
                                load_rounds(2 * chunks_per_job) * L2_CYCLES)  # 2 A loads per chunk, L2 latency
    latency = stage + jobs_per_warp * per_job + L2_CYCLES
    l2_bytes = p["blocks"] * B * K * es * (1 if p["stage_a"] else p["n_tiles"])
    bandwidth = l2_bytes / L2_BYTES_PER_US
    pointwise = p["k_split"] * SHARED_CYCLES + 150 + L2_CYCLES  # partials, the cell, the stores
    counts = dict(blocks=p["blocks"], units_per_block=p["units"], n_tiles=p["n_tiles"], k_split=p["k_split"],
                  chunks=p["chunks"], stage_a=bool(p["stage_a"]), shared_bytes=p["shared_bytes"],
                  mma_per_warp_per_step=jobs_per_warp * m_tiles * chunks_per_job * 2,  # two per chunk
                  mma_per_block_per_step=p["n_tiles"] * p["k_split"] * m_tiles * chunks_per_job * 2,
                  l2_bytes_per_step=l2_bytes, grid_syncs=1)
    return max(us(latency), bandwidth) + us(pointwise + 40) + GRID_SYNC_US, counts


def fma_product_step(B, H, dtype, kernel):
    """A product-generic persistent kernel on FMAs: 4 x 4 register tiles (rows x columns) per
    warp, lanes over K, so each k costs 8 loads for 16 FMAs; A from shared memory where the plan
    stages it (several column tiles), else from L2; 16 values reduced over the warp per tile."""
    es = element_bytes(dtype)
    columns_per_unit, depth = PRODUCT_KERNELS[kernel]
    K = depth(H)
    p = product_plan(B, H, dtype, False, columns_per_unit, K)
    if not p["usable"]:
        return None
    tiles_per_warp = math.ceil(math.ceil(B / 4) * math.ceil(p["n_cols"] / 4) * p["k_split"] / 8)
    k_per_lane = math.ceil(K / p["k_split"] / 32)
    # 8 loads and 16 FMAs per k: ~24 issue slots, two warps per scheduler (est.)
    compute = k_per_lane * 48
    if p["stage_a"]:
        stage = load_rounds(math.ceil(B * K * es / 16 / 256)) * L2_CYCLES + 40
        per_tile = compute
    else:
        stage = 0
        per_tile = max(compute, load_rounds(4 * k_per_lane) * L2_CYCLES)
    reduction = 5 * 30 + 80 * 2
    pointwise = p["k_split"] * SHARED_CYCLES + 150 + L2_CYCLES
    l2_bytes = p["blocks"] * B * K * es * (1 if p["stage_a"] else math.ceil(p["n_cols"] / 4))
    counts = dict(blocks=p["blocks"], units_per_block=p["units"], jobs_per_warp=tiles_per_warp, k_split=p["k_split"],
                  stage_a=bool(p["stage_a"]), shared_bytes=p["shared_bytes"], l2_bytes_per_step=l2_bytes, grid_syncs=1)
    latency = us(stage + tiles_per_warp * (per_tile + reduction) + pointwise)
    return max(latency, l2_bytes / L2_BYTES_PER_US + us(pointwise)) + GRID_SYNC_US, counts


def gru_per_step_forward(B, H, dtype, tensor_core):
    """gru_forward_step_kernel (the LSTM per-step kernel's shape with 3 gates, one launch per
    step), or the GEMM form for large steps."""
    if uses_gemm_step(B, H):
        return gemm_step(B, H, dtype, gates=3, tensor_core=tensor_core)
    time, counts = per_step_kernel_step(B, H, dtype)
    return time * 3 / 4 if time > LAUNCH_US else time, counts


def backward_gemms_per_step(B, I, H, dtype, allow_tf32, gates):
    """The GEMMs after the backward loop (dW_ih, dW_hh with the bias, dx), per step of the
    sequence: 2 B gH (I + H) + 2 B gH I flops at cuBLAS's rate (est.: 400 TFLOP/s for bf16 / fp16
    and TF32 at these sizes, 50 for FP32)."""
    flops = 2 * B * gates * H * (I + H) + 2 * B * gates * H * I
    rate = 400e12 if tensor_cores(dtype, allow_tf32) else 50e12
    return flops / rate * 1e6


def predict(B, T, I, H, dtype, allow_tf32=True):
    base = dtype.split("-")[0]
    if base == "fp32" and "tf32" not in dtype:
        allow_tf32 = False
    row = dict(B=B, T=T, I=I, H=H, dtype=dtype)
    forward = None
    if tensor_cores(dtype, allow_tf32):
        forward = tc_persistent_step(B, H, base)
        row["kernel"] = "lstm_persistent_tc_forward_kernel"
    if forward is None:
        forward = fma_product_step(B, H, base, "lstm_forward")
        row["kernel"] = "lstm_persistent_forward_kernel"
    if forward is None and uses_gemm_step(B, H):
        forward = gemm_step(B, H, base, tensor_core=tensor_cores(dtype, allow_tf32))
        row["kernel"] = "cuBLAS + lstm_forward_pointwise_kernel"
    if forward is None:
        forward = per_step_kernel_step(B, H, base)
        row["kernel"] = "lstm_forward_step_kernel"
    row["fwd_us_per_step"], row["counts"] = forward
    backward = None
    if tensor_cores(dtype, allow_tf32):
        backward = tc_product_step(B, H, base, "lstm_backward")
        row["backward_kernel"] = "lstm_persistent_tc_backward_kernel"
    if backward is None:
        backward = fma_product_step(B, H, base, "lstm_backward")
        row["backward_kernel"] = "lstm_persistent_backward_kernel"
    if backward is None:
        backward = per_step_backward_step(B, H, base)
        row["backward_kernel"] = "lstm_backward_pointwise_kernel + cuBLAS"
    row["bwd_loop_us_per_step"], row["backward_counts"] = backward
    row["bwd_gemms_us_per_step"] = backward_gemms_per_step(B, I, H, dtype, allow_tf32, gates=4)
    row["bwd_us_per_step"] = row["bwd_loop_us_per_step"] + row["bwd_gemms_us_per_step"]
    row["fwd_bwd_us_per_step"] = row["fwd_us_per_step"] + row["bwd_us_per_step"]
    cudnn = CUDNN_US_PER_STEP.get((B, H, "fp16"))
    row["cudnn_fwd_us_per_step"], row["cudnn_fwd_bwd_us_per_step"] = cudnn if cudnn else (None, None)
    return row


def predict_gru(B, T, I, H, dtype, allow_tf32=True):
    """The same for the GRU layer: its persistent forward and backward kernels, or the per-step ones."""
    base = dtype.split("-")[0]
    if base == "fp32" and "tf32" not in dtype:
        allow_tf32 = False
    row = dict(cell="gru", B=B, T=T, I=I, H=H, dtype=dtype)
    for direction, per_step in (("forward", gru_per_step_forward), ("backward", per_step_backward_step)):
        found = None
        if tensor_cores(dtype, allow_tf32):
            found = tc_product_step(B, H, base, f"gru_{direction}")
            name = f"gru_persistent_tc_{direction}_kernel"
        if found is None:
            found = fma_product_step(B, H, base, f"gru_{direction}")
            name = f"gru_persistent_{direction}_kernel"
        if found is None:
            found = per_step(B, H, base, tensor_cores(dtype, allow_tf32)) if direction == "forward" else per_step(B, H, base)
            name = (("cuBLAS + gru_forward_pointwise_kernel" if uses_gemm_step(B, H) else "gru_forward_step_kernel")
                    if direction == "forward" else "gru_backward_pointwise_kernel + cuBLAS")
        row["kernel" if direction == "forward" else "backward_kernel"] = name
        if direction == "forward":
            row["fwd_us_per_step"], row["counts"] = found
        else:
            row["bwd_loop_us_per_step"], row["backward_counts"] = found
    row["bwd_gemms_us_per_step"] = backward_gemms_per_step(B, I, H, dtype, allow_tf32, gates=3)
    row["bwd_us_per_step"] = row["bwd_loop_us_per_step"] + row["bwd_gemms_us_per_step"]
    row["fwd_bwd_us_per_step"] = row["fwd_us_per_step"] + row["bwd_us_per_step"]
    row["cudnn_fwd_us_per_step"] = row["cudnn_fwd_bwd_us_per_step"] = None  # no public GRU figure found
    return row


COUNTER_NAMES = ("launches", "blocks", "threads", "block_barriers", "warp_collectives", "grid_barriers", "mma",
                 "ldmatrix", "cp_async", "context_switches")


def emulated_counts(B, H, dtype, steps=2, I=8, cell="lstm"):
    """Runs the forward and backward ops of the CUDA sources (LSTM or GRU) in the SIMT emulator on
    a virtual H100 for `steps` steps and returns what the emulator counted, per step and per block
    of the persistent kernel (per launch for the per-step kernel). These are the counts the
    model's formulas assume."""
    import lstm_fused._simt  # noqa: F401  (test-only module: built unless LSTM_FUSED_SIMT=0)

    simt = torch.ops.lstm_fused_simt
    base = dtype.split("-")[0]
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[base]
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision  # the setting the CUDA host code reads
    matmul.fp32_precision = "tf32" if "tf32" in dtype else "ieee"
    try:
        simt.set_virtual_device(SMS, SHARED_OPTIN, True, 9)
        gen = torch.Generator().manual_seed(0)
        make = lambda *shape: (torch.randn(*shape, generator=gen) * 0.3).to(torch_dtype)  # noqa: E731
        if cell == "lstm":
            args = [make(steps, B, I), make(B, H), make(B, H), make(4 * H, I), make(4 * H, H), make(4 * H),
                    make(4 * H)]
            simt.reset_counters()
            y, h_n, c_n, reserve = simt.lstm_layer_forward(*args, None, None, False)
            counts = dict(zip(COUNTER_NAMES, simt.counters()))
            simt.reset_counters()
            grads = [make(*y.shape), make(*h_n.shape), make(*c_n.shape)]
            simt.lstm_layer_backward(*grads, *args[:5], None, y, reserve, None, False)
        else:
            args = [make(steps, B, I), make(B, H), make(3 * H, I), make(3 * H, H), make(3 * H), make(3 * H)]
            simt.reset_counters()
            y, h_n, reserve = simt.gru_layer_forward(*args, None, False)
            counts = dict(zip(COUNTER_NAMES, simt.counters()))
            simt.reset_counters()
            simt.gru_layer_backward(make(*y.shape), make(*h_n.shape), *args[:4], y, reserve, None, False)
        backward = dict(zip(COUNTER_NAMES, simt.counters()))
    finally:
        matmul.fp32_precision = previous
    blocks_per_step = counts["blocks"] / (counts["launches"] if counts["launches"] > 1 else 1)
    per = steps * max(blocks_per_step, 1)
    # The emulator counts barriers and warp collectives per arriving thread or lane, mma and
    # ldmatrix per warp instruction, cp.async per copy; the prologue (loading W_hh) is included.
    return {
        "launches": counts["launches"], "blocks": int(blocks_per_step),
        "block_barrier_arrivals_per_step_block": counts["block_barriers"] / per,
        "warp_collective_lane_arrivals_per_step_block": counts["warp_collectives"] / per,
        **{f"{name}_per_step_block": counts[name] / per for name in ("mma", "ldmatrix", "cp_async")},
        "grid_barriers_per_step": counts["grid_barriers"] / steps,
        # the backward op: its kernels, then the GEMMs (ATen on the CPU here: no launches)
        "backward_launches": backward["launches"],
        "backward_mma_per_step_block": backward["mma"] / (steps * max(backward["blocks"] / max(backward["launches"], 1), 1)),
        "backward_grid_barriers_per_step": backward["grid_barriers"] / steps,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--emulate", action="store_true")
    args = parser.parse_args()
    rows = [predict(*config) for config in GOAL_CONFIGS]
    gru_rows = [predict_gru(*config) for config in GOAL_CONFIGS]
    if args.emulate:
        for row in rows + gru_rows:
            row["emulated"] = emulated_counts(row["B"], row["H"], row["dtype"], cell=row.get("cell", "lstm"))
    if args.json:
        print(json.dumps(rows + gru_rows, indent=1))
        return
    print("| cell | B | T | I | H | dtype | forward kernel | backward kernel | fwd us/step | bwd loop + GEMMs us/step "
          "| fwd+bwd us/step | cuDNN fwd / fwd+bwd |")
    print("|---|---:|---:|---:|---:|---|---|---|---:|---:|---:|---|")
    for r in rows + gru_rows:
        cudnn = (f"{r['cudnn_fwd_us_per_step']:.2f} / {r['cudnn_fwd_bwd_us_per_step']:.2f} (fp16)"
                 if r["cudnn_fwd_us_per_step"] else "no public figure")
        print(f"| {r.get('cell', 'lstm')} | {r['B']} | {r['T']} | {r['I']} | {r['H']} | {r['dtype']} | {r['kernel']} | {r['backward_kernel']} | "
              f"{r['fwd_us_per_step']:.2f} | {r['bwd_loop_us_per_step']:.2f} + {r['bwd_gemms_us_per_step']:.2f} | "
              f"{r['fwd_bwd_us_per_step']:.2f} | {cudnn} |")
    for r in rows + gru_rows:
        if "emulated" in r:
            print(f"emulated {r.get('cell', 'lstm')} B={r['B']} H={r['H']} {r['dtype']}: model counts {r['counts']}, "
                  f"backward {r['backward_counts']}; emulator per step and block {r['emulated']}")


if __name__ == "__main__":
    main()
