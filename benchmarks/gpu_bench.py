"""GPU timings of lstm_fused against torch.nn (cuDNN) on the goal configs of the CUDA speed issue
(issue 17), forward (inference) and forward + backward, timed with CUDA events (median of
repeats), in one run so that the ratios share a machine state.

TF32: cuDNN's float32 RNN uses tensor cores when torch.backends.cudnn.allow_tf32 is set (torch's
default), and our input-projection and gradient GEMMs (cuBLAS) do when
torch.backends.cuda.matmul.allow_tf32 is set (default off). Each float32 entry therefore sets both
flags explicitly, the same on both sides, and records them: the first pass uses the goal table's
setting (TF32 on for both at B=16 H=768, off elsewhere), a second pass, if the budget allows,
repeats the float32 configs with the other setting. Each entry also records the relative
difference of our forward output from cuDNN's.

    python benchmarks/gpu_bench.py --json out.json --budget 90   # on a GPU machine
    python benchmarks/gpu_bench.py --smoke --device cpu          # tiny sizes, to test the script itself

--budget (seconds): no config starts once the elapsed time plus the slowest config so far would
pass it; the JSON is rewritten after every config, so a run cut short keeps what it measured.
"""
import argparse
import json
import os
import platform
import statistics
import time

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import lstm_fused

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# name: (cell, B, T, I, H, dtype, packed lengths range or None, TF32 in the first pass)
GOAL_CONFIGS = {
    "lstm-B16-T1024-I768-H768-bf16": ("lstm", 16, 1024, 768, 768, "bf16", None, False),
    "lstm-B16-T1024-I768-H768-fp32": ("lstm", 16, 1024, 768, 768, "fp32", None, True),
    "lstm-B64-T100-I512-H512-fp32": ("lstm", 64, 100, 512, 512, "fp32", None, False),
    "lstm-B8-T512-I128-H256-fp32": ("lstm", 8, 512, 128, 256, "fp32", None, False),
    "lstm-B256-T50-I1024-H1024-bf16": ("lstm", 256, 50, 1024, 1024, "bf16", None, False),
    "lstm-packed-B64-L10to400-I256-H256-fp32": ("lstm", 64, 400, 256, 256, "fp32", (10, 400), False),
    "gru-B16-T1024-I768-H768-bf16": ("gru", 16, 1024, 768, 768, "bf16", None, False),
    "gru-B16-T1024-I768-H768-fp32": ("gru", 16, 1024, 768, 768, "fp32", None, True),
    "gru-B64-T100-I512-H512-fp32": ("gru", 64, 100, 512, 512, "fp32", None, False),
    "gru-B8-T512-I128-H256-fp32": ("gru", 8, 512, 128, 256, "fp32", None, False),
    "gru-B256-T50-I1024-H1024-bf16": ("gru", 256, 50, 1024, 1024, "bf16", None, False),
    "gru-packed-B64-L10to400-I256-H256-fp32": ("gru", 64, 400, 256, 256, "fp32", (10, 400), False),
    "lstmcell-B64-T50-I512-H512-fp32": ("lstmcell", 64, 50, 512, 512, "fp32", None, False),
    "grucell-B64-T50-I512-H512-fp32": ("grucell", 64, 50, 512, 512, "fp32", None, False),
}
SMOKE_CONFIGS = {
    "lstm-B4-T8-I8-H16-fp32": ("lstm", 4, 8, 8, 16, "fp32", None, False),
    "lstm-packed-B6-L2to8-I8-H16-fp32": ("lstm", 6, 8, 8, 16, "fp32", (2, 8), False),
    "gru-B4-T8-I8-H16-bf16": ("gru", 4, 8, 8, 16, "bf16", None, False),
    "lstmcell-B4-T5-I8-H16-fp32": ("lstmcell", 4, 5, 8, 16, "fp32", None, False),
}
MODULES = {
    "lstm": (nn.LSTM, lstm_fused.LSTM),
    "gru": (nn.GRU, lstm_fused.GRU),
    "lstmcell": (nn.LSTMCell, lstm_fused.LSTMCell),
    "grucell": (nn.GRUCell, lstm_fused.GRUCell),
}


def set_tf32(enabled):
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled


def tf32_flags():
    return {"cudnn.allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "cuda.matmul.allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32)}


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


