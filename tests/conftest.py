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


# --- the `cuda` marker: `pytest -m cuda` selects every test that runs a CUDA kernel (the GPU check
# runs these first). A test is one if a parameter of it is the CUDA device (the `device` fixture
# above, or a "device" parametrisation), or if it is marked `cuda` itself.
def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on a CUDA device (skipped where none is)")


def pytest_collection_modifyitems(items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(isinstance(value, str) and value.startswith("cuda") for value in params.values()):
            item.add_marker(pytest.mark.cuda)
