"""The GPU check's scripts run only on a GPU machine, whose minutes are few: check here that they
still run, so that a GPU session does not spend its time on a broken script."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_bench_smoke_runs_on_the_cpu(tmp_path):
    """gpu_bench.py --smoke on the CPU: every config (layers, packed, cells) measured, none failed,
    and the speedup table gpu_check.sh reads is complete."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_bench.py"), "--smoke", "--device",
                           "cpu", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert {"lstm", "gru", "lstmcell"} <= {c.get("cell") for c in results["configs"].values()}
    for name, config in results["configs"].items():
        assert "error" not in config, (name, config)
        for key in ("ours_fwd_ms", "cudnn_fwd_ms", "ours_fwdbwd_ms", "cudnn_fwdbwd_ms"):
            assert config[key] > 0, (name, key)
    assert set(results["speedup_vs_cudnn"]) == set(results["configs"])


def test_gpu_check_script_parses():
    done = subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
