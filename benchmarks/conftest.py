import pytest
import torch

import lstm_fused  # noqa: F401

CUDA_SKIP_REASON = "no CUDA device here: GPU benchmarks run in benchmarks/gpu_check.sh on a GPU machine"
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)),
]
