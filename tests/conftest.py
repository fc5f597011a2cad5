import pytest
import torch

import lstm_fused  # noqa: F401  (registers the ops)

CUDA_SKIP_REASON = "no CUDA device here: the CUDA kernels are compiled but only run where a GPU exists"

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
