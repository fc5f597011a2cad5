"""No host-device synchronisation inside a call, and CUDA-graph capture (issue 16, item 4).

1. Under torch.cuda.set_sync_debug_mode("error") a forward and a backward of each module (LSTM
   on the persistent and the per-step kernels, with a projection, packed; GRU, packed; LSTMCell;
   GRUCell; and each module's inference forward under no_grad) must run without a synchronising
   call. Each case is first run once outside the mode (the first call creates cuBLAS handles and
   reads device attributes), then under "warn" to count the synchronising calls, then under
   "error" to name the first one (the innermost lstm_fused frames of its traceback).
2. One forward of each module (no_grad) is captured in a CUDA graph, replayed on two fresh inputs
   copied into the captured input, and each replay compared with an eager call on that input.

Every case is recorded (pass / fail and why) in the JSON, rewritten after each case, instead of
aborting at the first failure. Exit status 0 even when cases fail (the JSON says which); 2 when
the script itself cannot run.

    python benchmarks/gpu_sync_check.py --json sync.json                  # on a GPU
    python benchmarks/gpu_sync_check.py --device cpu --json sync.json     # runs each case's calls
                                                 # on the CPU (tests this script); checks skipped
"""
import argparse
import json
import os
import sys
import traceback
import warnings

import torch
from torch.nn.utils.rnn import pack_padded_sequence, PackedSequence

import lstm_fused

I, H, T, B = 32, 64, 20, 8  # H=64, B=8: within the persistent kernel's plan on any recent GPU

# name: (module class, kwargs, packed, LSTM_FUSED_PERSISTENT setting or None for the default)
CASES = {
    "LSTM-persistent": (lstm_fused.LSTM, dict(input_size=I, hidden_size=H), False, "1"),
    "LSTM-per-step": (lstm_fused.LSTM, dict(input_size=I, hidden_size=H), False, "0"),
    "LSTM-2layers-bidirectional": (lstm_fused.LSTM, dict(input_size=I, hidden_size=H, num_layers=2,
                                                         bidirectional=True), False, None),
    "LSTM-proj": (lstm_fused.LSTM, dict(input_size=I, hidden_size=H, proj_size=24), False, None),
    "LSTM-packed": (lstm_fused.LSTM, dict(input_size=I, hidden_size=H), True, None),
    "GRU": (lstm_fused.GRU, dict(input_size=I, hidden_size=H), False, None),
    "GRU-packed": (lstm_fused.GRU, dict(input_size=I, hidden_size=H, bidirectional=True), True, None),
    "LSTMCell": (lstm_fused.LSTMCell, dict(input_size=I, hidden_size=H), False, None),
    "GRUCell": (lstm_fused.GRUCell, dict(input_size=I, hidden_size=H), False, None),
}
SYNC_MESSAGE = "synchroniz"  # torch's "called a synchronizing CUDA operation"


class Case:
    """One module and its inputs, made outside any check: making them may synchronise (packing
    sorts the lengths on the host and copies the permutation to the device), and that is torch's
    call, not the module's. A packed input's data is a leaf of its own for the same reason."""

    def __init__(self, name, device):
        cls, kwargs, packed, persistent = CASES[name]
        self.name, self.device, self.persistent = name, device, persistent
        self.is_cell = cls in (lstm_fused.LSTMCell, lstm_fused.GRUCell)
        self.module = cls(**kwargs).to(device)
        self.lengths = None
        if packed:
            self.lengths = torch.randint(1, T + 1, (B,))
            self.lengths[0] = T
        self.input = self.fresh_input(requires_grad=True)  # the backward computes its gradient too

    def fresh_input(self, requires_grad=False):
        """New random values in the same structure (a packed input keeps its lengths)."""
        x = torch.randn(*((B, I) if self.is_cell else (T, B, I)), device=self.device)
        if self.lengths is None:
            return x.requires_grad_(requires_grad)
        packed = pack_padded_sequence(x, self.lengths, enforce_sorted=False)
        return PackedSequence(packed.data.detach().requires_grad_(requires_grad), packed.batch_sizes,
                              packed.sorted_indices, packed.unsorted_indices)

    def forward(self, inputs):
        """The output tensor of one call (a cell's h; a packed output's data)."""
        previous = os.environ.get("LSTM_FUSED_PERSISTENT")
        if self.persistent is not None:
            os.environ["LSTM_FUSED_PERSISTENT"] = self.persistent
        try:
            out = self.module(inputs)
            out = out[0] if isinstance(out, tuple) else out
            return data_of(out)
        finally:
            if self.persistent is not None:
                if previous is None:
                    del os.environ["LSTM_FUSED_PERSISTENT"]
                else:
                    os.environ["LSTM_FUSED_PERSISTENT"] = previous


