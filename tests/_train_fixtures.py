"""Helpers for the training tests: small-run settings, the CLI in a subprocess, killing a process tree."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mnist_k8s.config import Settings

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data"
CLI = "import sys; from mnist_k8s.cli import main; sys.exit(main(sys.argv[1:]))"

# A small run on the shipped sample: a few seconds per epoch even on a busy 2-core machine.
SMALL = dict(epochs=1, batch_size=100, limit=600, test_limit=300, torch_threads=1)


def small_settings(model_dir: Path, **overrides) -> Settings:
    "Settings for a small training run on the sample, publishing to `model_dir`; no `.env`, no download."
    return Settings(_env_file=None, data_root=SAMPLE, model_dir=model_dir, download=False,
                    **{**SMALL, **overrides})


def cli_env(**settings) -> dict:
    "The environment for `mnist-k8s` in a subprocess: this one, plus `MNIST_K8S_*` for `settings`."
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_K8S_")}
    env.update({f"MNIST_K8S_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def cli(*args: str, env: dict, **kw) -> subprocess.Popen:
    "Start `mnist-k8s <args>` in its own session."
    return subprocess.Popen([sys.executable, "-c", CLI, *args], env=env, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def descendants(pid: int) -> list[int]:
    "Process ids of all descendants of `pid` (from /proc), children first."
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c); todo.append(c)
    return out


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL):
    "Send `sig` to `proc` and every process it started (the Jupyter kernel runs in a session of its own)."
    pids = descendants(proc.pid)
    for pid in [proc.pid, *pids]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() and _alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
