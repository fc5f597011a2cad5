"""The workload that benchmarks/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck):
small enough to finish there in well under a minute, shaped to reach every CUDA kernel.

- the persistent kernels, LSTM and GRU, forward and backward (no projection, B * ceil(H / SMs)
  within their plans in csrc/persistent_plan.h): one unit per block (H=40, H=70) and several
  (H=300, 3 units per block on an H100/H200's 132 SMs: the GRU forward's 9 columns in two n tiles,
  A staged in shared memory), with lengths and reverse;
- the per-step kernels on shapes that span several blocks in both grid dimensions with ragged
  edges (H=70: 3 blocks of 32 units; B=19: 3 blocks of 8 rows), with lengths, reverse and a
  projection, LSTM and GRU, and the cells;
- the per-step path's GEMM form (B=64, H=256, persistent kernels off: cuBLAS + one pointwise
  kernel per step), LSTM and GRU;
- forward and backward of each, float32, float64 and the half types.

Each case is checked against torch.nn in float64 on the CPU (relative error norms), so a wrong
result fails the run too (exit status 1), as does an error; every case runs before the exit.

    python benchmarks/sanitizer_workload.py               # on a GPU
    python benchmarks/sanitizer_workload.py --device cpu  # the same cases on the CPU: tests this script
"""
import argparse
import os
import sys
import time

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, PackedSequence

import lstm_fused

# Relative error norm allowed against float64 (float32 with TF32 off; half types keep float32 state).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODULES = {"LSTM": (lstm_fused.LSTM, nn.LSTM), "GRU": (lstm_fused.GRU, nn.GRU),
           "LSTMCell": (lstm_fused.LSTMCell, nn.LSTMCell), "GRUCell": (lstm_fused.GRUCell, nn.GRUCell)}

# name: (module, constructor kwargs, T, B, lengths ("random" or None), dtype, persistent allowed)
CASES = {
    "lstm-persistent-1unit-packed-bidir-fp32": ("LSTM", dict(input_size=6, hidden_size=40, bidirectional=True),
                                                9, 5, "random", "fp32", True),
    "lstm-persistent-1unit-packed-bidir-fp64": ("LSTM", dict(input_size=6, hidden_size=40, bidirectional=True),
                                                9, 5, "random", "fp64", True),
    "lstm-persistent-1unit-reverse-bf16": ("LSTM", dict(input_size=6, hidden_size=40, bidirectional=True),
                                           7, 5, None, "bf16", True),
    "lstm-persistent-3units-2layers-fp32": ("LSTM", dict(input_size=5, hidden_size=300, num_layers=2),
                                            5, 6, None, "fp32", True),
    "lstm-persistent-3units-packed-fp16": ("LSTM", dict(input_size=5, hidden_size=300, bidirectional=True),
                                           5, 6, "random", "fp16", True),
    "lstm-per-step-multiblock-packed-bidir-fp32": ("LSTM", dict(input_size=7, hidden_size=70, bidirectional=True),
                                                   6, 19, "random", "fp32", False),
    "lstm-proj-multiblock-packed-bidir-fp32": ("LSTM", dict(input_size=7, hidden_size=70, proj_size=33,
                                                            bidirectional=True), 5, 19, "random", "fp32", True),
    "lstm-proj-multiblock-bf16": ("LSTM", dict(input_size=7, hidden_size=70, proj_size=33), 4, 19, None, "bf16", True),
    "gru-multiblock-packed-bidir-fp32": ("GRU", dict(input_size=7, hidden_size=70, bidirectional=True),
                                         6, 19, "random", "fp32", True),
    "gru-multiblock-2layers-bf16": ("GRU", dict(input_size=7, hidden_size=70, num_layers=2), 4, 19, None, "bf16", True),
    "gru-multiblock-fp64": ("GRU", dict(input_size=7, hidden_size=70), 4, 19, None, "fp64", True),
    "gru-persistent-3units-packed-bidir-bf16": ("GRU", dict(input_size=5, hidden_size=300, bidirectional=True),
                                                5, 6, "random", "bf16", True),
    "gru-per-step-multiblock-packed-bidir-fp32": ("GRU", dict(input_size=7, hidden_size=70, bidirectional=True),
                                                  6, 19, "random", "fp32", False),
    "lstm-gemm-step-bf16": ("LSTM", dict(input_size=7, hidden_size=256), 3, 64, None, "bf16", False),
    "gru-gemm-step-packed-fp32": ("GRU", dict(input_size=7, hidden_size=256), 3, 64, "random", "fp32", False),
    "lstmcell-multiblock-fp32": ("LSTMCell", dict(input_size=7, hidden_size=70), 3, 19, None, "fp32", True),
    "grucell-multiblock-fp32": ("GRUCell", dict(input_size=7, hidden_size=70), 3, 19, None, "fp32", True),
}


