"""Fused LSTM kernels for PyTorch, with drop-in replacements for torch.nn.LSTM."""
try:
    from . import _C  # noqa: F401  (loading it registers the torch.ops.lstm_fused operators)
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "lstm_fused: the compiled extension lstm_fused._C could not be loaded "
        f"({error}). Build it with `pip install --no-build-isolation -e .` from the project root, "
        "with the same torch that you import here."
    ) from error

from .modules import LSTM, LSTMCell
from .ops import lstm_layer

__all__ = ["LSTM", "LSTMCell", "lstm_layer"]
__version__ = "0.1.0"
