#!/usr/bin/env bash
# Installs torch, the build and test tools, and builds lstm_fused in place (editable).
# The CUDA sources are compiled whenever a CUDA toolkit matching torch is found (see setup.py);
# LSTM_FUSED_CPU_ONLY=1 skips them.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet --disable-pip-version-check "torch==2.14.1" ninja
python -m pip install --quiet --disable-pip-version-check \
    pytest pytest-benchmark hypothesis numpy expecttest onnx onnxscript onnxruntime matplotlib tqdm scikit-learn

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
fi
# One architecture keeps the build short where no GPU is visible (CI); setup.py picks a default
# list otherwise.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
python -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
python -c "import lstm_fused, torch; print('lstm_fused built; CUDA kernels registered:', torch._C._dispatch_has_kernel_for_dispatch_key('lstm_fused::lstm_layer_forward', 'CUDA'))"
