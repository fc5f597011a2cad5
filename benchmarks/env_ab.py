"""In-process A/B of lstm_fused's CPU switches (LSTM_FUSED_CPU_*), which the C++ reads with getenv
on every call: the settings are alternated within one process, round by round, beside torch.nn,
and each phase (inference, training forward, training backward) is the median over the rounds.

    python benchmarks/env_ab.py 128 35 512 512 21 ";LSTM_FUSED_CPU_GEMM=onednn;LSTM_FUSED_CPU_LOOP=stationary,LSTM_FUSED_CPU_INPUT=fused"

Arguments: B T I H rounds, then the settings separated by ";" (an empty one is the default rules),
each a comma-separated list of NAME=value. A switch that some setting names is unset in the others.
"""
import os
import statistics
import sys

import torch

import lstm_fused
from paired import seconds

WARMUP_ROUNDS = 2


def parse_settings(text):
    return [dict(kv.split("=", 1) for kv in setting.split(",") if kv) for setting in text.split(";")]


def main(argv):
    B, T, I, H, rounds = map(int, argv[:5])
    settings = parse_settings(argv[5])
    switches = {name for setting in settings for name in setting}
    saved = {name: os.environ.get(name) for name in switches}
    torch.manual_seed(0)
    ref, ours = torch.nn.LSTM(I, H), lstm_fused.LSTM(I, H)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, requires_grad=True)
    runs = [(setting, ours) for setting in settings] + [({}, ref)]
    times = [([], [], []) for _ in runs]  # inference, training forward, training backward
    try:
        for r in range(rounds + WARMUP_ROUNDS):
            for (setting, model), phases in zip(runs, times):
                for name in switches:
                    os.environ.pop(name, None)
                os.environ.update(setting)
                with torch.inference_mode():
                    inference = seconds(lambda: model(x.detach()))
                out = []
                forward = seconds(lambda: out.append(model(x)[0]))
                backward = seconds(lambda: out[0].sum().backward())
                if r >= WARMUP_ROUNDS:
                    for phase, t in zip(phases, (inference, forward, backward)):
                        phase.append(t)
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
    names = [";".join(f"{k}={v}" for k, v in s.items()) or "default" for s in settings] + ["torch.nn"]
    for name, phases in zip(names, times):
        inf, fw, bw = (statistics.median(p) * 1e3 for p in phases)
        print(f"{name:60s} inference {inf:7.1f} ms  train fwd {fw:7.1f}  bwd {bw:7.1f}  total {fw + bw:7.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
