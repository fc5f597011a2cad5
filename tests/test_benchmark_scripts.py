"""The GPU check's scripts run only on a GPU machine, whose minutes are few: check here that they
still run, so that a GPU session does not spend its time on a broken script."""
import json
import os
import subprocess
import sys

import pytest

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


def test_sanitizer_workload_runs_and_checks_on_the_cpu():
    """The compute-sanitizer workload's cases (persistent and multi-block shapes, lengths, reverse,
    every dtype) run and agree with float64 torch.nn on the CPU: on the GPU a failure is the
    kernels', not the script's."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sanitizer_workload.py"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert done.stdout.count("\nok ") + done.stdout.startswith("ok ") >= 13, done.stdout


def test_gpu_sync_check_runs_its_calls_on_the_cpu(tmp_path):
    out = tmp_path / "sync.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_sync_check.py"), "--device", "cpu",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    record = json.loads(out.read_text())
    assert {"LSTM-packed", "GRU", "LSTMCell", "GRUCell"} <= set(record["sync_free"])
    assert all(r["passed"] is None and "skipped" in r for r in record["sync_free"].values()), record


def test_gpu_record_reads_cut_short_logs(tmp_path):
    """The GPU check's record from a pytest log without its XML (a stage killed at its limit) and
    from a sanitizer log."""
    record = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_record.py")]
    log = tmp_path / "tests-cuda.log"
    log.write_text("tests/test_a.py::test_x[cuda] PASSED [ 10%]\n"
                   "[gw1] [ 20%] FAILED tests/test_a.py::test_y[cuda-float32]\n"
                   "tests/test_a.py::test_z[cuda] SKIPPED (no CUDA) [ 30%]\n"
                   "FAILED tests/test_a.py::test_y[cuda-float32] - AssertionError\n")
    sanitizer = tmp_path / "memcheck.log"
    sanitizer.write_text("ok    case-a: relative error 1e-7\n========= Invalid __global__ read of size 4 bytes\n"
                         "WRONG case-b: relative error 1\n========= ERROR SUMMARY: 1 error\n")
    for name, kind, path in (("tests-cuda", "pytest", log), ("memcheck", "sanitizer", sanitizer)):
        subprocess.run(record + ["stage", str(tmp_path), name, "--status", "timeout", "--rc", "124", "--seconds", "5",
                                 "--limit", "5", "--log", str(path), "--kind", kind,
                                 "--data", str(tmp_path / "absent.xml")], check=True, timeout=60)
    subprocess.run(record + ["merge", str(tmp_path), str(tmp_path / "r.json"), str(tmp_path / "r.md")], check=True,
                   timeout=60)
    stages = json.loads((tmp_path / "r.json").read_text())["stages"]
    tests = stages["tests-cuda"]["tests"]
    assert (tests["passed"], tests["failed"], tests["skipped"]) == (1, 1, 1)
    assert tests["failed_tests"] == ["tests/test_a.py::test_y[cuda-float32]"]
    assert stages["memcheck"]["sanitizer"]["errors"] == 1
    assert stages["memcheck"]["sanitizer"]["reports_seen"] == 1
    assert stages["memcheck"]["sanitizer"]["workload_cases_failed"] == ["case-b"]
    assert "timeout" in (tmp_path / "r.md").read_text()


def test_gpu_check_script_parses():
    done = subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_report_table_ratios_and_ceiling():
    """report.py's table: ratios against torch.nn and the naive loop from the same run, the achieved
    GFLOP/s, and the naive loop's time over the run's FLOPs at the given GEMM rate."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import report
    finally:
        sys.path.pop(0)
    info = {"cell": "lstm", "device": "cpu", "mode": "inference", "B": 4, "T": 5, "I": 3, "H": 2}
    medians = {"lstm_fused": 0.002, "torch": 0.003, "naive": 0.010}
    data = {"benchmarks": [{"extra_info": dict(info, impl=impl), "stats": {"median": median}}
                           for impl, median in medians.items()]
            + [{"extra_info": {"impl": "gemm", "n": 10}, "stats": {"median": 2e-6, "min": 1e-6}}]}
    flops = 2 * 4 * 5 * 4 * 2 * (3 + 2)
    assert report.gemm_flops(info) == flops
    assert report.gemm_flops(dict(info, mode="training", cell="gru")) == 3 * flops * 3 // 4
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"report-test-{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump(data, f)
    try:
        _, rows, gemm = report.load_rows(path)
    finally:
        os.remove(path)
    assert gemm == pytest.approx(2 * 10**3 / 1e-6 / 1e9)
    assert len(rows) == 1
    peak = flops / 1e-3 / 1e9  # GFLOP/s at which the run's FLOPs take 1 ms
    row = report.table(rows, peak).splitlines()[2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["lstm", "cpu", "inference", "B4-T5-I3-H2"]
    assert cells[4:7] == ["2.00", "3.00", "10.00"]
    assert cells[7:9] == ["1.50x", "5.00x"]
    assert float(cells[9]) == round(flops / 0.002 / 1e9, 1)
    assert cells[10] == "10.00x"
