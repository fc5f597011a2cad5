"""In-process A/B of lstm_fused's CPU switches (LSTM_FUSED_CPU_*), which the C++ reads with getenv
on every call: the settings are alternated within one process, round by round, beside torch.nn,
and each phase (inference, training forward, training backward) is the median over the rounds.

    python benchmarks/env_ab.py 128 35 512 512 21 ";LSTM_FUSED_CPU_GEMM=onednn;LSTM_FUSED_CPU_LOOP=stationary,LSTM_FUSED_CPU_INPUT=fused"

Arguments: B T I H rounds, then the settings separated by ";" (an empty one is the default rules),
each a comma-separated list of NAME=value.
"""
import os, sys, time, statistics, torch, lstm_fused
B, T, I, H, rounds = map(int, sys.argv[1:6])
settings = [dict(kv.split("=") for kv in s.split(",") if kv) for s in sys.argv[6].split(";")]
keys = {k for s in settings for k in s}
torch.manual_seed(0)
ref = torch.nn.LSTM(I, H); ours = lstm_fused.LSTM(I, H); ours.load_state_dict(ref.state_dict())
x = torch.randn(T, B, I, requires_grad=True)
def apply(s):
    for k in keys: os.environ.pop(k, None)
    os.environ.update(s)
res = {i: ([], [], []) for i in range(len(settings) + 1)}
for r in range(rounds + 2):
    for i in range(len(settings) + 1):
        model = ref if i == len(settings) else ours
        if i < len(settings): apply(settings[i])
        with torch.inference_mode():
            t0 = time.perf_counter(); model(x.detach()); t1 = time.perf_counter()
        t2 = time.perf_counter(); out, _ = model(x); t3 = time.perf_counter(); out.sum().backward(); t4 = time.perf_counter()
        if r >= 2:
            res[i][0].append(t1 - t0); res[i][1].append(t3 - t2); res[i][2].append(t4 - t3)
names = [";".join(f"{k}={v}" for k, v in s.items()) or "default" for s in settings] + ["torch.nn"]
for i, n in enumerate(names):
    inf, fw, bw = (statistics.median(v) * 1e3 for v in res[i])
    print(f"{n:60s} inference {inf:7.1f} ms  train fwd {fw:7.1f}  bwd {bw:7.1f}  total {fw+bw:7.1f}")
