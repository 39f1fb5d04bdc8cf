"""`mnist-k8s train` end to end: papermill run, report, publishing, failures, a killed run that resumes."""
from __future__ import annotations

import errno
import json
import re
import threading
import time

import pytest
import torch

from mnist_k8s import store
from mnist_k8s.model import build_model
from mnist_k8s.pipeline import TrainingFailed, run_training

from helpers import cli, cli_env, kernel_tmpdir, kill_tree, SAMPLE, SMALL, SMALL_MIN_ACCURACY, small_settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]   # each test runs the training notebook


def publish_previous(model_dir) -> str:
    "A complete earlier version as `latest`, to check that failures leave it alone."
    torch.manual_seed(0)
    net = build_model()
    return store.publish(model_dir, net.state_dict(), {"arch": net.arch, "test_accuracy": 0.5})


def assert_intact(model_dir, version):
    assert store.latest_version(model_dir) == version
    state, meta = store.load_state(model_dir, version)   # sha256-verified
    build_model(**meta["arch"]).load_state_dict(state)


def test_train_publishes_model_and_report_atomically(tmp_path):
    models = tmp_path / "models"
    old = publish_previous(models)
    seen, problems, stop = set(), [], threading.Event()

    def reader():  # what a serving process sees while training publishes
        while not stop.is_set():
            try:
                v = store.latest_version(models)
                state, meta = store.load_state(models, v)
                if v != old:
                    assert store.version_file(models, v, "report.html").is_file(), "latest before its report"
                    assert store.version_file(models, v, "report.ipynb").is_file()
                seen.add(v)
                for w in store.list_versions(models):
                    store.read_metadata(models, w)
            except Exception as e:  # noqa: BLE001 - collected and reported below
                problems.append(repr(e))
            time.sleep(0.002)

    t = threading.Thread(target=reader)
    t.start()
    try:
        res = run_training(small_settings(models), log_output=False)
    finally:
        stop.set(); t.join()
    assert problems == []
    assert old in seen and seen <= {old, res.version}    # the reader did read, and saw only complete versions
    assert store.latest_version(models) == res.version
    folder = store.version_dir(models, res.version)
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.json", "model.pt", "report.html", "report.ipynb"]
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["version"] == res.version
    assert meta["dataset"] == {"train_size": SMALL["limit"], "test_size": SMALL["test_limit"]}
    assert SMALL_MIN_ACCURACY <= meta["test_accuracy"] <= 1 and len(meta["history"]) == 1
    assert meta["params"]["epochs"] == 1 and meta["sha256"] and meta["created_at"]
    report = json.loads((folder / "report.ipynb").read_text())
    outputs = [o for c in report["cells"] for o in c.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # curves, confusion matrix, mistakes
    assert any(f"staged version {res.version}" in "".join(o.get("text", "")) for o in outputs)
    html = (folder / "report.html").read_text()
    assert "<script" not in html.lower() and "data:image/png;base64," in html
    assert not re.search(r"""src=["']?(https?:)?//""", html)             # nothing loaded from elsewhere
    assert not re.search(r"""<link[^>]*href=["']?(https?:)?//""", html)
    assert not (models / "runs" / res.version).exists()               # the run folder is cleaned up
    assert list((models / "checkpoints").iterdir()) == []               # and so is the checkpoint
    assert_intact(models, res.version)


def test_failing_notebook_keeps_latest_and_report(tmp_path):
    "Training data missing and download disabled: a clear error, exit code 1, `latest` untouched."
    models, empty = tmp_path / "models", tmp_path / "empty"
    empty.mkdir()
    old = publish_previous(models)
    proc = cli("train", "--data-root", str(empty), "--model-dir", str(models),
               env=cli_env(download="false", epochs=1, limit=100, torch_threads=1))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    assert "RuntimeError: Dataset not found" in out, out
    assert_intact(models, old)
    assert store.list_versions(models) == [old]
    (run,) = (models / "runs").iterdir()
    partial = json.loads((run / "report.ipynb").read_text())
    errors = [o for c in partial["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors and errors[0]["ename"] == "RuntimeError"
    assert str(run / "report.ipynb") in out


def test_full_disk_while_publishing_keeps_latest(tmp_path, monkeypatch):
    "The disk fills up while the report is stored: the previous version stays `latest`, nothing half-published."
    models = tmp_path / "models"
    old = publish_previous(models)
    real_write = store.atomic_write

    def full_disk(path, data):
        if str(path).endswith("report.html"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(store, "atomic_write", full_disk)
    with pytest.raises(TrainingFailed, match="No space left on device") as err:
        run_training(small_settings(models), log_output=False)
    assert_intact(models, old)
    assert store.list_versions(models) == [old]
    assert err.value.report.is_file()       # the executed notebook is kept in runs/<version>/


def test_killed_run_resumes_from_checkpoint(tmp_path):
    "SIGKILL (the whole process tree) after the first checkpoint; the same command resumes and publishes."
    models = tmp_path / "models"
    settings = dict(epochs=5, batch_size=100, limit=1000, test_limit=200, torch_threads=1, download="false",
                    data_root=SAMPLE, model_dir=models)
    ckpts = models / "checkpoints"
    with kernel_tmpdir() as tmp:                         # (the SIGKILL leaves the kernel's sockets there)
        proc = cli("train", env={**cli_env(**settings), "TMPDIR": str(tmp)})
        try:
            deadline = time.monotonic() + 300
            while not (ckpts.is_dir() and any(ckpts.glob("*.pt"))):
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "no checkpoint within 300 s"
                time.sleep(0.01)
        finally:
            kill_tree(proc)
    (ckpt,) = ckpts.glob("*.pt")
    done = torch.load(ckpt, weights_only=True)["epoch"]
    assert 1 <= done < 5, f"the run was not interrupted mid-training ({done} epochs done)"
    assert store.latest_version(models) is None

    res = run_training(small_settings(models, epochs=5, batch_size=100, limit=1000, test_limit=200),
                       log_output=False)
    meta = res.metadata
    assert meta["resumed_from_epoch"] == done                          # the checkpoint found after the kill
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3, 4, 5]
    assert store.latest_version(models) == res.version
    assert not ckpt.exists()
    report = json.loads(res.notebook.read_text())
    printed = "".join("".join(o.get("text", "")) for c in report["cells"] for o in c.get("outputs", []))
    assert f"resuming from checkpoint {ckpt}: {meta['resumed_from_epoch']} of 5 epochs done" in printed
