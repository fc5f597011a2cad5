"""GPU timings of lstm_fused against torch.nn (cuDNN) on the configs of the CUDA performance issue,
forward (inference) and forward + backward, timed with CUDA events (median of repeats). The
"cell" configs step an LSTMCell / GRUCell from a Python loop (T is the number of steps), against
the torch.nn cell in the same loop.

    python benchmarks/gpu_bench.py --json out.json          # on a GPU machine
    python benchmarks/gpu_bench.py --smoke --device cpu     # tiny sizes, to test the script itself
"""
import argparse
import json
import os
import statistics
import time

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_fused

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# name: (cell, B, T, I, H, dtype, packed lengths range or None)
CONFIGS = {
    "lstm-B16-T1024-I768-H768-bf16": ("lstm", 16, 1024, 768, 768, "bf16", None),
    "lstm-B16-T1024-I768-H768-fp32": ("lstm", 16, 1024, 768, 768, "fp32", None),
    "lstm-B64-T100-I512-H512-fp32": ("lstm", 64, 100, 512, 512, "fp32", None),
    "lstm-B8-T512-I128-H256-fp32": ("lstm", 8, 512, 128, 256, "fp32", None),
    "lstm-B256-T50-I1024-H1024-bf16": ("lstm", 256, 50, 1024, 1024, "bf16", None),
    "lstm-packed-B64-L10to400-I256-H256-fp32": ("lstm", 64, 400, 256, 256, "fp32", (10, 400)),
    "gru-B64-T100-I512-H512-fp32": ("gru", 64, 100, 512, 512, "fp32", None),
    "gru-B16-T1024-I768-H768-bf16": ("gru", 16, 1024, 768, 768, "bf16", None),
    "lstmcell-B64-T50-I512-H512-fp32": ("lstmcell", 64, 50, 512, 512, "fp32", None),
    "grucell-B64-T50-I512-H512-fp32": ("grucell", 64, 50, 512, 512, "fp32", None),
}
SMOKE_CONFIGS = {
    "lstm-B4-T8-I8-H16-fp32": ("lstm", 4, 8, 8, 16, "fp32", None),
    "lstm-packed-B6-L2to8-I8-H16-fp32": ("lstm", 6, 8, 8, 16, "fp32", (2, 8)),
    "gru-B4-T8-I8-H16-fp32": ("gru", 4, 8, 8, 16, "fp32", None),
    "lstmcell-B4-T5-I8-H16-fp32": ("lstmcell", 4, 5, 8, 16, "fp32", None),
}
MODULES = {
    "lstm": (nn.LSTM, lstm_fused.LSTM),
    "gru": (nn.GRU, lstm_fused.GRU),
    "lstmcell": (nn.LSTMCell, lstm_fused.LSTMCell),
    "grucell": (nn.GRUCell, lstm_fused.GRUCell),
}


def cell_loop(cell):
    """A cell stepped over a time-major input from Python: (outputs [T, B, H], last state)."""
    is_lstm = isinstance(cell, (nn.LSTMCell, lstm_fused.LSTMCell))

    def run(x):
        h = x.new_zeros(x.size(1), cell.hidden_size)
        state = (h, h) if is_lstm else h
        outputs = []
        for x_t in x:
            state = cell(x_t, state)
            outputs.append(state[0] if is_lstm else state)
        return torch.stack(outputs), state

    return run


def timer(device):
    """Median milliseconds of fn() over `repeats` runs, after `warmup` runs."""

    def measure(fn, warmup=3, repeats=10):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return measure


def lstm_flops(B, T, I, H, gates):
    """Matrix FLOPs of one forward pass (the GEMMs; the pointwise work is negligible)."""
    return 2 * B * T * gates * H * (I + H)


def bench_config(name, spec, device, measure):
    cell, B, T, I, H, dtype_name, packed = spec
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    torch_class, our_class = MODULES[cell]
    ref = torch_class(I, H).to(device, dtype)
    ours = our_class(I, H).to(device, dtype)
    ours.load_state_dict(ref.state_dict())
    call = cell_loop if cell.endswith("cell") else (lambda model: model)
    x = torch.randn(T, B, I, device=device, dtype=dtype)
    if packed is not None:
        lengths = torch.randint(packed[0], packed[1] + 1, (B,), generator=torch.Generator().manual_seed(0))
        lengths[0] = T
        make_input = lambda: pack_padded_sequence(x, lengths, enforce_sorted=False)  # noqa: E731
    else:
        make_input = lambda: x  # noqa: E731

    def forward(model):
        def run():
            with torch.no_grad():
                call(model)(make_input())
        return run

    def forward_backward(model):
        def run():
            inp = make_input()
            out, _ = call(model)(inp)
            data = out.data if packed is not None else out
            data.float().sum().backward()
        return run

    result = {"cell": cell, "B": B, "T": T, "I": I, "H": H, "dtype": dtype_name,
              "packed_lengths": list(packed) if packed else None}
    for label, model in (("ours", ours), ("cudnn", ref)):
        model.train()
        result[f"{label}_fwd_ms"] = measure(forward(model))
        result[f"{label}_fwdbwd_ms"] = measure(forward_backward(model))
    if cell == "lstm":  # the per-step kernels too, where the persistent one is picked by default
        os.environ["LSTM_FUSED_PERSISTENT"] = "0"
        try:
            result["ours_per_step_fwd_ms"] = measure(forward(ours))
        finally:
            del os.environ["LSTM_FUSED_PERSISTENT"]
    gates = 4 if cell.startswith("lstm") else 3
    steps = T if packed is None else float(lengths.float().mean())  # packed: the real work only
    flops = lstm_flops(B, steps, I, H, gates)
    result["ours_fwd_tflops"] = flops / (result["ours_fwd_ms"] * 1e-3) / 1e12
    result["ours_fwd_us_per_step"] = result["ours_fwd_ms"] * 1e3 / T
    result["cudnn_fwd_us_per_step"] = result["cudnn_fwd_ms"] * 1e3 / T
    return result


def matmul_peak_tflops(device, dtype, n=8192):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = timer(device)(lambda: a @ b, warmup=2, repeats=5)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to test this script")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: no CUDA device")
    configs = SMOKE_CONFIGS if args.smoke else CONFIGS
    measure = timer(args.device)
    results = {}
    peaks = {}

    def save():  # after every config, so that a later hang or crash keeps what was measured
        if not args.json:
            return
        speedups = {
            name: {"fwd": r["cudnn_fwd_ms"] / r["ours_fwd_ms"], "fwdbwd": r["cudnn_fwdbwd_ms"] / r["ours_fwdbwd_ms"]}
            for name, r in results.items() if "error" not in r
        }
        with open(args.json, "w") as f:
            json.dump({"configs": results, "speedup_vs_cudnn": speedups, "peaks": peaks}, f, indent=1)

    for name, spec in configs.items():
        try:
            results[name] = bench_config(name, spec, args.device, measure)
        except Exception as error:  # one failing config must not lose the others' numbers
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        print(name, json.dumps(results[name]), flush=True)
        save()
    if args.device == "cuda" and not args.smoke:
        peaks["matmul_peak_tflops_bf16"] = matmul_peak_tflops("cuda", torch.bfloat16)
        peaks["matmul_peak_tflops_fp32"] = matmul_peak_tflops("cuda", torch.float32)
        save()

if __name__ == "__main__":
    main()
