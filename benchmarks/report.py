"""Summarise a pytest-benchmark JSON of benchmarks/test_bench_rnn.py: a markdown table of each
implementation's median time and its ratio against torch.nn from the same run, the achieved
GFLOP/s next to this machine's measured GEMM rate, and a PNG chart.

The last column bounds what any implementation can gain over the naive cell loop on this machine:
the naive loop's time over the time of the same matrix FLOPs at the measured GEMM rate. Where the
naive loop is itself GEMM-bound (large batch and hidden sizes) that ceiling is low, whatever the
kernels do.

    python -m pytest benchmarks --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.json --png bench.png
"""
import argparse
import json
import time
from collections import defaultdict

import torch


def matmul_gflops(n=1024, repeats=20):
    """This machine's float32 GEMM rate (torch.mm, all threads), the ceiling to read GFLOP/s by."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e9


def gemm_flops(info):
    """The matrix FLOPs of the run: input and recurrent products, x3 with the backward pass."""
    gates = 4 if info["cell"] == "lstm" else 3
    forward = 2 * info["B"] * info["T"] * gates * info["H"] * (info["I"] + info["H"])
    return forward * (3 if info["mode"] == "training" else 1)


def load_rows(path):
    """(machine info, rows, the GEMM rate measured in the run in GFLOP/s or None)."""
    with open(path) as f:
        data = json.load(f)
    rows = defaultdict(dict)  # (cell, device, mode, config) -> impl -> (median seconds, info)
    gemm = None
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        if info.get("impl") == "gemm":  # its best round: the ceiling is what the machine can do
            gemm = 2 * info["n"] ** 3 / bench["stats"]["min"] / 1e9
            continue
        config = f"B{info['B']}-T{info['T']}-I{info['I']}-H{info['H']}"
        rows[info["cell"], info["device"], info["mode"], config][info["impl"]] = (bench["stats"]["median"], info)
    return data.get("machine_info", {}), rows, gemm


def table(rows, peak):
    lines = [
        f"| cell | device | mode | config (B-T-I-H) | lstm_fused ms | torch.nn ms | naive ms | torch.nn / ours | "
        f"naive / ours | ours GFLOP/s (GEMM peak {peak:.0f}) | naive / GEMM-peak time |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (cell, device, mode, config), impls in sorted(rows.items()):
        ours = impls.get("lstm_fused")
        if ours is None:
            continue
        ours_s, info = ours
        cell_ms = lambda impl: f"{impls[impl][0] * 1e3:.2f}" if impl in impls else "-"  # noqa: E731
        ratio = lambda impl: f"{impls[impl][0] / ours_s:.2f}x" if impl in impls else "-"  # noqa: E731
        at_peak_s = gemm_flops(info) / (peak * 1e9)  # the run's matrix FLOPs at the machine's GEMM rate
        ceiling = f"{impls['naive'][0] / at_peak_s:.2f}x" if "naive" in impls else "-"
        lines.append(f"| {cell} | {device} | {mode} | {config} | {cell_ms('lstm_fused')} | {cell_ms('torch')} | "
                     f"{cell_ms('naive')} | {ratio('torch')} | {ratio('naive')} | {gemm_flops(info) / ours_s / 1e9:.1f} | "
                     f"{ceiling} |")
    return "\n".join(lines)


def chart(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, ratios = [], []
    for (cell, device, mode, config), impls in sorted(rows.items()):
        if "lstm_fused" in impls and "torch" in impls:
            labels.append(f"{cell} {device} {mode}\n{config}")
            ratios.append(impls["torch"][0] / impls["lstm_fused"][0])
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 4.5))
    ax.bar(range(len(ratios)), ratios, color=["tab:green" if r >= 1 else "tab:orange" for r in ratios])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("torch.nn time / lstm_fused time")
    ax.set_title("Speed-up over torch.nn, same run (above 1: lstm_fused is faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="pytest-benchmark JSON (--benchmark-json=FILE)")
    parser.add_argument("--png", help="write the ratio chart here")
    args = parser.parse_args()
    machine, rows, peak = load_rows(args.json)
    where = "in the run"
    if peak is None:  # a JSON from before the suite measured it
        peak, where = matmul_gflops(), "now, not in the run"
    print(f"machine: {machine.get('cpu', {}).get('brand_raw', '?')}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; float32 GEMM (1024^3 torch.mm, best round, measured {where}) {peak:.0f} GFLOP/s")
    print(table(rows, peak))
    if args.png:
        chart(rows, args.png)
        print("wrote", args.png)


if __name__ == "__main__":
    main()
