"""Peak memory of one training step (forward + backward), torch.nn against lstm_fused, on the CPU.

Each measurement runs in a fresh interpreter: it builds the model and the input, notes the
process's peak resident set size (ru_maxrss), runs one forward and backward, and reports how far
the peak rose, in MB. (torch's CPU allocator returns large blocks to the system, so the peak of a
step is what the step itself needed at most.)

    python benchmarks/peak_memory.py                  # LSTM, the four configs
    python benchmarks/peak_memory.py --cell gru --bidirectional
"""
import argparse
import json
import subprocess
import sys

CONFIGS = [(32, 100, 32, 128), (64, 50, 256, 256), (8, 200, 1, 64), (128, 35, 512, 512)]  # B, T, I, H

CHILD = """
import json, resource, sys, torch
from torch import nn
import lstm_fused
impl, cell, B, T, I, H, bidirectional = json.loads(sys.argv[1])
torch.manual_seed(0)
owner = nn if impl == "torch.nn" else lstm_fused
model = getattr(owner, cell)(I, H, bidirectional=bidirectional)
x = torch.randn(T, B, I, requires_grad=True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model(x)[0].sum().backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) / 1024)
"""


def peak_mb(impl, cell, config, bidirectional):
    args = json.dumps([impl, cell, *config, bidirectional])
    out = subprocess.run([sys.executable, "-c", CHILD, args], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cell", choices=["lstm", "gru"], default="lstm")
    parser.add_argument("--bidirectional", action="store_true")
    parser.add_argument("--configs", default=None, help="which configs, by index (default: all)")
    args = parser.parse_args()
    cell = args.cell.upper()
    configs = CONFIGS if args.configs is None else [CONFIGS[int(i)] for i in args.configs.split(",")]
    kind = f"{'bidirectional ' if args.bidirectional else ''}{cell}"
    print(f"| {kind} config (B, T, I, H) | lstm_fused MB | torch.nn MB |")
    print("|---|---:|---:|")
    for config in configs:
        ours = peak_mb("lstm_fused", cell, config, args.bidirectional)
        theirs = peak_mb("torch.nn", cell, config, args.bidirectional)
        print(f"| {', '.join(map(str, config))} | {ours:.1f} | {theirs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