def timer(device, seconds_per_measurement):
    """Median milliseconds of fn(), after warm-up; as many repeats (3 to 20) as fit in
    seconds_per_measurement, judged from the warm-up runs."""

    def elapsed_ms(fn):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def measure(fn):
        warm = [elapsed_ms(fn) for _ in range(2)]
        repeats = int(max(3, min(20, seconds_per_measurement * 1e3 / max(warm[-1], 1e-3))))
        return statistics.median(elapsed_ms(fn) for _ in range(repeats))

    return measure


def matrix_flops(B, steps, I, H, gates):
    """Matrix FLOPs of one forward pass (the GEMMs; the pointwise work is small beside them)."""
    return 2 * B * steps * gates * H * (I + H)


def persistent_plan(B, H, dtype, device):
    """The FMA persistent LSTM forward's plan on this device (plan_persistent_product_layer with
    N = 4U, K = H), or why none."""
    if device != "cuda":
        return None
    try:
        props = torch.cuda.get_device_properties(0)
        shared = getattr(props, "shared_memory_per_block_optin", None)
        if shared is None:
            return {"error": "torch gives no shared_memory_per_block_optin"}
        es = torch.empty((), dtype=dtype).element_size()
        values = torch.ops.lstm_fused._persistent_product_plan(
            H, B, 4, H, es, 8 if es == 8 else 4, False, props.multi_processor_count, shared)
        return {"usable": bool(values[0]), "units_per_block": values[1], "blocks": values[2],
                "shared_bytes": values[-1]}
    except Exception as error:  # the op's signature may change; the timing does not depend on it
        return {"error": f"{type(error).__name__}: {error}"}


def persistent_tc_plan(B, H, dtype, device):
    """The tensor-core persistent kernel's plan (plan_persistent_tc_layer), or why none."""
    if device != "cuda":
        return None
    try:
        props = torch.cuda.get_device_properties(0)
        fields = ("usable", "units_per_block", "blocks", "m_tiles", "n_tiles", "k_tiles", "k_split", "row_stride",
                  "shared_bytes")
        values = torch.ops.lstm_fused._persistent_tc_plan(H, B, torch.empty((), dtype=dtype).element_size(),
                                                          props.multi_processor_count,
                                                          props.shared_memory_per_block_optin)
        return dict(zip(fields, values))
    except Exception as error:  # the op's signature may change; the timing does not depend on it
        return {"error": f"{type(error).__name__}: {error}"}


def product_plans(cell, B, H, dtype, device):
    """The product-generic persistent kernels' plans on this device (plan_persistent_product_layer):
    the LSTM backward, the GRU forward and backward, with the product the dtype gets."""
    if device != "cuda":
        return None
    try:
        props = torch.cuda.get_device_properties(0)
        fields = ("usable", "units_per_block", "blocks", "m_rows", "n_cols", "n_tiles", "chunks", "k_split",
                  "row_stride", "stage_a", "shared_bytes")
        es = torch.empty((), dtype=dtype).element_size()
        acc = 8 if dtype == torch.float64 else 4
        kernels = {"lstm": {"backward": (1, 4 * H)}, "gru": {"forward": (3, H), "backward": (1, 3 * H)}}[cell]
        return {name: dict(zip(fields, torch.ops.lstm_fused._persistent_product_plan(
                    H, B, columns, depth, es, acc, tensor_cores_chosen(dtype), props.multi_processor_count,
                    props.shared_memory_per_block_optin)))
                for name, (columns, depth) in kernels.items()}
    except Exception as error:  # the op's signature may change; the timing does not depend on it
        return {"error": f"{type(error).__name__}: {error}"}


def tensor_cores_chosen(dtype):
    """What csrc/cuda/lstm_persistent.cu picks: tensor cores for the half types, and for float32
    when TF32 is allowed for matmuls."""
    matmul = torch.backends.cuda.matmul
    tf32 = matmul.fp32_precision == "tf32" or (matmul.fp32_precision == "none" and matmul.allow_tf32)
    return dtype in (torch.bfloat16, torch.float16) or (dtype == torch.float32 and tf32)


