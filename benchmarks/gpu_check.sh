#!/usr/bin/env bash
# The one-shot GPU check: a complete record in one call of at most 9 minutes on one H200 (16
# cores, torch 2.11.0+cu130, Python 3.12 as python3, no network). Every stage runs under
# `timeout`, and after each one the record in $OUT is rewritten: a call cut short still brings
# back what it did.
#
#   bash benchmarks/gpu_check.sh                 # $OUT: where the record goes (a temp dir if unset)
#   SKIP_BUILD=1 bash benchmarks/gpu_check.sh    # use the lstm_fused/_C*.so already built in place
#   BUILD_INPLACE=1 ...                          # build with setup.py build_ext --inplace, not pip -e
#   SKIP_REST=1 ...                              # leave out the last stage (the non-CUDA tests)
#   GIT_COMMIT=<sha> ...                         # name the commit where .git is absent
#
# Budget plan (seconds; each stage's limit is the plan's deadline for it minus the time used so
# far, so time a stage leaves unused passes to the next; the last stage takes what remains):
#   stage       budget  deadline  what
#   env             20       20   machine, torch, cuDNN, TF32 defaults, commit, pytest plugins
#   build          160      180   pip install --no-build-isolation --no-deps -e . (all cores, sm_90);
#                                 it may run 60 s over, which moves the later deadlines (the last
#                                 stages lose that time; none ends after 530)
#   tests-cuda      80      260   pytest -m "cuda or simt", each test under --timeout
#   sync            30      290   benchmarks/gpu_sync_check.py: no sync inside calls, CUDA graphs
#   memcheck        55      345   compute-sanitizer memcheck, PYTORCH_NO_CUDA_MEMORY_CACHING=1
#   racecheck       55      400   compute-sanitizer racecheck
#   bench           80      480   benchmarks/gpu_bench.py: issue 17's configs against cuDNN
#   nccl            15      495   benchmarks/nccl_check.py: DDP with nccl, one rank
#   tests-rest      35      530   pytest -m "not cuda and not simt" (already run by CI on a CPU)
#   (record)        10      540   the last record; timeout's kill-after
#   total                   540   (9 minutes, the build included)
# $OUT gets 4 files: gpu-check.json (the record), gpu-check.md (its summary), logs.tar.gz (every
# stage's log) and console.log (this script's output).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
started=$(date +%s)
TOTAL=540
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
logs=$(mktemp -d)
exec > >(tee -a "$OUT/console.log") 2>&1
py=${PYTHON:-python}
command -v "$py" >/dev/null 2>&1 || py=python3
export PYTHONUNBUFFERED=1
echo "gpu_check: record in $OUT, logs in $logs, python $(command -v "$py")"

deadline=0  # the current stage's deadline, seconds after the start
order=0
elapsed() { echo $(( $(date +%s) - started )); }
finish() {  # bundle the logs and rewrite the record: after every stage
    tar -czf "$OUT/logs.tar.gz.tmp" -C "$logs" . 2>/dev/null && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
    "$py" benchmarks/gpu_record.py merge "$logs" "$OUT/gpu-check.json" "$OUT/gpu-check.md" ||
        echo "gpu_check: could not write the record"
}
skip() {  # name budget reason
    deadline=$(( deadline + $2 )); order=$(( order + 1 ))
    echo "== $1: skipped: $3"
    "$py" benchmarks/gpu_record.py stage "$logs" "$1" --order "$order" --status skipped --seconds 0 --limit 0 --note "$3"
    finish
}
# run_stage name budget kind data -- command...: runs the command under timeout until the stage's
# deadline, its output in $logs/<name>.log; records it (kind: plain, pytest, sanitizer, json).
# A stage may run `borrow` seconds past its deadline (the build: nothing runs without it); the
# later deadlines then move by the overrun, and the last stages lose it.
run_stage() {
    local name=$1 budget=$2 kind=$3 data=$4 limit t0 rc status end=$(( TOTAL - 10 ))
    shift 5
    deadline=$(( deadline + budget )); order=$(( order + 1 ))
    # The last stage takes what remains, less the seconds for timeout's kill and the last record.
    [ "$name" = tests-rest ] && deadline=$end
    [ "$deadline" -gt "$end" ] && deadline=$end
    limit=$(( deadline + ${borrow:-0} - $(elapsed) ))
    [ "$limit" -gt $(( end - $(elapsed) )) ] && limit=$(( end - $(elapsed) ))
    if [ "$limit" -lt 5 ]; then skip_recorded "$name" "no time left in the plan"; return 1; fi
    echo "== $name (limit ${limit}s, $(elapsed)s elapsed)"
    t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" > "$logs/$name.log" 2>&1
    rc=$?
    [ "$(elapsed)" -gt "$deadline" ] && deadline=$(elapsed)
    case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
    echo "$name: $status (exit status $rc) in $(( $(date +%s) - t0 ))s"
    tail -n "${TAIL_LINES:-6}" "$logs/$name.log" | sed 's/^/    /'
    "$py" benchmarks/gpu_record.py stage "$logs" "$name" --order "$order" --status "$status" --rc "$rc" \
        --seconds $(( $(date +%s) - t0 )) --limit "$limit" --log "$logs/$name.log" --kind "$kind" --data "$data"
    finish
    return $rc
}
skip_recorded() {
    echo "== $1: skipped: $2"
    "$py" benchmarks/gpu_record.py stage "$logs" "$1" --order "$order" --status skipped --seconds 0 --limit 0 --note "$2"
    finish
}

