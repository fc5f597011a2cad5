"""One build, CPU kernels for every SIMD level, chosen when the library loads
(csrc/cpu/cpu_dispatch.cpp): lstm_fused.cpu_capability() says which level runs, each level this
CPU has matches the float64 reference, LSTM_FUSED_CPU_CAPABILITY asks for a level (one the CPU
lacks, or an unknown name, fails the import), and no code outside a level's namespace uses that
level's registers (the inline-function ODR trap: cpu_kernels.h)."""
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

import lstm_fused
from helpers import cpu_vendor

LEVELS = ["avx512", "avx2", "default"]  # best first
IS_X86 = platform.machine().lower() in ("x86_64", "amd64")
HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return set(re.findall(r"\w+", f.read()))
    except OSError:
        return None


def hardware_level():
    """The best level this CPU runs, by the features cpu_dispatch.cpp requires; None where
    /proc/cpuinfo cannot say."""
    if not IS_X86:
        return "default"
    flags = cpu_flags()
    if flags is None:
        return None
    avx2 = {"avx2", "fma", "f16c"} <= flags
    if avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    return "avx2" if avx2 else "default"


def lacks(level):
    """Why this CPU cannot run `level`, or None if it can."""
    best = hardware_level()
    if best is None:
        pytest.skip("no /proc/cpuinfo: cannot tell which levels this CPU has")
    if LEVELS.index(level) < LEVELS.index(best):
        return f"this CPU ({platform.machine()}) runs {best} at best, not {level}"
    return None


def run_python(code, **env):
    """Runs `code` in a fresh interpreter (the level is chosen once per process) with `env` added
    (a None value removes the variable), importing this checkout's lstm_fused."""
    full_env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(lstm_fused.__file__)))
    full_env["PYTHONPATH"] = os.pathsep.join([root, HERE] + [p for p in [full_env.get("PYTHONPATH")] if p])
    full_env["CUDA_VISIBLE_DEVICES"] = ""
    for name, value in env.items():
        if value is None:
            full_env.pop(name, None)
        else:
            full_env[name] = value
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=600)


def test_cpu_capability_reports_the_level_in_use():
    level = lstm_fused.cpu_capability()
    assert level in LEVELS
    asked = os.environ.get("LSTM_FUSED_CPU_CAPABILITY", "").strip().lower()
    if asked:
        assert level == asked
        return
    best = hardware_level()
    if best is None:
        pytest.skip("no /proc/cpuinfo: cannot tell which level this CPU should get")
    aten = torch.backends.cpu.get_cpu_capability().lower()
    aten = aten if aten in LEVELS else "default"
    assert level == LEVELS[max(LEVELS.index(best), LEVELS.index(aten))]


# Each level's kernels on the paths whose code differs by level (register tiles and lanes of the
# stationary loop, both input-projection placements, the per-step loop, the cell's single step,
# the GRU's stationary and per-step loops), at sizes across whole vectors of each level, with
# lengths and reverse, float64 and float32, forward and every gradient.
LEVEL_CHECK = r"""
import os, sys, torch
import lstm_fused
from lstm_fused.ops import gru_layer, lstm_layer
from lstm_fused.reference import gru_layer_reference, lstm_layer_reference
from test_ops import make_gru_args, make_layer_args, outputs_and_grads, random_lengths

level = os.environ["LSTM_FUSED_CPU_CAPABILITY"]
assert lstm_fused.cpu_capability() == level, (lstm_fused.cpu_capability(), level)
torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
failures = []
SHAPES = [(6, 13, 5, 17), (5, 7, 40, 33), (1, 9, 8, 24), (4, 3, 2, 64)]  # T, B, I, H
CASES = [
    ("lstm", {"LSTM_FUSED_CPU_LOOP": "stationary", "LSTM_FUSED_CPU_INPUT": "fused"}),
    ("lstm", {"LSTM_FUSED_CPU_LOOP": "stationary", "LSTM_FUSED_CPU_INPUT": "separate", "LSTM_FUSED_CPU_THREADS": "2"}),
    ("lstm", {"LSTM_FUSED_CPU_LOOP": "step"}),
    ("gru", {"LSTM_FUSED_CPU_LOOP": "stationary"}),
    ("gru", {"LSTM_FUSED_CPU_LOOP": "step"}),
]
for T, B, I, H in SHAPES:
    for cell, env in CASES:
        for name in ("LSTM_FUSED_CPU_LOOP", "LSTM_FUSED_CPU_INPUT", "LSTM_FUSED_CPU_THREADS"):
            os.environ.pop(name, None)
        os.environ.update(env)
        for use_lengths, reverse in [(False, False), (True, True)]:
            seed = int(torch.randint(0, 2**31, ()))
            if cell == "lstm":
                args64 = make_layer_args(T, B, I, H, 0, True, "cpu", seed=seed)
                ours, reference = lstm_layer, lstm_layer_reference
            else:
                args64 = make_gru_args(T, B, I, H, True, "cpu", seed=seed)
                ours, reference = gru_layer, gru_layer_reference
            lengths = random_lengths(T, B, seed) if use_lengths else None
            exact, weights = outputs_and_grads(reference, args64, lengths, reverse)
            got64, _ = outputs_and_grads(ours, args64, lengths, reverse, weights)
            args32 = [a.detach().float().requires_grad_() if a is not None else None for a in args64]
            got32, _ = outputs_and_grads(ours, args32, lengths, reverse, weights)
            # torch's own float32 evaluation of the same formulas sets the float32 bound
            torch32, _ = outputs_and_grads(reference, args32, lengths, reverse, weights)
            for k, (e, a64, a32, t32) in enumerate(zip(exact, got64, got32, torch32)):
                scale = e.abs().max().item() + 1.0
                err64 = (a64 - e).abs().max().item()
                err32 = (a32.double() - e).abs().max().item()
                bound32 = 4 * (t32.double() - e).abs().max().item() + 1e-6 * scale
                if err64 > 1e-10 * scale or err32 > bound32:
                    failures.append(f"{cell} {env} T,B,I,H={T, B, I, H} seed={seed} lengths={use_lengths} reverse={reverse} "
                                    f"output/grad {k}: float64 error {err64:.3g}, float32 error {err32:.3g} "
                                    f"(bound {bound32:.3g})")
print("\n".join(failures) if failures else "ok")
sys.exit(1 if failures else 0)
"""