def predicted(cell, B, T, I, H, dtype_name, packed):
    """benchmarks/perf_model.py's prediction for this config, beside the measurement."""
    try:
        import perf_model

        name = dtype_name + ("-tf32" if dtype_name == "fp32" and tensor_cores_chosen(torch.float32) else "")
        row = (perf_model.predict if cell == "lstm" else perf_model.predict_gru)(B, T, I, H, name)
        return {key: row[key] for key in ("kernel", "backward_kernel", "fwd_us_per_step", "bwd_us_per_step",
                                          "fwd_bwd_us_per_step")}
    except Exception as error:  # the model is advisory: it must not cost the measurement
        return {"error": f"{type(error).__name__}: {error}"}


def bench_config(spec, tf32, device, measure):
    cell, B, T, I, H, dtype_name, packed, _ = spec
    dtype = DTYPES[dtype_name]
    if device == "cuda":
        set_tf32(tf32)
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    torch_class, our_class = MODULES[cell]
    ref = torch_class(I, H).to(device, dtype)
    ours = our_class(I, H).to(device, dtype)
    ours.load_state_dict(ref.state_dict())
    call = cell_loop if cell.endswith("cell") else (lambda model: model)
    x = torch.randn(T, B, I, device=device, dtype=dtype)
    lengths = None
    if packed is not None:
        lengths = torch.randint(packed[0], packed[1] + 1, (B,))
        lengths[0] = T
        make_input = lambda: pack_padded_sequence(x, lengths, enforce_sorted=False)  # noqa: E731
    else:
        make_input = lambda: x  # noqa: E731

    def output_of(model):
        with torch.no_grad():
            out, _ = call(model)(make_input())
        return out.data if packed is not None else out

    def forward(model):
        def run():
            with torch.no_grad():
                call(model)(make_input())
        return run

    def forward_backward(model):
        def run():
            out, _ = call(model)(make_input())
            data = out.data if packed is not None else out
            data.float().sum().backward()
        return run

    result = {"cell": cell, "B": B, "T": T, "I": I, "H": H, "dtype": dtype_name,
              "packed_lengths": list(packed) if packed else None, "tf32": tf32_flags()}
    ours_out, ref_out = output_of(ours).double(), output_of(ref).double()
    result["rel_diff_vs_cudnn"] = ((ours_out - ref_out).norm() / ref_out.norm()).item()
    for label, model in (("ours", ours), ("cudnn", ref)):
        model.train()
        result[f"{label}_fwd_ms"] = measure(forward(model))
        result[f"{label}_fwdbwd_ms"] = measure(forward_backward(model))
    if cell in ("lstm", "gru"):
        result["product_plans"] = product_plans(cell, B, H, dtype, device)
        if cell == "lstm":
            result["persistent_plan"] = persistent_plan(B, H, dtype, device)
            result["persistent_tc_plan"] = persistent_tc_plan(B, H, dtype, device)
            persistent = (result["persistent_plan"] or {}).get("usable")
            tensor_core = (result["persistent_tc_plan"] or {}).get("usable") and tensor_cores_chosen(dtype)
        else:
            plans = result["product_plans"] or {}
            persistent = (plans.get("forward") or {}).get("usable")
            tensor_core = persistent and tensor_cores_chosen(dtype)
        # The other kernels too, for comparison, forward and forward + backward: the FMA products
        # where tensor cores run, and the per-step kernels (the backward's pointwise kernel +
        # cuBLAS loop) where any persistent kernel does.
        variants = []
        if tensor_core:
            variants.append(("ours_fma_persistent", "fma"))
        if persistent or variants:
            variants.append(("ours_per_step", "0"))
        for key, setting in variants:
            os.environ["LSTM_FUSED_PERSISTENT"] = setting
            try:
                result[f"{key}_fwd_ms"] = measure(forward(ours))
                result[f"{key}_fwdbwd_ms"] = measure(forward_backward(ours))
            finally:
                del os.environ["LSTM_FUSED_PERSISTENT"]
        # The tile sweep at the headline shape: fewer, wider blocks and other K splits
        # (LSTM_FUSED_PERSISTENT_BLOCKS / _K_SPLIT, csrc/cuda/persistent_host.h), so that one GPU
        # call shows which plan is best there.
        if persistent and (B, H) == (16, 768) and device == "cuda":
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            result["sweep"] = {}
            for blocks, k_split in ((None, 1), (None, 4), (sms // 2, None), (sms // 2, 2)):
                label = f"blocks={blocks or sms},k_split={k_split or 'rule'}"
                settings = {"LSTM_FUSED_PERSISTENT_BLOCKS": str(blocks) if blocks else None,
                            "LSTM_FUSED_PERSISTENT_K_SPLIT": str(k_split) if k_split else None}
                try:
                    for key, value in settings.items():
                        if value is not None:
                            os.environ[key] = value
                    result["sweep"][label] = {"fwd_ms": measure(forward(ours)),
                                              "fwdbwd_ms": measure(forward_backward(ours))}
                finally:
                    for key in settings:
                        os.environ.pop(key, None)
        result["predicted"] = predicted(cell, B, T, I, H, dtype_name, packed)
    gates = 4 if cell.startswith("lstm") else 3
    steps = T if packed is None else float(lengths.float().mean())  # packed: the real work only
    result["ours_fwd_tflops"] = matrix_flops(B, steps, I, H, gates) / (result["ours_fwd_ms"] * 1e-3) / 1e12
    result["ours_fwd_us_per_step"] = result["ours_fwd_ms"] * 1e3 / T
    result["cudnn_fwd_us_per_step"] = result["cudnn_fwd_ms"] * 1e3 / T
    result["speedup_fwd"] = result["cudnn_fwd_ms"] / result["ours_fwd_ms"]
    result["speedup_fwdbwd"] = result["cudnn_fwdbwd_ms"] / result["ours_fwdbwd_ms"]
    return result


def matmul_peak_tflops(device, dtype, n=8192):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = timer(device, 0.5)(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def machine(device):
    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": platform.python_version(),
            "host_cpu": platform.processor() or platform.machine(), "host_cores": os.cpu_count(),
            "git_commit": os.environ.get("GIT_COMMIT", "unknown"), "tf32_defaults": tf32_flags()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, multiprocessors=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
    else:
        info["device"] = "cpu"
    return info


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to test this script")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--budget", type=float, default=float("inf"), help="seconds for the whole run")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: no CUDA device")
    started = time.perf_counter()
    configs = SMOKE_CONFIGS if args.smoke else GOAL_CONFIGS
    measure = timer(args.device, 0.02 if args.smoke else 0.25)
    record = {"machine": machine(args.device), "configs": {}, "skipped": [], "peaks": {}}

    def save():  # after every config, so that a later hang or crash keeps what was measured
        record["speedup_vs_cudnn"] = {name: {"fwd": c["speedup_fwd"], "fwdbwd": c["speedup_fwdbwd"]}
                                      for name, c in record["configs"].items() if "error" not in c}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(record, f, indent=1)

    # First pass: every config at the goal table's TF32 setting; second: the float32 ones at the other.
    passes = [(name, spec, spec[7]) for name, spec in configs.items()]
    if args.device == "cuda":
        passes += [(name, spec, not spec[7]) for name, spec in configs.items() if spec[5] == "fp32"]
    slowest = 0.0
    for name, spec, tf32 in passes:
        key = f"{name}-tf32" if tf32 and spec[5] == "fp32" else name
        if time.perf_counter() - started + slowest > args.budget:
            record["skipped"].append(key)
            continue
        t0 = time.perf_counter()
        try:
            record["configs"][key] = bench_config(spec, tf32, args.device, measure)
        except Exception as error:  # one failing config must not lose the others' numbers
            record["configs"][key] = {"error": f"{type(error).__name__}: {error}"}
        slowest = max(slowest, time.perf_counter() - t0)
        record["configs"][key]["seconds"] = round(time.perf_counter() - t0, 1)
        print(key, json.dumps(record["configs"][key]), flush=True)
        save()
    if args.device == "cuda" and not args.smoke and time.perf_counter() - started + 10 < args.budget:
        set_tf32(False)
        record["peaks"]["matmul_tflops_bf16"] = matmul_peak_tflops("cuda", torch.bfloat16)
        record["peaks"]["matmul_tflops_fp32_no_tf32"] = matmul_peak_tflops("cuda", torch.float32)
    if record["skipped"]:
        print(f"gpu_bench: out of budget, not run: {', '.join(record['skipped'])}")
    save()


if __name__ == "__main__":
    main()
