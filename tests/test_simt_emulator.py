"""The SIMT emulator's own tests (csrc/simt, csrc/cuda/mma.cuh): C++ programs in tests/simt built
with g++ (no torch), run here, asserted on their exit codes and output. The race-mode programs are
built with -fsanitize=thread. Binaries are cached under build/simt-tests and rebuilt when a
source or header changes."""

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "simt"))
import simt_programs  # noqa: E402

pytestmark = pytest.mark.simt

SOURCES = simt_programs.ROOT / "tests" / "simt"
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)

# binary -> (source, race mode)
PROGRAMS = {
    "test_core": ("test_core.cpp", False),
    "test_tensor": ("test_tensor.cpp", False),
    "test_core_tsan": ("test_core.cpp", True),
    "test_tensor_tsan": ("test_tensor.cpp", True),
    "test_race": ("test_race.cpp", True),
}


def names_of_tests(source):
    return re.findall(r"^TEST\((\w+)\)", (SOURCES / source).read_text(), flags=re.M)


def build_one(name):
    source, tsan = PROGRAMS[name]
    try:
        return name, simt_programs.build(name, [SOURCES / source], tsan=tsan)
    except simt_programs.BuildError as e:
        return name, e


@pytest.fixture(scope="module")
def programs():
    if simt_programs.GXX is None:
        pytest.skip("g++ is not installed: the emulator's tests compile C++ programs with it")
    with ThreadPoolExecutor(max_workers=2) as pool:  # two builds at once: TSan ones take ~20 s
        return dict(pool.map(build_one, PROGRAMS))


def binary(programs, name):
    built = programs[name]
    if isinstance(built, Exception):
        message = str(built)
        if PROGRAMS[name][1] and ("tsan" in message.lower() or "sanitize" in message):
            pytest.skip(f"this g++ cannot build with -fsanitize=thread: {message[-300:]}")
        pytest.fail(f"building {name} failed:\n{message}")
    return built


def run(cmd, tsan=False, env=None):
    return simt_programs.run(cmd, tsan=tsan, env=env)


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
    result = run([binary(programs, "test_core_tsan"), *names], tsan=True)
    assert "ThreadSanitizer" not in result.stderr, result.stderr[-6000:]
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count("PASS ") == len(names)


def test_tensor_clean_under_tsan(programs):
    result = run([binary(programs, "test_tensor_tsan")], tsan=True)
    assert "ThreadSanitizer" not in result.stderr, result.stderr[-6000:]
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


def test_missing_barrier_reported_under_tsan(programs):
    result = run([binary(programs, "test_core_tsan"), "missing_barrier_gives_wrong_result"], tsan=True)
    assert "WARNING: ThreadSanitizer: data race" in result.stderr
    assert set(simt_programs.races(result.stderr)) == {"block_sum<false>"}, result.stderr[-3000:]
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
    result = run([binary(programs, "test_race"), kernel, "racy"], tsan=True)
    assert f"ran {kernel} racy" in result.stdout, result.stdout + result.stderr[-3000:]
    assert "test_race.cpp:" in result.stderr
    assert set(simt_programs.races(result.stderr)) == {RACE_KERNELS[kernel]}, result.stderr[-3000:]
    assert result.returncode == 66


@pytest.mark.parametrize("kernel", RACE_KERNELS)
def test_race_clean_with_barrier(programs, kernel):
    result = run([binary(programs, "test_race"), kernel, "clean"], tsan=True)
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
