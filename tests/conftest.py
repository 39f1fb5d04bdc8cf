"""Shared pytest fixtures: the repository root and the small MNIST sample shipped for tests."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def sample_root() -> Path:
    "Folder holding a small real-MNIST sample in torchvision's raw layout."
    assert (SAMPLE / "MNIST" / "raw").is_dir(), "tests/data/MNIST/raw is missing"
    return SAMPLE
