#!/usr/bin/env bash
# Runs the CPU tests once under each SIMD level of the CPU kernels (LSTM_FUSED_CPU_CAPABILITY),
# from the one build that PYTHONPATH or the installed package gives `import lstm_fused`. A level
# this CPU lacks is skipped, with the reason. With no GPU visible, so that only the CPU kernels run.
#
#   scripts/test_cpu_levels.sh                  # every level: avx512 avx2 default
#   LEVELS="avx2 default" scripts/test_cpu_levels.sh
#   scripts/test_cpu_levels.sh --skip-chosen    # not the level a plain import picks (CI: the
#                                               # whole suite has just run under that one)
#   scripts/test_cpu_levels.sh -k stationary    # other arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

LEVELS=${LEVELS:-"avx512 avx2 default"}
TESTS=(tests/test_cpu_paths.py tests/test_ops.py tests/test_modules.py tests/test_contract.py
       tests/test_directions.py tests/test_cpu_capability.py)
export CUDA_VISIBLE_DEVICES=""
unset LSTM_FUSED_CPU_CAPABILITY

chosen=""
if [ "${1:-}" = "--skip-chosen" ]; then
    shift
    chosen=$(python -c "import lstm_fused; print(lstm_fused.cpu_capability())" | tail -1)
fi

ran=() skipped=()
for level in $LEVELS; do
    if [ "$level" = "$chosen" ]; then
        echo "== CPU kernels $level: skipped: the level a plain import picks (--skip-chosen)"
        skipped+=("$level (--skip-chosen)")
        continue
    fi
    # The import itself says whether the CPU has the level: it fails with "this CPU lacks ..." when
    # not (csrc/cpu/cpu_dispatch.cpp). Any other failure is a failure.
    set +e
    probe=$(LSTM_FUSED_CPU_CAPABILITY=$level python -c "import lstm_fused; print(lstm_fused.cpu_capability())" 2>&1)
    status=$?
    set -e
    if [ $status -ne 0 ]; then
        if grep -q "this CPU lacks" <<<"$probe"; then
            reason=$(grep -o "this CPU lacks[^;]*" <<<"$probe" | head -1)
            echo "== CPU kernels $level: skipped: $reason"
            skipped+=("$level ($reason)")
            continue
        fi
        echo "$probe" >&2
        echo "== CPU kernels $level: importing lstm_fused failed" >&2
        exit 1
    fi
    if [ "$(tail -1 <<<"$probe")" != "$level" ]; then
        echo "== CPU kernels $level: asked for, but lstm_fused.cpu_capability() says $(tail -1 <<<"$probe")" >&2
        exit 1
    fi
    echo "== CPU kernels $level: $(python -c 'import lstm_fused; print(lstm_fused.__file__)')"
    LSTM_FUSED_CPU_CAPABILITY=$level python -m pytest -q -p no:cacheprovider "${TESTS[@]}" "$@"
    ran+=("$level")
done
echo "== CPU kernel levels tested: ${ran[*]:-none}; skipped: ${skipped[*]:-none}"
[ ${#ran[@]} -gt 0 ]