# --- env ------------------------------------------------------------------------------------
run_stage env 20 json "$logs/env.json" -- "$py" benchmarks/gpu_env.py "$logs/env.json"
have_gpu=
eval "$(grep -E '^have_gpu=[01]$' "$logs/env.log")"
# Should the env stage fail, the GPU stages still run where nvidia-smi sees a GPU.
[ -n "$have_gpu" ] || { nvidia-smi -L >/dev/null 2>&1 && have_gpu=1 || have_gpu=0; }
# pytest plugins, probed without importing torch.
probe() { "$py" -c "$1" >/dev/null 2>&1 && echo 1 || echo 0; }
pytest_timeout=$(probe "import pytest_timeout")
session_timeout=$(probe "import importlib.metadata as m; v = m.version('pytest-timeout').split('.');
assert (int(v[0]), int(v[1])) >= (2, 3)")  # pytest-timeout 2.3 added --session-timeout
xdist=$(probe "import xdist")
echo "pytest plugins: timeout $pytest_timeout (session timeout $session_timeout), xdist $xdist"
GIT_COMMIT=$(grep -E '^git_commit=[0-9A-Za-z]+$' "$logs/env.log" | cut -d= -f2)
export GIT_COMMIT=${GIT_COMMIT:-unknown}  # gpu_bench.py names it in its JSON
[ "$have_gpu" = 1 ] || echo "gpu_check: no CUDA device here: the GPU stages are skipped (each says so)"
cores=$(nproc)

# --- build ----------------------------------------------------------------------------------
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$cores} LSTM_FUSED_PTXAS_VERBOSE=1
[ -n "${LSTM_FUSED_CPU_ONLY:-}" ] || export FORCE_CUDA=${FORCE_CUDA:-1}
built=1
if [ "${SKIP_BUILD:-0}" = 1 ]; then
    if ls lstm_fused/_C*.so >/dev/null 2>&1; then skip build 160 "SKIP_BUILD=1: using $(ls lstm_fused/_C*.so)"
    else skip build 160 "SKIP_BUILD=1 but no lstm_fused/_C*.so is built"; built=0; fi
elif [ "${BUILD_INPLACE:-0}" = 1 ]; then
    borrow=60 run_stage build 160 plain "" -- "$py" setup.py build_ext --inplace || built=0
else
    borrow=60 run_stage build 160 plain "" -- "$py" -m pip install -v --no-build-isolation --no-deps -e . || built=0
fi
# Each kernel's registers, shared memory and spills, for benchmarks/NOTES.md.
grep -E "ptxas info|Compiling entry|spill" "$logs/build.log" > "$logs/ptxas.txt" 2>/dev/null || true
# From here on the tests import the tree's own build, wherever pip put the editable install.
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}

