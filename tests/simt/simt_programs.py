"""Building and running C++ programs against the SIMT emulator (csrc/simt/simt.h), natively or
in race mode (ThreadSanitizer). Used by tests/test_simt_emulator.py; kernel tests can use it to
run ATen-free kernel headers standalone under TSan:

    exe = simt_programs.build("my_race_test", [Path("tests/simt/my_race_test.cpp")], tsan=True)
    result = simt_programs.run([exe, "args"], tsan=True)
    assert simt_programs.races(result.stderr) == []
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "simt-tests"
HEADERS = sorted((ROOT / "csrc" / "simt").glob("*.h")) + [ROOT / "csrc" / "cuda" / "mma.cuh",
                                                          ROOT / "tests" / "simt" / "check.h"]
GXX = shutil.which("g++")
# exitcode 66 marks "ran, but TSan reported"; halt_on_error=0 lists every race of a run
TSAN_OPTIONS = "halt_on_error=0 exitcode=66 report_signal_unsafe=0"


class BuildError(RuntimeError):
    pass


def build(name, sources, tsan=False, flags=(), std="c++17", depends=()):
    """Compiles `sources` into build/simt-tests/<name> unless it is newer than every input.
    TSan builds add -g -fsanitize=thread. Raises BuildError with the compiler's output."""
    if GXX is None:
        raise BuildError("g++ is not installed")
    BUILD.mkdir(parents=True, exist_ok=True)
    out = BUILD / name
    inputs = [Path(s) for s in sources] + HEADERS + [Path(d) for d in depends]
    if out.exists() and all(out.stat().st_mtime >= p.stat().st_mtime for p in inputs if p.exists()):
        return str(out)
    cmd = [GXX, f"-std={std}", "-O1", "-pthread", "-Wall", "-Wextra", f"-I{ROOT}",
           *(["-g", "-fsanitize=thread"] if tsan else []), *flags, *map(str, sources), "-o", str(out) + ".tmp"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(result.stderr)
    os.replace(str(out) + ".tmp", out)
    return str(out)


def run(cmd, tsan=False, env=None, timeout=120):
    full_env = {**os.environ, **(env or {})}
    if tsan:
        full_env["TSAN_OPTIONS"] = TSAN_OPTIONS
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def races(stderr):
    """The function named by each TSan data-race summary, e.g. ['exchange'] (templates and
    namespaced functions come with their signature, as TSan prints them)."""
    return [m.strip() for m in re.findall(r"^SUMMARY: ThreadSanitizer: data race \S+ in (.+)$", stderr, flags=re.M)]
