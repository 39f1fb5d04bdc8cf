"""Shared pytest fixtures (the repository root, the MNIST sample shipped for tests, the model trained once per
session, a running server) and the tier markers. Plain helpers are in `helpers.py`.

Tiers: unmarked tests run in-process. `server` tests start real server processes (every test that uses the
`server` fixture is one), `browser` tests drive Chromium, `load` tests hold a server under sustained load,
`deploy` tests read the Dockerfiles and render the manifests. `slow` marks what takes more than a few seconds:
every `server`, `browser` and `load` test, every test that needs the trained model (its first use trains it),
and papermill runs. `pytest -m "not slow"` is the quick loop; CI runs everything."""
from pathlib import Path

import pytest

from helpers import ROOT, SAMPLE, serve_copy, trained_model_dir

# Tier of each module that does not declare its own with `pytestmark`.
MODULE_TIERS = {
    "test_server": ["server"], "test_hostile": ["server"], "test_security": ["server"],
    "test_faults": ["server"], "test_fuzz": ["server"],
    "test_browser": ["browser"], "test_load": ["load"],
    "test_k8s": ["deploy"], "test_docker": ["deploy"],
    "test_contract": ["deploy", "slow"],             # trains and serves as the two containers would
}
# Tests outside the server tiers that take more than a few seconds.
SLOW_TESTS = {"test_k8s.py::test_checkov_finds_nothing",                     # checkov, in a venv of its own
              "test_preprocess.py::test_huge_dimensions_refused_without_decoding"}
SLOW_TIERS = {"server", "browser", "load"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for tier in MODULE_TIERS.get(item.path.stem, []):
            item.add_marker(tier)
        fixtures = getattr(item, "fixturenames", ())
        if "server" in fixtures:
            item.add_marker("server")
        marks = {m.name for m in item.iter_markers()}
        name = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
        if marks & SLOW_TIERS or "trained" in fixtures or name in SLOW_TESTS:
            item.add_marker("slow")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def sample_root() -> Path:
    "Folder holding a small real-MNIST sample in torchvision's raw layout."
    assert (SAMPLE / "MNIST" / "raw").is_dir(), "tests/data/MNIST/raw is missing"
    return SAMPLE


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    "A model store holding one version trained on the sample, once per test session (`helpers.trained_model_dir`)."
    return trained_model_dir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    "`mnist-k8s serve` on a copy of the trained model in a store of its own, shared by one module's tests."
    with serve_copy(trained, tmp_path_factory.mktemp("models")) as s:
        yield s
