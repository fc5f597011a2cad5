"""Time-series forecasting with an LSTM (and a GRU), the classic recipe, end to end.

Scale a real series (monthly sunspot numbers 1749-2009, shipped in examples/data), cut it into
sliding windows of --seq-len steps that predict the next value, train a recurrent layer with a linear
head on all of its outputs, and compare against a naive last-value forecast. With
`--impl both` the same model runs on lstm_fused's fused kernels and on torch.nn, from the same
initial weights and the same batches, so the loss curves can be laid side by side.

    python examples/forecast.py --out out            # LSTM and GRU, fused and torch.nn
    python examples/forecast.py --cell lstm --impl fused --epochs 50
"""
import argparse
import csv
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np
import torch
from sklearn.preprocessing import MinMaxScaler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import lstm_fused

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "data", "sunspots_monthly.csv")

RNN_CLASSES = {
    ("lstm", "fused"): lstm_fused.LSTM,
    ("lstm", "torch"): nn.LSTM,
    ("gru", "fused"): lstm_fused.GRU,
    ("gru", "torch"): nn.GRU,
}


def load_series(path: str, limit: int = 0) -> Tuple[np.ndarray, str]:
    """The value column of a two-column CSV (time, value) and its name; missing values are
    interpolated linearly."""
    with open(path, newline="") as f:
        header, *rows = list(csv.reader(f))
    values = np.array([float(v) if v else np.nan for _, v in rows], dtype=np.float64)
    missing = np.isnan(values)
    if missing.any():
        index = np.arange(len(values))
        values[missing] = np.interp(index[missing], index[~missing], values[~missing])
    return (values[:limit] if limit else values), header[1]


def make_windows(scaled: np.ndarray, seq_len: int, first_target: int, last_target: int):
    """Windows of seq_len steps, each with the value that follows as target, for every target
    index in [first_target, last_target)."""
    starts = np.arange(max(first_target, seq_len), last_target) - seq_len
    x = np.stack([scaled[s : s + seq_len] for s in starts])[..., None]
    y = scaled[starts + seq_len][:, None]
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)


class Forecaster(nn.Module):
    """RNN(input, hidden, layers, batch_first) -> every step's output, flattened -> Linear -> 1."""

    def __init__(self, rnn_class, seq_len: int, hidden_size: int, num_layers: int):
        super().__init__()
        self.rnn = rnn_class(1, hidden_size, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size * seq_len, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out.reshape(out.shape[0], -1))


@dataclass
class RunResult:
    name: str
    parameters: int
    seconds_per_epoch: float
    losses: List[float] = field(default_factory=list)
    test_rmse: float = float("nan")
    predictions: np.ndarray = None


def train_one(cell, impl, args, train_set, x_test, y_test_true, scaler) -> RunResult:
    torch.manual_seed(args.seed)  # same initial weights for fused and torch.nn
    model = Forecaster(RNN_CLASSES[cell, impl], args.seq_len, args.hidden_size, args.num_layers).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.MSELoss()
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))  # same batches too
    name = f"{cell.upper()} {impl}"
    result = RunResult(name, sum(p.numel() for p in model.parameters()), 0.0)
    start = time.perf_counter()
    bar = tqdm(range(1, args.epochs + 1), desc=f"{name:10s}", unit="epoch", leave=True)
    for epoch in bar:
        model.train()
        total, count = 0.0, 0
        for xb, yb in loader:
            xb, yb = xb.to(args.device), yb.to(args.device)
            optimizer.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(xb)
            count += len(xb)
        result.losses.append(total / count)
        bar.set_postfix(epoch=epoch, loss=f"{result.losses[-1]:.3e}")
    result.seconds_per_epoch = (time.perf_counter() - start) / args.epochs

    model.eval()
    with torch.no_grad():
        scaled_pred = model(x_test.to(args.device)).cpu().numpy()
    result.predictions = scaler.inverse_transform(scaled_pred)[:, 0]
    result.test_rmse = float(np.sqrt(np.mean((result.predictions - y_test_true) ** 2)))
    return result


def save_plots(results: List[RunResult], test_true: np.ndarray, naive: np.ndarray, value_name: str,
               out_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        ax.plot(range(1, len(r.losses) + 1), r.losses, label=r.name, linestyle="--" if "torch" in r.name else "-")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training MSE (scaled units)")
    ax.set_title("Training loss")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "loss_curves.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(test_true, color="black", linewidth=1.2, label="actual")
    ax.plot(naive, color="grey", linewidth=0.8, alpha=0.7, label="naive (last value)")
    for r in results:
        ax.plot(r.predictions, linewidth=0.9, label=f"{r.name} (RMSE {r.test_rmse:.3f})")
    ax.set_xlabel("step of the test period")
    ax.set_ylabel(value_name)
    ax.set_title("One-step-ahead forecasts on the test part")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "predictions.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def format_table(results: List[RunResult], naive_rmse: float, value_name: str) -> str:
    lines = [
        f"| model | parameters | s/epoch | final train loss | test RMSE ({value_name}) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r.name} | {r.parameters} | {r.seconds_per_epoch:.3f} | {r.losses[-1]:.3e} | {r.test_rmse:.4f} |")
    lines.append(f"| naive last value | 0 | - | - | {naive_rmse:.4f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="CSV with a date column and a value column")
    p.add_argument("--limit", type=int, default=0, help="use only the first N points (0: all)")
    p.add_argument("--seq-len", type=int, default=36, help="window length (steps of the series)")
    p.add_argument("--hidden-size", type=int, default=32)
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-fraction", type=float, default=0.8)
    p.add_argument("--cell", choices=["lstm", "gru", "both"], default="both")
    p.add_argument("--impl", choices=["fused", "torch", "both"], default="both")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out", help="directory for the PNGs and the table")
    return p.parse_args(argv)


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    series, value_name = load_series(args.data, args.limit)
    split = int(len(series) * args.train_fraction)
    scaler = MinMaxScaler().fit(series[:split, None])  # fitted on the training part only
    scaled = scaler.transform(series[:, None])[:, 0]
    x_train, y_train = make_windows(scaled, args.seq_len, 0, split)
    x_test, _ = make_windows(scaled, args.seq_len, split, len(series))
    test_true = series[split:]
    naive = series[split - 1 : -1]  # the last value seen before each test target
    naive_rmse = float(np.sqrt(np.mean((naive - test_true) ** 2)))
    print(f"{len(series)} points; {len(x_train)} training windows, {len(x_test)} test windows of "
          f"{args.seq_len} steps; torch {torch.__version__}, {torch.get_num_threads()} threads")

    cells = ["lstm", "gru"] if args.cell == "both" else [args.cell]
    impls = ["fused", "torch"] if args.impl == "both" else [args.impl]
    train_set = TensorDataset(x_train, y_train)
    results = [train_one(c, i, args, train_set, x_test, test_true, scaler) for c in cells for i in impls]

    table = format_table(results, naive_rmse, value_name)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    plots = save_plots(results, test_true, naive, value_name, args.out)
    print("wrote", ", ".join(plots + [os.path.join(args.out, "results.md")]))
    return {"results": results, "naive_rmse": naive_rmse, "plots": plots, "table": table}


if __name__ == "__main__":
    main()
