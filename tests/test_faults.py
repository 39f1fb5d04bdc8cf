"""Faults while serving and while training: a damaged or vanished model store, corrupt new versions, SIGTERM
under load; a training run killed mid-epoch, a disk that fills up while a model is published.

What readiness reports (the "truth"):
- `/readyz` is **200** while a model is loaded in memory, because the process serves correct answers with it;
  taking the pod out of rotation for a storage hiccup would turn it into an outage. Its JSON says
  `"store": "ok"`, or `"store": "degraded"` with a `store_detail` when the volume cannot be read, `latest` is
  missing or unusable, the version `latest` names was refused, or the files of the served version are gone or
  changed (and the gauge `mnist_model_store_ok` drops to 0, for alerts). A server in this state keeps
  answering with its model, and picks up the next good version.
- `/readyz` is **503** (`no_model`) when nothing can be served: no model in memory, e.g. a server started while
  the only version is broken or the volume is unreadable; the detail says why.
- `/readyz` is **503** (`shutting_down`) once SIGTERM arrived.

The volume being unreadable is simulated four ways: moved away, the model dir a dangling symlink, `latest` a
directory, and real permissions: the tests run as root, whom `chmod` does not stop, so that server runs as root
*without* the capabilities that bypass file permissions (`setpriv --bounding-set -dac_override,-dac_read_search`).
The full disk is simulated with a `sitecustomize` module on `PYTHONPATH` that makes `os.fsync` fail with ENOSPC
for chosen files, in every Python process of the run (the CLI and the notebook's kernel alike): no root-only
mounts, no LD_PRELOAD."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from mnist_k8s import store
from helpers import (_alive, CLI, cli, cli_env, copy_version, descendants, free_port, http_request, kernel_tmpdir,
                     kill_tree, mnist_test_digits, need, raw_http, RELOAD, ROOT, SAMPLE, serve_copy, Server, server_for,
                     wait_for)

pytestmark = pytest.mark.timeout(400)
TICK = 10 * RELOAD + 5          # long enough for the server to notice a change in the store


def predict(server) -> dict:
    r = server.post("/predict", files={"file": ("d.png", mnist_test_digits(1)[0][0], "image/png")})
    assert r.status_code == 200, r.text
    return r.json()


def readiness(server) -> tuple[int, dict]:
    r = server.get("/readyz")
    return r.status_code, r.json()


def store_state(server) -> str | None:
    status, j = readiness(server)
    return j.get("store") if status == 200 else None


def failures(server) -> float:
    line = next((l for l in server.get("/metrics").text.splitlines() if l.startswith("mnist_model_reload_failures_total")), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


def assert_degraded_but_serving(server, version: str, mention: str | None = None):
    "Still answering with `version`; ready (200) with the store reported as degraded."
    wait_for(lambda: store_state(server) == "degraded", timeout=TICK)
    status, j = readiness(server)
    assert status == 200 and j["version"] == version and j["store"] == "degraded" and j["store_detail"], j
    if mention: assert mention in j["store_detail"], j
    assert predict(server)["version"] == version
    assert "\nmnist_model_store_ok 0.0" in server.get("/metrics").text        # and monitoring sees it too


def assert_nothing_to_serve(model_dir: Path, mention: str | None = None, **kw):
    "A server started on `model_dir` now has no model: 503 on /readyz and /predict, with the reason."
    with server_for(model_dir, **kw) as s:
        time.sleep(3 * RELOAD)
        status, j = readiness(s)
        assert status == 503 and j["error"] == "no_model" and j["detail"], j
        if mention: assert mention in j["detail"], j
        r = s.post("/predict", files={"file": ("d.png", mnist_test_digits(1)[0][0], "image/png")})
        assert r.status_code == 503 and r.json()["error"] == "no_model"


# ------------------------------------------------------------------ the served version damaged
@pytest.mark.parametrize("damage", ["deleted", "truncated", "metadata_emptied"])
def test_served_version_damaged_keeps_serving_and_says_so(trained, tmp_path, damage):
    models = tmp_path / "models"
    with serve_copy(trained, models) as s:
        v = s.version()
        assert readiness(s)[1]["store"] == "ok"
        folder = store.version_dir(models, v)
        if damage == "deleted": shutil.rmtree(folder)
        elif damage == "truncated":
            f = folder / store.MODEL_FILE
            f.write_bytes(f.read_bytes()[:1000])
        else: (folder / store.METADATA_FILE).write_text("")
        assert_degraded_but_serving(s, v, v)
        assert_nothing_to_serve(models, v)        # a restarted pod has nothing it can serve: not ready
        fixed = copy_version(trained, models)       # the next good version is picked up, and all is well again
        wait_for(lambda: s.version() == fixed, timeout=TICK)
        wait_for(lambda: store_state(s) == "ok", timeout=TICK)


# ------------------------------------------------------------------ corrupt new versions
def corrupt_versions(trained: Path, models: Path) -> dict[str, str]:
    "Publish (unpromoted) one version per kind of damage a bad training job or copy can leave; name -> version."
    state, meta = store.load_state(trained, store.latest_version(trained))
    meta = {k: x for k, x in meta.items() if k not in ("version", "sha256", "size", "model_file")}
    out = {}
    def stage(name, sd, md=meta):
        out[name] = v = store.new_version()
        store.stage_version(models, v, sd, md)
        return v
    def resign(v, data: bytes):
        "Replace model.pt and record its size and sha256, as a buggy publisher that signs whatever it wrote would."
        import hashlib
        store.version_file(models, v, store.MODEL_FILE).write_bytes(data)
        m = store.read_metadata(models, v)
        m.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
        store.version_file(models, v, store.METADATA_FILE).write_text(json.dumps(m))
    resign(stage("garbage_signed", state), os.urandom(4096))
    stage("other_architecture", {"weight": torch.zeros(3, 3)})
    stage("missing_tensor", {k: t for i, (k, t) in enumerate(state.items()) if i})
    stage("nan_weights", {k: torch.full_like(t, float("nan")) if t.is_floating_point() else t for k, t in state.items()})
    stage("wrong_shapes", {k: t.flatten() for k, t in state.items()})
    stage("arch_not_a_mapping", state, {**meta, "arch": "resnet152"})
    stage("arch_unknown_kwarg", state, {**meta, "arch": {"depth": 1000}})
    v = stage("metadata_not_json", state)
    store.version_file(models, v, store.METADATA_FILE).write_text("{not json")
    v = stage("model_file_missing", state)
    store.version_file(models, v, store.MODEL_FILE).unlink()
    v = stage("model_file_is_a_directory", state)
    f = store.version_file(models, v, store.MODEL_FILE)
    f.unlink(); f.mkdir()
    out["no_such_version"] = "20990101-000000-ffffff"
    return out


def test_corrupt_new_versions_are_refused_and_reported(trained, tmp_path):
    models = tmp_path / "models"
    with serve_copy(trained, models) as s:
        good = s.version()
        bad = corrupt_versions(trained, models)
        for i, (kind, v) in enumerate(bad.items(), 1):
            (models / store.LATEST).write_text(v + "\n")     # what a publisher that skips the checks would do
            wait_for(lambda: failures(s) >= i, timeout=TICK)
            status, j = readiness(s)
            assert status == 200 and j["version"] == good, (kind, j)
            assert j["store"] == "degraded" and v in j["store_detail"], (kind, j)
            assert predict(s)["version"] == good, kind
        assert failures(s) == len(bad)
        fixed = copy_version(trained, models)
        wait_for(lambda: s.version() == fixed, timeout=TICK)
        wait_for(lambda: store_state(s) == "ok", timeout=TICK)
        assert "Traceback" not in s.output(), s.output()


# ------------------------------------------------------------------ the volume unreadable
def _setpriv_available() -> bool:
    if os.geteuid() != 0 or not shutil.which("setpriv"): return False
    r = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "true"], capture_output=True)
    return r.returncode == 0


@pytest.mark.parametrize("how", ["moved_away", "dangling_symlink", "latest_is_a_directory", "permission_denied"])
def test_unreadable_volume(trained, tmp_path, how):
    real = tmp_path / "volume"
    models = real
    if how == "dangling_symlink":                     # the server is told a symlink to the real folder
        real.mkdir()
        models = tmp_path / "models"
        models.symlink_to(real)
    kw = {}
    if how == "permission_denied":
        if not _setpriv_available(): pytest.skip("needs root and setpriv to drop CAP_DAC_OVERRIDE")
        kw = {"wrap": ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]}
    s = serve_copy(trained, models, **kw)
    try:
        v = s.version()
        def break_it():
            if how == "moved_away": real.rename(tmp_path / "elsewhere")
            elif how == "dangling_symlink": models.unlink(); models.symlink_to(tmp_path / "no-such-volume")
            elif how == "latest_is_a_directory": (real / store.LATEST).unlink(); (real / store.LATEST).mkdir()
            else: real.chmod(0)
        def repair():
            if how == "moved_away": (tmp_path / "elsewhere").rename(real)
            elif how == "dangling_symlink": models.unlink(); models.symlink_to(real)
            elif how == "latest_is_a_directory": (real / store.LATEST).rmdir(); (real / store.LATEST).write_text(v + "\n")
            else: real.chmod(0o755)
        break_it()
        try:
            assert_degraded_but_serving(s, v)
            assert_nothing_to_serve(models, **kw)
        finally:
            repair()
        wait_for(lambda: store_state(s) == "ok", timeout=TICK)
        assert s.version() == v and predict(s)["version"] == v
        assert "\nmnist_model_store_ok 1.0" in s.get("/metrics").text
    finally:
        if real.exists(): real.chmod(0o755)
        s.stop()


# ------------------------------------------------------------------ SIGTERM under load
def test_sigterm_under_load_drains_and_refuses_cleanly(trained, tmp_path):
    """32 clients post digits in a loop, each request on a new connection; SIGTERM arrives mid-stream. Every
    request either gets its complete 200 answer (those in flight finish), or is refused before any byte of an
    answer (connection refused, reset or closed unanswered): never a partial answer, an error status or a hang.
    The process then exits 0 within its grace period (10 s here)."""
    grace = 10
    s = serve_copy(trained, tmp_path / "models", env={"MNIST_K8S_GRACEFUL_TIMEOUT": str(grace)})
    digits = [d for d, _ in mnist_test_digits(16)]
    results, stop = [], threading.Event()
    lock = threading.Lock()

    def client(i):
        n = 0
        while not stop.is_set():
            body = digits[(i + n) % len(digits)]; n += 1
            req = http_request("POST", "/predict", body, [("Content-Type", "image/png")])
            sent = time.monotonic()
            try:
                reply = raw_http(s.port, req, timeout=30)
                outcome = "ok" if reply.status == 200 and len(reply.json()["probabilities"]) == 10 else \
                          ("refused" if reply.status is None else f"status {reply.status}: {reply.body[:100]!r}")
            except ConnectionRefusedError:
                outcome = "refused"
            except (ValueError, TimeoutError, OSError) as e:
                outcome = f"broken: {e!r}"
            with lock: results.append((sent, time.monotonic(), outcome))
            if outcome == "refused": time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    try:
        for t in threads: t.start()
        wait_for(lambda: len(results) > 200, timeout=60)
        t_term = time.monotonic()
        s.terminate()
        s.proc.wait(grace + 10)
        took = time.monotonic() - t_term
        time.sleep(0.5)                                 # clients now see a closed port
    finally:
        stop.set()
        for t in threads: t.join(60)
        s.stop()
    outcomes = [o for _, _, o in results]
    bad = [o for o in outcomes if o not in ("ok", "refused")]
    in_flight = [r for r in results if r[0] < t_term < r[1] and r[2] == "ok"]
    refused_before = [r for r in results if r[1] < t_term and r[2] != "ok"]
    print(f"{outcomes.count('ok')} answered, {outcomes.count('refused')} refused, {len(in_flight)} in flight at "
          f"SIGTERM completed, exit {s.proc.returncode} after {took:.2f} s")
    assert not bad, bad[:5]
    assert not refused_before, refused_before[:5]      # nothing was refused before the signal
    assert in_flight, "no request was in flight when SIGTERM arrived"
    assert outcomes.count("refused") > 0                # after it, new requests were turned away
    assert s.proc.returncode == 0 and took < grace + 5, (s.proc.returncode, took)


# ------------------------------------------------------------------ signals: a terminal, `kill`, a pod
@contextmanager
def _launched(how: str, command: str, env: dict, ready: str, timeout: float):
    """`mnist-k8s <command>` as a terminal starts it (SIGINT at its default: a shell's background job would ignore
    it), in its own session, its output read into `proc.lines`; for "pid1", through `unshare` as the first process
    of a new PID namespace, as in a pod. Yields once a line holds `ready`; afterwards nothing of it is left."""
    cmd = [sys.executable, "-c", CLI, command]
    if how == "pid1": cmd = [need("unshare", "util-linux"), "--pid", "--fork", "--kill-child", *cmd]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.lines = lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any(ready in l for l in lines) or proc.poll() is not None, timeout, every=0.005)
        if how == "pid1" and proc.returncode is not None and "Operation not permitted" in "".join(lines):
            pytest.skip("this machine may not create PID namespaces (unshare needs CAP_SYS_ADMIN)")
        assert proc.poll() is None, "".join(lines)
        yield proc
    finally:
        if proc.poll() is None: kill_tree(proc)
        reader.join(10); proc.stdout.close()


# ------------------------------------------------------------------ a signal while the server starts
@pytest.mark.parametrize("how", ["ctrl_c", "kill", "pid1"])
def test_server_stopped_while_starting_exits_at_once(trained, how):
    """A signal while `mnist-k8s serve` builds its app (importing torch, loading the model), before gunicorn's
    arbiter has handlers of its own: Ctrl-C, `kill`, and Kubernetes deleting a pod that is still starting
    (SIGTERM to the container's PID 1, which Linux drops unless it is handled). Within seconds the server
    exits 0, says why, prints no traceback, and never starts listening."""
    env = cli_env(model_dir=trained, host="127.0.0.1", port=free_port(), workers=1, torch_threads=1)
    # `serve` logs where it will listen, then builds the app: a second or more, on any machine
    with _launched(how, "serve", env, "serving on http", 60) as proc:
        if how == "ctrl_c": os.killpg(proc.pid, signal.SIGINT)
        else: os.kill(descendants(proc.pid)[0] if how == "pid1" else proc.pid, signal.SIGTERM)
        try: proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 15 s after the signal ({how}):\n{''.join(proc.lines)}")
    out, name = "".join(proc.lines), "SIGINT" if how == "ctrl_c" else "SIGTERM"
    assert proc.returncode == 0, out
    assert f"stopped by {name} while starting" in out, out
    assert "Traceback" not in out and "listening on" not in out, out


# ------------------------------------------------------------------ training: killed mid-epoch
def test_training_killed_mid_epoch_resumes_to_the_same_model(tmp_path):
    """`mnist-k8s train` SIGKILLed (with its notebook kernel) halfway through epoch 2 of 3, then run again: it
    resumes from the epoch-1 checkpoint and publishes a model identical, tensor for tensor, to an uninterrupted
    run of the same parameters (training is deterministic on one thread), with the same test accuracy."""
    params = dict(epochs=3, batch_size=100, limit=1000, test_limit=500, torch_threads=1, download="false",
                  data_root=SAMPLE)
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    reference = cli("train", env=cli_env(**params, model_dir=whole))  # the uninterrupted run, alongside

    with kernel_tmpdir() as tmp:                     # (the SIGKILL leaves the kernel's sockets there)
        proc = cli("train", env={**cli_env(**params, model_dir=killed), "TMPDIR": str(tmp)})
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        try:
            wait_for(lambda: any("epoch 1/3" in l for l in lines) or proc.poll() is not None, timeout=300)
            assert proc.poll() is None, "".join(lines)
            epoch_s = float(next(l for l in lines if "epoch 1/3" in l).rsplit("(", 1)[1].split()[0])
            time.sleep(epoch_s / 2)                      # halfway through epoch 2
        finally:
            kill_tree(proc)
    ckpts = list((killed / "checkpoints").glob("*.pt"))
    assert len(ckpts) == 1 and store.latest_version(killed) is None
    done = torch.load(ckpts[0], weights_only=True)["epoch"]
    assert done in (1, 2), done                      # killed after epoch `done`'s checkpoint, before the end

    again = cli("train", env=cli_env(**params, model_dir=killed))
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    assert f"{done} of 3 epochs done" in out, out
    ref_out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, ref_out

    sa, ma = store.load_state(killed, store.latest_version(killed))
    sb, mb = store.load_state(whole, store.latest_version(whole))
    assert ma["resumed_from_epoch"] == done and mb["resumed_from_epoch"] == 0
    assert [h["epoch"] for h in ma["history"]] == [1, 2, 3]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), "resumed model differs"
    assert ma["test_accuracy"] == mb["test_accuracy"] and ma["confusion_matrix"] == mb["confusion_matrix"]


# ------------------------------------------------------------------ training: stopped by a signal
def _train_until_first_epoch(how: str, model_dir: Path, tmp: Path):
    "`mnist-k8s train` of 50 small epochs, launched as `how` says with its own TMPDIR, once its first epoch is done."
    env = {**cli_env(epochs=50, batch_size=32, limit=1200, test_limit=300, torch_threads=1, download="false",
                     data_root=SAMPLE, model_dir=model_dir), "TMPDIR": str(tmp)}
    return _launched(how, "train", env, "epoch 1/50", 300)


@pytest.mark.parametrize("how", ["ctrl_c", "kill", "pid1"])
def test_training_stopped_by_a_signal_says_so_and_cleans_up(tmp_path, how):
    """Ctrl-C in a terminal (SIGINT to the process group), `kill` (SIGTERM), and Kubernetes stopping the Job's
    pod (SIGTERM to the container's PID 1, which Linux delivers only to a process that handles it): within
    seconds `mnist-k8s train` exits 130 or 143 without a traceback, saying what it kept and how to resume. The
    notebook's kernel is gone, its socket folder removed, `latest` unchanged, the epoch-1 checkpoint kept."""
    models = tmp_path / "models"
    with kernel_tmpdir() as tmp, _train_until_first_epoch(how, models, tmp) as proc:
        target = descendants(proc.pid)[0] if how == "pid1" else proc.pid   # unshare's child: PID 1 in there
        family = [target, *descendants(target)]                            # the CLI and the notebook's kernel
        assert len(family) >= 2, family
        start = time.monotonic()
        if how == "ctrl_c": os.killpg(proc.pid, signal.SIGINT)
        else: os.kill(target, signal.SIGTERM)
        try: proc.wait(timeout=20)
        except subprocess.TimeoutExpired: pytest.fail(f"still training 20 s after the signal ({how})")
        took, out = time.monotonic() - start, "".join(proc.lines)
        name, code = ("SIGINT", 130) if how == "ctrl_c" else ("SIGTERM", 143)
        assert proc.returncode == code, (proc.returncode, out[-3000:])
        assert f"mnist-k8s train: stopped by {name} while the training notebook ran" in out, out[-3000:]
        assert "the same command resumes from there" in out and "Traceback" not in out, out[-3000:]
        assert took < 15, took
        wait_for(lambda: not any(_alive(p) for p in family), timeout=10)
        assert not list(tmp.glob("mnist-k8s-kernel-*")), list(tmp.iterdir())
        assert store.latest_version(models) is None
        assert torch.load(next((models / "checkpoints").glob("*.pt")), weights_only=True)["epoch"] >= 1
        assert len(list((models / "runs").glob("*/report.ipynb"))) == 1    # the partial report


# ------------------------------------------------------------------ training: the disk fills up
SITECUSTOMIZE = '''
import errno, os, re
_pattern = os.environ.get("MNIST_K8S_TEST_ENOSPC")
if _pattern:
    _real_fsync = os.fsync
    def fsync(fd):
        try: target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError: target = ""
        if re.search(_pattern, target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), target)
        return _real_fsync(fd)
    os.fsync = fsync
'''


def previous_version_with_report(models: Path) -> tuple[str, dict[str, bytes]]:
    "A published version with its report; all files of the store as bytes, to compare afterwards."
    from mnist_k8s.model import build_model
    torch.manual_seed(0)
    net = build_model()
    v = store.publish(models, net.state_dict(), {"arch": net.arch, "test_accuracy": 0.5}, promote=False)
    store.add_file(models, v, store.REPORT_FILE, json.dumps({"cells": [], "note": "the previous report"}))
    store.add_file(models, v, store.REPORT_HTML, "<html><body>the previous report</body></html>")
    store.promote(models, v)
    return v, snapshot(models)


def snapshot(models: Path) -> dict[str, bytes]:
    return {str(p.relative_to(models)): p.read_bytes() for p in sorted(models.rglob("*"))
            if p.is_file() and "checkpoints" not in p.parts and "runs" not in p.parts}


@pytest.mark.parametrize("where", ["model_file_in_notebook", "latest_pointer"])
def test_full_disk_while_publishing_keeps_previous_model_and_report(tmp_path, where):
    """The disk fills up (fsync fails with ENOSPC) while the notebook's kernel writes the new model.pt, or
    while the pipeline switches `latest`: `mnist-k8s train` exits 1 with a message naming the cause, and the
    store is exactly as before (the previous `latest`, its model and its report), with no half-written
    version or temporary file left behind."""
    models = tmp_path / "models"
    old, before = previous_version_with_report(models)
    (inject := tmp_path / "inject").mkdir()
    (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
    pattern = {"model_file_in_notebook": r"/versions/\.tmp-[^/]+/model\.pt$",
               "latest_pointer": r"/\.latest\.[^/]*\.tmp$"}[where]
    env = cli_env(epochs=1, batch_size=100, limit=300, test_limit=100, torch_threads=1, download="false",
                  data_root=SAMPLE, model_dir=models)
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(inject), env.get("PYTHONPATH")])),
               MNIST_K8S_TEST_ENOSPC=pattern)
    proc = cli("train", env=env)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out
    assert "No space left on device" in out and "`latest` is unchanged" in out, out
    assert store.latest_version(models) == old
    assert snapshot(models) == before                # byte for byte: nothing added, nothing changed
    leftovers = [p.name for p in (models / store.VERSIONS).iterdir() if p.name != old]
    assert leftovers == [] and not list(models.glob(".latest.*")), leftovers
    state, meta = store.load_state(models, old)     # still loads, checksum and all
    assert meta["version"] == old
