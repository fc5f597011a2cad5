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


def cpu_capability():
    """Which SIMD level's CPU kernels run in this process: "avx512", "avx2" or "default".

    One build holds the CPU kernels compiled for each level; the library picks, when it loads, the
    best one that the CPU supports and that ATen uses (so ATEN_CPU_CAPABILITY=avx2 lowers it too).
    LSTM_FUSED_CPU_CAPABILITY=avx512|avx2|default, set before the import, asks for a level; asking
    for one that the CPU lacks (or an unknown name) makes the import raise a RuntimeError that says
    what the CPU lacks, rather than running other kernels than the ones asked for."""
    return torch.ops.lstm_fused.cpu_capability()


# Chooses the level now, so that an unusable LSTM_FUSED_CPU_CAPABILITY fails the import.
cpu_capability()

__all__ = ["LSTM", "LSTMCell", "GRU", "GRUCell", "lstm_layer", "gru_layer", "cpu_capability"]
__version__ = "0.1.0"
