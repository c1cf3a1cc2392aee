"""Which torch device a run uses."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> torch.device:
    """"auto": CUDA when present, else the CPU; "cuda" without a CUDA device is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    return torch.device(device)