def data_of(inputs):
    return inputs.data if isinstance(inputs, PackedSequence) else inputs


def lstm_fused_frames(error):
    """The innermost frames of a traceback that are in lstm_fused or this check: where the
    synchronising call was made from (a C++ op shows as the Python line that called it)."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if "lstm_fused" in f.filename or "gpu_sync_check" in f.filename]
    return [f"{os.path.relpath(f.filename)}:{f.lineno} {f.line}" for f in frames[-3:]]


def sync_case(case, training):
    """Forward (+ backward when training) under the sync debug modes."""
    upstream = None

    def call():
        if training:
            out = case.forward(case.input)
            out.backward(upstream)
        else:
            with torch.no_grad():
                case.forward(case.input)

    if training:  # the upstream gradient is made here, outside the checked region
        with torch.no_grad():
            upstream = torch.randn_like(case.forward(case.input))
    call()  # first call: handles, attributes, lazy module loading
    torch.cuda.synchronize()
    result = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    result["synchronising_calls"] = sum(SYNC_MESSAGE in str(w.message) for w in caught)
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
        result["passed"] = True
    except RuntimeError as error:
        result["passed"] = False
        result["error"] = str(error).splitlines()[0][:300]
        result["where"] = lstm_fused_frames(error)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    if result["passed"] and result["synchronising_calls"]:  # "error" missed what "warn" saw
        result["passed"] = False
        result["error"] = f"{result['synchronising_calls']} synchronising call(s) under 'warn'"
    return result


def graph_case(case):
    """Capture one no_grad forward, replay it on two fresh inputs, compare with eager calls."""
    static_input = case.fresh_input()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):  # warm-up on a side stream, as torch's docs do
        for _ in range(3):
            case.forward(static_input)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    result = {}
    try:
        with torch.no_grad(), torch.cuda.graph(graph):
            static_out = case.forward(static_input)
    except Exception as error:
        result.update(passed=False, stage="capture", error=f"{type(error).__name__}: {str(error).splitlines()[0][:300]}",
                      where=lstm_fused_frames(error))
        try:  # a failed capture can leave an error behind; the next case reports it if so
            torch.cuda.synchronize()
        except RuntimeError:
            pass
        return result
    differences = []
    for _ in range(2):
        fresh = case.fresh_input()
        data_of(static_input).copy_(data_of(fresh))
        graph.replay()
        torch.cuda.synchronize()
        with torch.no_grad():
            eager = case.forward(fresh)
        differences.append((static_out.double() - eager.double()).abs().max().item())
    tolerance = 1e-5 * max(1.0, eager.abs().max().item())
    result.update(passed=all(d <= tolerance for d in differences), max_abs_difference=max(differences),
                  tolerance=tolerance)
    return result


def cpu_dry_run(case):
    """On a machine without CUDA: the calls each check makes, so this script is tested there."""
    out = case.forward(case.input)
    out.backward(torch.randn_like(out))
    assert data_of(case.input).grad is not None
    with torch.no_grad():
        case.forward(case.fresh_input())
    return {"passed": None, "skipped": "no CUDA device: the calls ran on the CPU, nothing checked"}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", help="write the results here (rewritten after every case)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_sync_check: no CUDA device")
        sys.exit(2)
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    record = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "sync_free": {}, "cuda_graph": {}}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(record, f, indent=1)

    def attempt(section, key, check):
        try:
            record[section][key] = check()
        except Exception as error:  # a case that breaks is a failed case, not a lost run
            record[section][key] = {"passed": False, "error": f"{type(error).__name__}: {str(error)[:300]}"}
        status = record[section][key]
        verdict = {True: "pass", False: "FAIL", None: "skip"}[status.get("passed")]
        detail = status.get("error") or status.get("skipped") or ""
        where = "; ".join(status.get("where", []))
        print(f"{verdict:4} {section:9} {key}" + (f": {detail}" if detail else "") + (f" at {where}" if where else ""),
              flush=True)
        save()

    for name in CASES:
        case = Case(name, args.device)
        if args.device != "cuda":
            attempt("sync_free", name, lambda: cpu_dry_run(case))
            continue
        attempt("sync_free", f"{name}-train", lambda: sync_case(case, training=True))
        attempt("sync_free", f"{name}-no_grad", lambda: sync_case(case, training=False))
    if args.device == "cuda":
        for name in CASES:
            attempt("cuda_graph", name, lambda: graph_case(Case(name, args.device)))
    checked = [r for section in ("sync_free", "cuda_graph") for r in record[section].values()]
    record["passed"] = sum(r.get("passed") is True for r in checked)
    record["failed"] = sum(r.get("passed") is False for r in checked)
    save()
    print(f"gpu_sync_check: {record['passed']} passed, {record['failed']} failed")


if __name__ == "__main__":
    main()
