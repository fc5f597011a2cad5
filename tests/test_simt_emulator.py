"""The SIMT emulator's own tests (csrc/simt, csrc/cuda/mma.cuh): C++ programs in tests/simt built
with g++ (no torch), run here, asserted on their exit codes and output. The race-mode programs are
built with -fsanitize=thread. Binaries are cached under build/simt-tests and rebuilt when a
source or header changes."""

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.simt

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "tests" / "simt"
HEADERS = [ROOT / "csrc" / "simt" / "simt.h", ROOT / "csrc" / "simt" / "fiber.h", ROOT / "csrc" / "cuda" / "mma.cuh",
           SOURCES / "check.h"]
BUILD = ROOT / "build" / "simt-tests"
GXX = shutil.which("g++")
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)

# (binary, source, extra flags)
PROGRAMS = {
    "test_core": ("test_core.cpp", []),
    "test_tensor": ("test_tensor.cpp", []),
    "test_core_tsan": ("test_core.cpp", ["-g", "-fsanitize=thread"]),
    "test_tensor_tsan": ("test_tensor.cpp", ["-g", "-fsanitize=thread"]),
    "test_race": ("test_race.cpp", ["-g", "-fsanitize=thread"]),
}
TSAN_ENV = {"TSAN_OPTIONS": "halt_on_error=0 exitcode=66 report_signal_unsafe=0"}


def names_of_tests(source):
    return re.findall(r"^TEST\((\w+)\)", (SOURCES / source).read_text(), flags=re.M)


def build_one(binary):
    source, flags = PROGRAMS[binary]
    out = BUILD / binary
    inputs = [SOURCES / source, *HEADERS]
    if out.exists() and all(out.stat().st_mtime >= p.stat().st_mtime for p in inputs):
        return binary, None
    cmd = [GXX, "-std=c++17", "-O1", "-pthread", "-Wall", "-Wextra", *flags, str(SOURCES / source), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        return binary, result.stderr
    return binary, None


@pytest.fixture(scope="module")
def programs():
    if GXX is None:
        pytest.skip("g++ is not installed: the emulator's tests compile C++ programs with it")
    BUILD.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        errors = dict(pool.map(build_one, PROGRAMS))
    return errors


def binary(programs, name):
    error = programs[name]
    if error is not None:
        if "tsan" in name or name == "test_race":
            if "fsanitize" in error or "tsan" in error.lower():
                pytest.skip(f"this g++ cannot build with -fsanitize=thread: {error[-300:]}")
        pytest.fail(f"building {name} failed:\n{error}")
    return str(BUILD / name)


def run(cmd, env=None, timeout=120):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("name", names_of_tests("test_core.cpp"))
def test_core(programs, name):
    result = run([binary(programs, "test_core"), name])
    assert result.returncode == 0 and f"PASS {name}" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("name", names_of_tests("test_tensor.cpp"))
def test_tensor(programs, name):
    result = run([binary(programs, "test_tensor"), name])
    assert result.returncode == 0 and f"PASS {name}" in result.stdout, result.stdout + result.stderr


# Race mode has no false positives: the whole suite (but the deliberately racy kernel, and the
# 1024-thread reductions, slow under TSan) runs clean under ThreadSanitizer.
def test_core_clean_under_tsan(programs):
    names = [n for n in names_of_tests("test_core.cpp")
             if n not in ("missing_barrier_gives_wrong_result", "block_barrier_reduction")]
    result = run([binary(programs, "test_core_tsan"), *names], env=TSAN_ENV)
    assert "ThreadSanitizer" not in result.stderr, result.stderr[-6000:]
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count("PASS ") == len(names)


def test_tensor_clean_under_tsan(programs):
    result = run([binary(programs, "test_tensor_tsan")], env=TSAN_ENV)
    assert "ThreadSanitizer" not in result.stderr, result.stderr[-6000:]
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


def test_missing_barrier_reported_under_tsan(programs):
    result = run([binary(programs, "test_core_tsan"), "missing_barrier_gives_wrong_result"], env=TSAN_ENV)
    assert "WARNING: ThreadSanitizer: data race" in result.stderr
    assert re.search(r"SUMMARY: ThreadSanitizer: data race .*test_core\.cpp:\d+ in block_sum<false>", result.stderr), \
        result.stderr[-3000:]
    assert result.returncode == 66


RACE_KERNELS = {  # argument -> kernel function named in TSan's summary
    "exchange": "exchange",
    "tile_reuse": "tile_reuse",
    "warp_exchange": "warp_exchange",
    "dynamic": "dynamic_exchange",
    "grid": "grid_ping_pong",
}


@pytest.mark.parametrize("kernel", RACE_KERNELS)
def test_race_reported(programs, kernel):
    result = run([binary(programs, "test_race"), kernel, "racy"], env=TSAN_ENV)
    assert f"ran {kernel} racy" in result.stdout, result.stdout + result.stderr[-3000:]
    summary = re.search(r"SUMMARY: ThreadSanitizer: data race .*test_race\.cpp:\d+ in (\w+)", result.stderr)
    assert summary and summary.group(1) == RACE_KERNELS[kernel], result.stderr[-3000:]
    assert result.returncode == 66


@pytest.mark.parametrize("kernel", RACE_KERNELS)
def test_race_clean_with_barrier(programs, kernel):
    result = run([binary(programs, "test_race"), kernel, "clean"], env=TSAN_ENV)
    assert "ThreadSanitizer" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 0 and f"ran {kernel} clean" in result.stdout


def test_report_file_lists_launches(programs, tmp_path):
    report = tmp_path / "report.txt"
    result = run([binary(programs, "test_core"), "grid_sync_ping_pong", "every_block_runs_once"],
                 env={"LSTM_FUSED_SIMT_REPORT": str(report)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert report.read_text().splitlines() == ["ping_pong", "count_blocks"]


def test_ptx_branch_compiles(tmp_path):
    if NVCC is None:
        pytest.skip("nvcc is not installed: the PTX branch of mma.cuh is compiled only where it is")
    result = subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", "-c", str(SOURCES / "ptx_check.cu"), "-o",
                             str(tmp_path / "ptx_check.o")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    ptx = subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", "-ptx", str(SOURCES / "ptx_check.cu"), "-o",
                          str(tmp_path / "ptx_check.ptx")], capture_output=True, text=True, timeout=300)
    assert ptx.returncode == 0, ptx.stderr
    text = (tmp_path / "ptx_check.ptx").read_text()
    for instruction in ["mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
                        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
                        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32",
                        "ldmatrix.sync.aligned.m8n8.x1.shared.b16", "ldmatrix.sync.aligned.m8n8.x2.shared.b16",
                        "ldmatrix.sync.aligned.m8n8.x4.shared.b16", "ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16",
                        "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16",
                        "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16", "cp.async.cg.shared.global",
                        "cp.async.ca.shared.global", "cp.async.commit_group", "cp.async.wait_group",
                        "cvt.rn.bf16x2.f32", "cvt.rn.f16x2.f32", "cvt.rna.tf32.f32"]:
        assert instruction in text, instruction