# --- tests: the CUDA ones first -------------------------------------------------------------
pytest_stage() {  # name budget workers per-test-seconds marker-expression
    local name=$1 budget=$2 workers=$3 per_test=$4 expression=$5 args=(-p no:cacheprovider -v -rfE) limit
    # A test that hangs (a cooperative kernel waiting at a grid barrier forever, say) is ended
    # alone; the thread method works while the test is inside a CUDA call.
    [ "$pytest_timeout" = 1 ] && args+=(--timeout="$per_test" --timeout-method=thread)
    limit=$(( deadline + budget ))  # as run_stage will reckon it
    [ "$name" = tests-rest ] || [ "$limit" -gt $(( TOTAL - 10 )) ] && limit=$(( TOTAL - 10 ))
    limit=$(( limit - $(elapsed) ))
    if [ "$session_timeout" = 1 ] && [ "$limit" -gt 20 ]; then
        args+=(--session-timeout=$(( limit - 10 )))  # ends pytest itself in time to write its XML
    fi
    if [ "$xdist" = 1 ] && [ "$workers" -gt 1 ]; then
        args+=(-n "$workers")
        export OMP_NUM_THREADS=$(( cores / workers > 1 ? cores / workers : 1 ))
    fi
    run_stage "$name" "$budget" pytest "$logs/$name.xml" -- \
        "$py" -m pytest tests -m "$expression" --junitxml="$logs/$name.xml" "${args[@]}"
    unset OMP_NUM_THREADS
}
if [ "$built" = 1 ]; then
    pytest_stage tests-cuda 80 4 60 "cuda or simt"
else
    skip tests-cuda 80 "the build failed"
fi

# --- GPU stages -----------------------------------------------------------------------------
gpu_ready() {  # name budget: true if the GPU stages can run, else records the skip
    if [ "$have_gpu" != 1 ]; then skip "$1" "$2" "no CUDA device"; return 1; fi
    if [ "$built" != 1 ]; then skip "$1" "$2" "the build failed"; return 1; fi
}
gpu_ready sync 30 &&
    run_stage sync 30 json "$logs/sync.json" -- "$py" benchmarks/gpu_sync_check.py --json "$logs/sync.json"

sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
for tool in memcheck racecheck; do
    if gpu_ready "$tool" 55; then
        if [ -z "$sanitizer" ]; then skip "$tool" 55 "compute-sanitizer not found"; continue; fi
        # The caching allocator hands out slices of larger blocks, so an access past a tensor's
        # end lands in memory that is still allocated: memcheck sees it only without the cache.
        caching=()
        [ "$tool" = memcheck ] && caching=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1)
        run_stage "$tool" 55 sanitizer "" -- "${caching[@]}" "$sanitizer" --tool "$tool" --error-exitcode 9 \
            --print-limit 100 "$py" benchmarks/sanitizer_workload.py
    fi
done

if gpu_ready bench 80; then
    bench_end=$(( deadline + 80 < TOTAL - 10 ? deadline + 80 : TOTAL - 10 ))  # as run_stage will reckon it
    bench_limit=$(( bench_end - $(elapsed) ))
    run_stage bench 80 json "$logs/bench.json" -- \
        "$py" benchmarks/gpu_bench.py --json "$logs/bench.json" --budget $(( bench_limit - 10 ))
fi

gpu_ready nccl 15 && run_stage nccl 15 plain "" -- "$py" benchmarks/nccl_check.py

# --- the rest of the tests, in what time remains --------------------------------------------
if [ "${SKIP_REST:-0}" = 1 ]; then skip tests-rest 0 "SKIP_REST=1"
elif [ "$built" != 1 ]; then skip tests-rest 0 "the build failed"
else pytest_stage tests-rest 35 $(( cores / 2 > 1 ? cores / 2 : 1 )) 120 "not cuda and not simt"
fi

echo "gpu_check: done in $(elapsed)s of ${TOTAL}s; record: $OUT/gpu-check.json"
if [ "$have_gpu" = 1 ]; then  # where the check runs in a checkout that is kept, the record is at hand to commit
    stamp=$(date -u +%Y-%m-%d)
    mkdir -p benchmarks/results
    cp "$OUT/gpu-check.json" "benchmarks/results/gpu-$stamp.json" && cp "$OUT/gpu-check.md" "benchmarks/results/gpu-$stamp.md" &&
        echo "copied to benchmarks/results/gpu-$stamp.json and .md"
fi
cat "$OUT/gpu-check.md"
sleep 1  # lets tee write the last lines to console.log
