import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

GAMES = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "games"


@pytest.fixture(scope="session")
def games_dir() -> Path:
    if not (GAMES / "sequential_train.txt").is_file():
        pytest.skip(f"the Games dataset is not at {GAMES} (expected ../shared/datasets/games beside the project)")
    return GAMES
