"""Paired CPU timings: each repetition runs torch.nn then lstm_fused back to back on the same
input, and the figure is the median of the per-pair ratios. On a noisy machine this is steadier
than timing each implementation as a block (as pytest-benchmark does).

    python benchmarks/paired.py lstm      # or gru
    python benchmarks/paired.py lstmcell  # or grucell: 20 steps of the cell from a Python loop
    python benchmarks/paired.py lstmcell --single  # one call of the cell (a decoder's step), B=1 and 8
"""
import argparse
import statistics
import time

import torch
from torch import nn

import lstm_fused

CONFIGS = [(32, 100, 32, 128), (64, 50, 256, 256), (8, 200, 1, 64), (128, 35, 512, 512)]  # B, T, I, H
CELL_CONFIGS = [(8, 20, 64, 64), (32, 20, 128, 128), (128, 20, 256, 256)]  # B, steps, I, H
# --single: one call per step, as a decoder makes them; B, calls timed together, I, H. Short
# blocks (well under a scheduler's time slice) and many pairs keep a shared machine's
# preemptions out of most pairs, and so out of the median.
SINGLE_CALL_CONFIGS = [(1, 20, 64, 64), (8, 20, 64, 64), (1, 20, 256, 256), (8, 20, 256, 256),
                       (32, 10, 128, 128), (128, 4, 256, 256)]
MODULES = {
    "lstm": (nn.LSTM, lstm_fused.LSTM),
    "gru": (nn.GRU, lstm_fused.GRU),
    "lstmcell": (nn.LSTMCell, lstm_fused.LSTMCell),
    "grucell": (nn.GRUCell, lstm_fused.GRUCell),
}


class CellLoop(nn.Module):
    """A cell stepped over the sequence from Python, as a decoder or a custom RNN would."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, x):
        h = torch.zeros(x.size(1), self.cell.hidden_size)
        c = torch.zeros_like(h)
        outputs = []
        for x_t in x:
            if isinstance(self.cell, (nn.LSTMCell, lstm_fused.LSTMCell)):
                h, c = self.cell(x_t, (h, c))
            else:
                h = self.cell(x_t, h)
            outputs.append(h)
        return torch.stack(outputs), h


class CellCalls(nn.Module):
    """`calls` separate calls of the cell on the same input and state: the per-call cost of a
    step (its Python, argument checks and dispatch) rather than a sequence's."""

    def __init__(self, cell, calls):
        super().__init__()
        self.cell, self.calls = cell, calls

    def forward(self, x):
        x_t = x[0]
        h = torch.zeros(x.size(1), self.cell.hidden_size)
        state = (h, torch.zeros_like(h)) if isinstance(self.cell, (nn.LSTMCell, lstm_fused.LSTMCell)) else h
        for _ in range(self.calls):
            out = self.cell(x_t, state)
        return out[0] if isinstance(out, tuple) else out, out


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cell", choices=list(MODULES))
    parser.add_argument("--pairs", type=int, default=25)
    parser.add_argument("--configs", default=None, help="which configs, by index (default: all)")
    parser.add_argument("--shape", action="append", default=[], metavar="B,T,I,H",
                        help="a config of your own instead of the table's (repeatable)")
    parser.add_argument("--modes", default="inference,training")
    parser.add_argument("--plain-input", action="store_true",
                        help="train with an input that needs no gradient (data, as in a first layer)")
    parser.add_argument("--frozen", action="store_true",
                        help="train with both models' weights frozen (gradients for the input only)")
    parser.add_argument("--bidirectional", action="store_true", help="bidirectional LSTM / GRU")
    parser.add_argument("--single", action="store_true",
                        help="cells: separate calls on one input (no loop over a sequence); inference under "
                             "no_grad; training: each call records its graph, one backward from the last")
    args = parser.parse_args()
    is_cell = args.cell.endswith("cell")
    if args.single and not is_cell:
        parser.error("--single is for lstmcell and grucell")
    table = SINGLE_CALL_CONFIGS if args.single else CELL_CONFIGS if is_cell else CONFIGS
    configs = table if args.configs is None else [table[int(i)] for i in args.configs.split(",")]
    if args.shape:
        configs = [tuple(int(v) for v in shape.split(",")) for shape in args.shape]
    modes = args.modes.split(",")
    torch_class, our_class = MODULES[args.cell]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ratio = torch.nn time / lstm_fused time")
    for B, T, I, H in configs:
        torch.manual_seed(0)
        kwargs = dict(bidirectional=True) if args.bidirectional and not is_cell else {}
        ref, ours = torch_class(I, H, **kwargs), our_class(I, H, **kwargs)
        ours.load_state_dict(ref.state_dict())
        if args.single:
            ref, ours = CellCalls(ref, T), CellCalls(ours, T)
        elif is_cell:
            ref, ours = CellLoop(ref), CellLoop(ours)
        if args.frozen:
            for p in list(ref.parameters()) + list(ours.parameters()):
                p.requires_grad_(False)
        x = torch.randn(T, B, I)
        x_grad = x.clone().requires_grad_(not args.plain_input)

        def inference(model):
            # A decoder's step loop runs under no_grad (inference_mode for the sequence modules).
            with torch.no_grad() if args.single else torch.inference_mode():
                model(x)

        def training(model):
            out, _ = model(x_grad)
            out.sum().backward()

        cells = []
        for mode, run in (("inference", inference), ("training", training)):
            if mode not in modes:
                continue
            for _ in range(2):
                run(ref), run(ours)
            pairs = max(5, args.pairs // 4) if B >= 128 else args.pairs
            ratios, theirs, mine = [], [], []
            for _ in range(pairs):
                a, b = seconds(lambda: run(ref)), seconds(lambda: run(ours))
                ratios.append(a / b), theirs.append(a), mine.append(b)
            if args.single:  # per call
                per_call = [statistics.median(times) / T * 1e6 for times in (theirs, mine)]
                cells.append(f"{mode} {statistics.median(ratios):.2f}x (torch.nn {per_call[0]:.1f} us, "
                             f"ours {per_call[1]:.1f} us per call)")
            else:
                cells.append(f"{mode} {statistics.median(ratios):.2f}x (torch.nn {statistics.median(theirs) * 1e3:.1f} "
                             f"ms, ours {statistics.median(mine) * 1e3:.1f} ms)")
        label = f"B{B} calls{T}" if args.single else f"B{B} T{T}"
        print(f"{args.cell} {label} I{I} H{H}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
