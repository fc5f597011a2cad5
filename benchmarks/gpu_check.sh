#!/usr/bin/env bash
# The one-shot GPU check: build, run the tests with the CUDA cases active, compute-sanitizer,
# time against cuDNN, and write benchmarks/results/gpu-<date>.json (+ .md), copied to $OUT too.
# Meant for a GPU machine with torch already installed and no network; budget: 8 minutes.
#
#   bash benchmarks/gpu_check.sh
#   CSRC_TREE=<git rev-parse HEAD:csrc> bash benchmarks/gpu_check.sh   # where .git is absent
set -uo pipefail
cd "$(dirname "$0")/.."
stamp=$(date -u +%Y-%m-%d)
results=benchmarks/results
mkdir -p "$results"
log_dir=$(mktemp -d)  # full logs; the useful ones are copied to $OUT at the end (it returns 8 files at most)
csrc_tree=${CSRC_TREE:-$(git rev-parse HEAD:csrc 2>/dev/null || echo unknown)}
py=${PYTHON:-python}
# Every step has a time limit: a kernel that hangs (a cooperative kernel waiting at a grid barrier
# forever, say) must not eat the whole GPU lease. Status 124 in a step's output means it timed out.
limit() { local seconds=$1; shift; timeout --kill-after=10 "$seconds" "$@"; }

echo "== 1. build"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)} FORCE_CUDA=${FORCE_CUDA:-1}
export LSTM_FUSED_PTXAS_VERBOSE=1
t0=$(date +%s)
if ! limit 300 $py -m pip install -v --no-build-isolation --no-deps -e . > "$log_dir/build.log" 2>&1; then
    tail -30 "$log_dir/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "built in $(( $(date +%s) - t0 ))s"
# Resource figures of every kernel, for benchmarks/NOTES.md.
grep -E "ptxas info|Compiling entry|spill" "$log_dir/build.log" > "$log_dir/ptxas.txt" 2>/dev/null || true

echo "== 2. tests"
limit 240 $py -m pytest tests -q -p no:cacheprovider --junitxml="$log_dir/tests.xml" > "$log_dir/tests.log" 2>&1
echo "pytest exit status $?"
tail -25 "$log_dir/tests.log"

echo "== 2b. DDP with nccl (one rank)"
limit 90 $py benchmarks/nccl_check.py 2>&1 | tail -3

echo "== 3. compute-sanitizer"
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
sanitizer_errors=null
if [ -n "$sanitizer" ]; then
    sanitizer_errors=0
    for tool in memcheck racecheck; do
        limit 120 "$sanitizer" --tool "$tool" --error-exitcode 9 $py benchmarks/sanitizer_workload.py > "$log_dir/sanitizer-$tool.log" 2>&1
        n=$(grep -oE "ERROR SUMMARY: [0-9]+" "$log_dir/sanitizer-$tool.log" | grep -oE "[0-9]+" | tail -1)
        echo "$tool: ${n:-?} errors"; tail -3 "$log_dir/sanitizer-$tool.log"
        sanitizer_errors=$(( sanitizer_errors + ${n:-1} ))
    done
else
    echo "compute-sanitizer not found: skipped"
fi

echo "== 4. benchmark against cuDNN"
limit 200 $py benchmarks/gpu_bench.py --json "$log_dir/bench.json" 2>&1 | tail -12

echo "== 5. results"
$py - "$log_dir" "$results/gpu-$stamp" "$csrc_tree" "$sanitizer_errors" <<'PY'
import json, sys, shutil, os
import xml.etree.ElementTree as ET
import torch
log_dir, base, csrc_tree, sanitizer_errors = sys.argv[1:5]
passed = failed = None
try:
    suite = ET.parse(os.path.join(log_dir, "tests.xml")).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    failed = int(suite.get("failures")) + int(suite.get("errors"))
    passed = total - skipped - failed
except Exception as error:
    print("could not read the test results:", error)
bench = {}
try:
    bench = json.load(open(os.path.join(log_dir, "bench.json")))
except Exception as error:
    print("could not read the benchmark results:", error)
record = {
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device",
    "torch": torch.__version__,
    "csrc_tree": csrc_tree,
    "tests_passed": passed,
    "tests_failed": failed,
    "sanitizer_errors": None if sanitizer_errors == "null" else int(sanitizer_errors),
    "configs": bench.get("configs", {}),
    "speedup_vs_cudnn": bench.get("speedup_vs_cudnn", {}),
}
with open(base + ".json", "w") as f:
    json.dump(record, f, indent=1)
lines = [f"# GPU check: {record['device']}, torch {record['torch']}, csrc tree {csrc_tree[:12]}", "",
         f"tests: {passed} passed, {failed} failed; sanitizer errors: {record['sanitizer_errors']}", "",
         "| config | ours fwd ms | per-step kernels fwd ms | cuDNN fwd ms | fwd speedup | ours fwd+bwd ms | cuDNN fwd+bwd ms | fwd+bwd speedup |",
         "|---|---:|---:|---:|---:|---:|---:|---:|"]
for name, c in record["configs"].items():
    if "error" in c:
        lines.append(f"| {name} | {c['error']} | | | | | | |")
        continue
    s = record["speedup_vs_cudnn"][name]
    per_step = f"{c['ours_per_step_fwd_ms']:.3f}" if "ours_per_step_fwd_ms" in c else "-"
    lines.append(f"| {name} | {c['ours_fwd_ms']:.3f} | {per_step} | {c['cudnn_fwd_ms']:.3f} | {s['fwd']:.2f}x | "
                 f"{c['ours_fwdbwd_ms']:.3f} | {c['cudnn_fwdbwd_ms']:.3f} | {s['fwdbwd']:.2f}x |")
for key, value in bench.get("peaks", {}).items():
    lines.append(f"\n{key}: {value:.1f}")
open(base + ".md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
out = os.environ.get("OUT")
if out:
    for ext in (".json", ".md"):
        shutil.copy(base + ext, out)
PY

if [ -n "${OUT:-}" ]; then
    cp "$log_dir/tests.log" "$log_dir/ptxas.txt" "$OUT"/ 2>/dev/null
    [ -f "$log_dir/bench.json" ] && cp "$log_dir/bench.json" "$OUT"/
    tail -200 "$log_dir/build.log" > "$OUT/build-tail.log"
    cat "$log_dir"/sanitizer-*.log > "$OUT/sanitizer.log" 2>/dev/null || true
fi
echo "full logs: $log_dir"
