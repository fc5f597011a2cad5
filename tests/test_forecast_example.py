"""The forecasting example, run briefly on a slice of its data."""
import importlib.util
import os

import numpy as np
import pytest

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "forecast.py")


@pytest.fixture(scope="module")
def forecast():
    pytest.importorskip("matplotlib", reason="the example's plots need matplotlib ([examples] extra)")
    pytest.importorskip("sklearn", reason="the example's scaler needs scikit-learn ([examples] extra)")
    pytest.importorskip("tqdm", reason="the example's progress bar needs tqdm ([examples] extra)")
    spec = importlib.util.spec_from_file_location("forecast_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_runs_and_writes_its_outputs(forecast, tmp_path):
    out = tmp_path / "out"
    result = forecast.main(["--epochs", "2", "--limit", "700", "--seq-len", "12", "--out", str(out)])
    runs = {r.name: r for r in result["results"]}
    assert set(runs) == {"LSTM fused", "LSTM torch", "GRU fused", "GRU torch"}
    for path in result["plots"]:
        assert os.path.getsize(path) > 10_000, f"{path} should be a real PNG"
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert "naive last value" in table and "LSTM fused" in table and "GRU torch" in table
    for run in runs.values():
        assert run.losses[-1] < run.losses[0], f"{run.name}: the training loss must fall"
        assert np.isfinite(run.test_rmse)
    assert np.isfinite(result["naive_rmse"])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_fused_and_torch_follow_the_same_loss_curve(forecast, tmp_path, cell):
    """Same seed, same initial weights, same batches: the same function, so the same curve."""
    args = ["--epochs", "3", "--limit", "500", "--seq-len", "10", "--cell", cell, "--out", str(tmp_path)]
    runs = forecast.main(args)["results"]
    fused, torch_nn = runs
    assert "fused" in fused.name and "torch" in torch_nn.name
    np.testing.assert_allclose(fused.losses, torch_nn.losses, rtol=1e-4)
    np.testing.assert_allclose(fused.predictions, torch_nn.predictions, rtol=1e-4, atol=1e-3)
