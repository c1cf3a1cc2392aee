"""Dataset loading: every supported layout yields one `RecDataset`."""

from core.data.dataset import RecDataset, compute_fingerprint
from core.data.errors import DataError
from core.data.load import detect_format, load_dataset

__all__ = ["RecDataset", "DataError", "compute_fingerprint", "detect_format", "load_dataset"]
