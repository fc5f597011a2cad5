#!/usr/bin/env bash
# Build the extension (CPU only) against another torch release and run the tests with it, in a
# copy of the tree, so that the build here (against the torch scripts/install.sh installs) is
# untouched. The release lives in a virtual environment made once and kept between runs:
# ${LSTM_FUSED_CACHE:-~/.cache/lstm_fused}/venv-<version>, with pyproject.toml's dev extras.
#
#   scripts/torch_release_check.sh [torch version] [pytest arguments...]   # default 2.15.0, tests/
#
# Size (measured 2026-12-01 on the 2-core CI machine, for 2.15.0): PyPI's torch wheel (539 MB)
# needs its CUDA 13.2 libraries to import at all (libtorch_cuda.so links cuDNN, cuBLAS, NCCL, ...),
# even on a machine without a GPU, and PyPI has no CPU-only torch for Linux (the PyTorch index
# that has one is not reachable from here): the first run downloads 2.8 GB (77 s) and the venv
# takes 5.4 GB (made in 321 s); later runs reuse it. The build in the kept copy: 662 s from
# scratch (MAX_JOBS=1, other builds running beside it), 4 s when no source changed; the tests
# on 2.15.0: 281 s (970 passed, 140 skipped: the CUDA cases).
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-2.15.0}
shift || true
cache=${LSTM_FUSED_CACHE:-$HOME/.cache/lstm_fused}
venv=$cache/venv-$version
py=${PYTHON:-python}
command -v "$py" >/dev/null || py=python3
# The test tools and the example's packages, as pyproject.toml's extras name them.
extras=$("$py" - <<'PY'
import tomllib
extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
print(" ".join(extras["dev"] + extras.get("examples", [])))
PY
)
wanted="torch==$version $extras ninja wheel setuptools"

# /etc/xdg/pip may cap torch at the release installed on this machine: these installs ignore it.
if [ ! -x "$venv/bin/python" ] || [ "$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null)" != "$version" ]; then
    rm -rf "$venv"
    t0=$(date +%s)
    "$py" -m venv "$venv"
    PIP_CONFIG_FILE=/dev/null "$venv/bin/python" -m pip install -q $wanted
    echo "$wanted" > "$venv/lstm_fused-deps"
    echo "torch_release_check: made $venv in $(( $(date +%s) - t0 ))s ($(du -sh "$venv" | cut -f1))"
elif [ "$(cat "$venv/lstm_fused-deps" 2>/dev/null)" != "$wanted" ]; then  # the dev extras changed
    PIP_CONFIG_FILE=/dev/null "$venv/bin/python" -m pip install -q $wanted
    echo "$wanted" > "$venv/lstm_fused-deps"
fi

# The copy is kept beside the venv with its build/ folder, so that ninja recompiles only what
# changed since the last run: the tracked files are replaced with their own times (tar keeps
# them), everything else but build/ is removed (a deleted source must not stay in the build).
copy=$cache/tree-$version
mkdir -p "$copy"
find "$copy" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
git ls-files -z | xargs -0 tar -cf - | tar -xf - -C "$copy"
t0=$(date +%s)
(cd "$copy" && LSTM_FUSED_CPU_ONLY=1 MAX_JOBS=${MAX_JOBS:-2} "$venv/bin/python" setup.py -q build_ext --inplace \
    > build.log 2>&1 || { tail -40 build.log; exit 1; })
echo "torch_release_check: built against torch $version in $(( $(date +%s) - t0 ))s"
cd "$copy"
export PYTHONPATH="$copy" CUDA_VISIBLE_DEVICES=""
"$venv/bin/python" -c "import lstm_fused, sys, torch; assert lstm_fused.__file__.startswith(sys.argv[1]), lstm_fused.__file__;
print('torch_release_check: lstm_fused from', sys.argv[1], 'on torch', torch.__version__)" "$copy"
t0=$(date +%s)
status=0
"$venv/bin/python" -m pytest -q -p no:cacheprovider "${@:-tests}" || status=$?
echo "torch_release_check: tests on torch $version took $(( $(date +%s) - t0 ))s (exit status $status)"
exit "$status"