@pytest.mark.parametrize("level", LEVELS)
def test_each_level_matches_the_float64_reference(level):
    reason = lacks(level)
    if reason:
        pytest.skip(reason)
    result = run_python(LEVEL_CHECK, LSTM_FUSED_CPU_CAPABILITY=level)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_level_the_cpu_lacks_fails_the_import_saying_what_is_missing():
    missing = [level for level in LEVELS if lacks(level)]
    if not missing:
        pytest.skip(f"this CPU has every level ({', '.join(LEVELS)}): none to ask for in vain")
    result = run_python("import lstm_fused", LSTM_FUSED_CPU_CAPABILITY=missing[0])
    assert result.returncode != 0
    assert "RuntimeError" in result.stderr
    assert f"LSTM_FUSED_CPU_CAPABILITY={missing[0]}" in result.stderr and "this CPU lacks" in result.stderr


def test_an_unknown_level_fails_the_import():
    result = run_python("import lstm_fused", LSTM_FUSED_CPU_CAPABILITY="avx1024")
    assert result.returncode != 0
    assert "RuntimeError" in result.stderr
    assert "LSTM_FUSED_CPU_CAPABILITY=avx1024 is not a CPU kernel level" in result.stderr


def test_aten_cpu_capability_lowers_the_level_and_an_explicit_request_outranks_it():
    if lacks("avx2"):
        pytest.skip(lacks("avx2"))
    code = "import lstm_fused; print(lstm_fused.cpu_capability())"
    lowered = run_python(code, ATEN_CPU_CAPABILITY="default", LSTM_FUSED_CPU_CAPABILITY=None)
    assert lowered.returncode == 0, lowered.stderr
    assert lowered.stdout.split()[-1] == "default"
    asked = run_python(code, ATEN_CPU_CAPABILITY="default", LSTM_FUSED_CPU_CAPABILITY="avx2")
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout.split()[-1] == "avx2"


# Registers that only AVX-512 code may use (zmm, the upper 16 xmm/ymm, the mask registers), and
# the ymm registers that baseline x86-64 code never uses.
AVX512_REGISTERS = re.compile(r"%(zmm\d+|[xy]mm(1[6-9]|2\d|3[01])|k[0-7])\b")
YMM_REGISTERS = re.compile(r"%ymm\d+\b")
BRANCH_TARGET = re.compile(r"\t(?:call|jmp|j[a-z]+)\s+([0-9a-f]+) <")


def level_of(function):
    """objdump -C leaves some names mangled (OpenMP's outlined "._omp_fn.0" bodies): a level's
    namespace is recognised in either spelling, anywhere in the name (template arguments of
    that level's types make the instantiation that level's own)."""
    if "::AVX512::" in function or "10lstm_fused6AVX512" in function:
        return "AVX512"
    if "::AVX2::" in function or "10lstm_fused4AVX2" in function:
        return "AVX2"
    return "baseline"


