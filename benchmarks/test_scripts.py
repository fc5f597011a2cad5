"""The benchmark scripts run (once, on a tiny shape, untimed), so that they cannot rot between the
sessions that use them: CI runs this directory."""
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def run(script, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_env_ab_prints_every_setting_and_torch_nn():
    out = run("env_ab.py", "4", "6", "8", "16", "1", ";LSTM_FUSED_CPU_GEMM=onednn")
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == ["default", "LSTM_FUSED_CPU_GEMM=onednn", "torch.nn"]
    assert all("inference" in line and "bwd" in line for line in lines)


def test_paired_prints_a_ratio_per_mode():
    out = run("paired.py", "lstm", "--shape", "4,6,8,16", "--pairs", "2")
    assert "inference" in out and "training" in out and "x (torch.nn" in out
