"""Data, model and training on the shipped MNIST sample (small and quick; the full run is `bench/train.py`)."""
from __future__ import annotations

import json
import socket

import pytest
import torch
import torchvision

from mnist_k8s import store
from mnist_k8s.data import Batches, load_mnist
from mnist_k8s.model import build_model
from mnist_k8s.train import evaluate, publish_model, train_model

TINY = dict(widths=[8, 16, 32])


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k): raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_sample_loads_offline_with_download(sample_root, no_network):
    "torchvision finds the raw sample files, so `download=True` neither downloads nor writes anything."
    before = sorted(p.relative_to(sample_root) for p in sample_root.rglob("*"))
    train = torchvision.datasets.MNIST(sample_root, train=True, download=True)
    test = torchvision.datasets.MNIST(sample_root, train=False, download=True)
    assert (len(train), len(test)) == (4000, 1000)
    assert sorted(p.relative_to(sample_root) for p in sample_root.rglob("*")) == before
    assert sum(p.stat().st_size for p in sample_root.rglob("*") if p.is_file()) < 5_000_000


def test_load_subset_and_batches(sample_root):
    digits = load_mnist(sample_root, train=True, limit=1000, seed=3)
    assert len(digits) == 1000 and torch.bincount(digits.labels).tolist() == [100] * 10
    xs, ys = zip(*Batches(digits, 128, seed=0, augment=True))
    assert [len(y) for y in ys] == [128] * 7 + [104]
    x = torch.cat(xs)
    assert x.shape == (1000, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


@pytest.mark.parametrize("n", [1, 5])
def test_model_shapes_and_rebuild(n):
    torch.manual_seed(0)
    net = build_model().eval()
    x = torch.rand(n, 1, 28, 28)
    with torch.inference_mode():
        out = net(x)
        assert out.shape == (n, 10) and torch.isfinite(out).all()
        again = build_model(**json.loads(json.dumps(net.arch)))
        again.load_state_dict(net.state_dict())
        assert torch.equal(again.eval()(x), out)


def test_tiny_training_learns(sample_root, tmp_path):
    "Two epochs of a tiny net on 1000 digits: from chance to 89-94% test accuracy (seeds 0-7); below 85% is a bug."
    torch.manual_seed(0)
    before = evaluate(build_model(**TINY), load_mnist(sample_root, train=False, limit=500)).accuracy
    res = train_model(sample_root, tmp_path, epochs=2, batch_size=50, lr=1e-2, limit=1000, test_limit=500,
                      arch=TINY, threads=1, progress=False)
    assert before < 0.3 and res.evaluation.accuracy >= 0.85, (before, res.history)
    assert res.history[1]["loss"] < 0.7 * res.history[0]["loss"], res.history     # about halves with every seed
    assert res.checkpoint.is_file()
    m = res.metadata
    assert m["dataset"] == dict(train_size=1000, test_size=500)
    assert len(m["confusion_matrix"]) == 10 and sum(map(sum, m["confusion_matrix"])) == 500
    assert sum(m["confusion_matrix"][d][d] for d in range(10)) == round(500 * m["test_accuracy"])
    assert len(m["misclassified"]) == round(500 * (1 - m["test_accuracy"]))
    assert set(m["libraries"]) >= {"torch", "torchvision", "python", "mnist_k8s"}
    version = publish_model(tmp_path, res)
    assert store.latest_version(tmp_path) == version and not res.checkpoint.exists()
    state, meta = store.load_state(tmp_path, version)
    assert meta["test_accuracy"] == res.evaluation.accuracy and meta["sha256"]


def test_same_parameters_resume_the_same_checkpoint(sample_root, tmp_path):
    "A finished, unpublished run with the same parameters is picked up from its checkpoint, not retrained."
    kw = dict(epochs=1, batch_size=100, lr=1e-2, limit=300, test_limit=100, arch=TINY, threads=1, progress=False)
    first = train_model(sample_root, tmp_path, **kw)
    logs = []
    again = train_model(sample_root, tmp_path, log=logs.append, **kw)
    assert any("1 of 1 epochs done" in line for line in logs), logs
    assert again.metadata["resumed_from_epoch"] == 1
    for k, v in first.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k])
    other = train_model(sample_root, tmp_path, **{**kw, "lr": 2e-2})   # different parameters: a new run
    assert other.checkpoint != first.checkpoint and other.metadata["resumed_from_epoch"] == 0