def test_no_code_outside_a_levels_namespace_uses_its_registers():
    """Disassembles the built library: code outside the AVX512 namespaces (ours and at::vec's)
    uses no AVX-512 register, and code outside the AVX2 and AVX512 ones no ymm either. An inline
    function compiled into several levels' objects and merged by the linker from the wrong one
    would show up here as baseline code with wide registers; so would a static initialiser of a
    per-level object (it runs at load, whatever the CPU).
    GCC's local clones of inline functions ("[clone .constprop.0]", ".isra", ".cold") are never
    merged: each belongs to its object and is called from there, so they are checked as part of the
    functions that branch to them, with their callers' rule."""
    if not IS_X86:
        pytest.skip("the SIMD levels are x86-64 ones")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    import bisect

    listing = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", lstm_fused._C.__file__],
                             capture_output=True, text=True, check=True).stdout
    starts, names, bodies = [], [], []
    for line in listing.splitlines():
        header = re.match(r"^([0-9a-f]+) <(.*)>:$", line)
        if header:
            starts.append(int(header.group(1), 16))
            names.append(header.group(2))
            bodies.append([])
        elif bodies and "\t" in line:
            bodies[-1].append(line)
    counted = {"AVX512": 0, "AVX2": 0, "baseline": 0}
    for name in names:
        counted[level_of(name)] += 1
    # the check saw each level's code (a renamed namespace would otherwise make it vacuous)
    assert counted["AVX512"] > 0 and counted["AVX2"] > 0 and counted["baseline"] > 0, counted
    assert any(name.startswith("lstm_fused::AVX2::") for name in names)
    assert any(name.startswith("lstm_fused::DEFAULT::") for name in names)

    def forbidden(level):
        return [AVX512_REGISTERS] + ([YMM_REGISTERS] if level == "baseline" else [])

    offenders = {}
    seen = set()
    pending = [(k, level_of(n), n) for k, n in enumerate(names)
               if level_of(n) != "AVX512" and ("[clone ." not in n or level_of(n) != "baseline")]
    while pending:
        k, level, root = pending.pop()
        if (k, level) in seen:
            continue
        seen.add((k, level))
        for line in bodies[k]:
            if any(pattern.search(line) for pattern in forbidden(level)):
                offenders.setdefault(names[k], f"{line.strip()} (reached from {root})")
                break
        for line in bodies[k]:
            target = BRANCH_TARGET.search(line)
            if target is None:
                continue
            j = bisect.bisect_right(starts, int(target.group(1), 16)) - 1
            if j >= 0 and j != k and "[clone ." in names[j] and level_of(names[j]) == "baseline":
                pending.append((j, level, root))
    assert not offenders, "\n".join(f"{name}: {insn}" for name, insn in list(offenders.items())[:20])


def test_large_lstm_steps_go_to_mkl_only_on_intel(monkeypatch):
    """A step of 268 MFLOP (B=128, H=512) runs MKL's per-step GEMM on Intel CPUs and the stationary
    loop on others (lstm_stationary.h: large_steps_to_mkl). The two sum in different orders, so the
    default's float32 result is bitwise that of the loop it took."""
    vendor = cpu_vendor()
    if not IS_X86 or vendor is None:
        pytest.skip("the rule is for x86 CPUs, and no vendor_id in /proc/cpuinfo here")
    T, B, I, H = 4, 128, 8, 512
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    x, h0, c0 = (torch.randn(*shape, generator=gen) for shape in [(T, B, I), (B, H), (B, H)])
    w_ih, w_hh = torch.randn(4 * H, I, generator=gen) * 0.1, torch.randn(4 * H, H, generator=gen) * 0.05
    b_ih, b_hh = torch.randn(4 * H, generator=gen), torch.randn(4 * H, generator=gen)

    def run(loop):
        if loop is None:
            monkeypatch.delenv("LSTM_FUSED_CPU_LOOP", raising=False)
        else:
            monkeypatch.setenv("LSTM_FUSED_CPU_LOOP", loop)
        return torch.ops.lstm_fused.lstm_layer_inference(x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, None, False)[0]

    default, step, stationary = run(None), run("step"), run("stationary")
    assert not torch.equal(step, stationary), "the two loops agree bitwise: this test cannot tell them apart"
    expected = step if vendor == "GenuineIntel" else stationary
    assert torch.equal(default, expected), f"vendor {vendor}: the default took the other loop"
