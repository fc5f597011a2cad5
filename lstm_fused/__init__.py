"""Fused LSTM and GRU kernels for PyTorch, with drop-in replacements for torch.nn.LSTM, LSTMCell,
GRU and GRUCell."""
import torch  # noqa: F401  (loads libtorch, which the extension links against)

try:
    from . import _C  # noqa: F401  (loading it registers the torch.ops.lstm_fused operators)
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "lstm_fused: the compiled extension lstm_fused._C could not be loaded "
        f"({error}). Build it with `pip install --no-build-isolation -e .` from the project root, "
        "with the same torch that you import here."
    ) from error

from .modules import GRU, LSTM, GRUCell, LSTMCell
from .ops import gru_layer, lstm_layer

__all__ = ["LSTM", "LSTMCell", "GRU", "GRUCell", "lstm_layer", "gru_layer"]
__version__ = "0.1.0"