def relative_error(ours, exact):
    ours, exact = ours.detach().double().cpu(), exact.detach().double()
    scale = exact.norm().item()
    return (ours - exact).norm().item() / scale if scale > 0 else (ours - exact).norm().item()


def flat_outputs(output, state):
    data = output.data if isinstance(output, PackedSequence) else output
    return [data] + list(state if isinstance(state, tuple) else (state,))


def run_module(module, x, lengths, is_cell, steps):
    """Outputs (flat list) of one forward; x is [T, B, I] and requires grad."""
    if is_cell:
        is_lstm = isinstance(module, (nn.LSTMCell, lstm_fused.LSTMCell))
        state, outputs = None, []
        for x_t in x[:steps]:  # a few steps, so the backward goes through the recurrent state
            state = module(x_t, state)
            outputs.append(state[0] if is_lstm else state)
        return [torch.stack(outputs)] + list(state if is_lstm else (state,))
    inputs = pack_padded_sequence(x, lengths, enforce_sorted=False) if lengths is not None else x
    return flat_outputs(*module(inputs))


def run_case(name, spec, device, generator):
    kind, kwargs, T, B, lengths_kind, dtype_name, persistent = spec
    dtype = DTYPES[dtype_name]
    ours_class, torch_class = MODULES[kind]
    is_cell = kind.endswith("Cell")
    reference = torch_class(**kwargs).double()
    with torch.no_grad():  # fresh weights, not only torch.nn's initialisation
        for p in reference.parameters():
            # rounded to the dtype under test, so that both sides compute with the same weights
            p.copy_((torch.randn(p.shape, generator=generator, dtype=torch.float64) * 0.4).to(dtype).double())
    ours = ours_class(**kwargs).to(device, dtype)
    ours.load_state_dict({k: v.to(dtype) for k, v in reference.state_dict().items()})
    x64 = torch.randn(T, B, kwargs["input_size"], generator=generator, dtype=torch.float64).to(dtype).double()
    lengths = None
    if lengths_kind == "random":
        lengths = torch.randint(1, T + 1, (B,), generator=generator)
        lengths[int(torch.randint(0, B, (1,), generator=generator))] = T
    x_ours = x64.to(device, dtype).requires_grad_()
    x_ref = x64.clone().requires_grad_()

    os.environ["LSTM_FUSED_PERSISTENT"] = "1" if persistent else "0"
    try:
        outs = run_module(ours, x_ours, lengths, is_cell, T)
    finally:
        del os.environ["LSTM_FUSED_PERSISTENT"]
    exact = run_module(reference, x_ref, lengths, is_cell, T)
    upstream = [torch.randn(o.shape, generator=generator, dtype=torch.float64) for o in exact]
    leaves_ours = [x_ours] + list(ours.parameters())
    leaves_ref = [x_ref] + list(reference.parameters())
    grads = torch.autograd.grad(sum((o.double() * u.to(device)).sum() for o, u in zip(outs, upstream)), leaves_ours)
    grads_exact = torch.autograd.grad(sum((o * u).sum() for o, u in zip(exact, upstream)), leaves_ref)
    if device == "cuda":
        torch.cuda.synchronize()
    errors = [relative_error(a, b) for a, b in zip(outs + list(grads), exact + list(grads_exact))]
    return max(errors)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", help="run the cases whose name contains this")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("sanitizer_workload: no CUDA device")
    # Strict float32 on our side (the input-projection and gradient GEMMs are cuBLAS's).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"sanitizer workload on {args.device}, seed {seed}", flush=True)
    generator = torch.Generator().manual_seed(seed)
    failures = 0
    for name, spec in CASES.items():
        if args.only and args.only not in name:
            continue
        t0 = time.perf_counter()
        try:
            error = run_case(name, spec, args.device, generator)
            tolerance = TOLERANCE[DTYPES[spec[5]]]
            verdict = "ok" if error <= tolerance else "WRONG"
            failures += verdict != "ok"
            print(f"{verdict:5} {name}: relative error {error:.2e} (allowed {tolerance:.0e}), "
                  f"{time.perf_counter() - t0:.1f}s", flush=True)
        except Exception as error:  # keep going: the other cases still tell the sanitizer something
            failures += 1
            print(f"ERROR {name}: {type(error).__name__}: {error}", flush=True)
    print(f"sanitizer workload done: {failures} case(s) failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
