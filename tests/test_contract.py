"""What the containers would run, run as local processes: the training Job's and the inference
Deployment's command, arguments and environment, taken from the rendered local overlay (plus the image's
ENV from its Dockerfile), with a temporary folder standing in for every mounted volume.

The story is the one a cluster sees on first deploy: the serving pod starts on an empty volume and stays
unready; the Job trains (on the small MNIST sample, with tiny parameters) and publishes a model version;
the serving pod loads it by itself, turns ready, predicts, and shuts down gracefully on SIGTERM."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _serve_fixtures import free_port
from _deploy_fixtures import (DOCKERFILES, ROOT, console_script, copy_args, downward_cpu, find, pod_spec,
                              rendered, skaffold, stages)

# Tiny training run: enough to publish a real model, quick enough for CI.
TRAIN_OVERRIDES = {"MNIST_K8S_EPOCHS": "1", "MNIST_K8S_LIMIT": "512", "MNIST_K8S_TEST_LIMIT": "256",
                   "MNIST_K8S_DOWNLOAD": "false"}  # the sample is on disk; tests stay off the network
HOST_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "SYSTEMROOT")
TRAIN_TIMEOUT = 900


class Pod:
    "One workload's container, translated to a local process: paths inside it map to local folders."

    def __init__(self, obj: dict, volume_dirs: dict[str, Path], scratch: Path):
        self.obj, self.spec = obj, pod_spec(obj)
        (self.c,) = self.spec["containers"]
        name = obj["metadata"]["name"]
        vols = {v["name"]: v for v in self.spec.get("volumes", [])}
        self.paths: dict[str, Path] = {}
        for m in self.c.get("volumeMounts", []):
            v = vols[m["name"]]
            if "persistentVolumeClaim" in v:   # the same claim is the same folder for every pod
                local = volume_dirs.setdefault(v["persistentVolumeClaim"]["claimName"], scratch / "volume")
            else:                               # emptyDir: private to this pod
                local = scratch / f"{name}-{m['name']}"
            local.mkdir(parents=True, exist_ok=True)
            self.paths[m["mountPath"]] = local
        final = stages(self.dockerfile())[-1]
        for i in final.all("COPY"):            # files baked into the image come from the checkout
            flags, srcs, dest = copy_args(i)
            if "from" not in flags and len(srcs) == 1: self.paths.setdefault(dest, ROOT / srcs[0])
        self.workdir = scratch / f"{name}-workdir"  # the image's WORKDIR, empty (no stray .env is read)
        self.workdir.mkdir()
        self.image_env = final.env()

    def dockerfile(self) -> Path:
        art = next(a for a in skaffold()["build"]["artifacts"] if a["image"] == self.c["image"])
        return ROOT / art["docker"]["dockerfile"]

    def local(self, value: str) -> str:
        "A container path (or any value) with the mount points replaced by their local folders."
        for inside in sorted(self.paths, key=len, reverse=True):
            if value == inside or value.startswith(inside.rstrip("/") + "/"):
                return str(self.paths[inside]) + value[len(inside):]
        return value

    def env(self, overrides: dict[str, str]) -> dict[str, str]:
        env = {k: os.environ[k] for k in HOST_ENV if k in os.environ}
        for k, v in self.image_env.items():
            if k not in ("PATH", "VIRTUAL_ENV"): env[k] = self.local(v)
        for e in self.c.get("env", []):
            ref = e.get("valueFrom", {}).get("resourceFieldRef")
            if ref:  # the downward API: the CPU limit, rounded up
                env[e["name"]] = str(downward_cpu(self.c["resources"]["limits"][ref["resource"].split(".")[1]],
                                                  ref.get("divisor", "1")))
            else: env[e["name"]] = self.local(e["value"])
        if not shutil.which(console_script()): env["PYTHONPATH"] = str(ROOT)  # see argv()
        return {**env, **overrides}

    def argv(self) -> list[str]:
        "The container's command line; its first word is the console script settings.ini declares."
        argv = [*self.c["command"], *self.c.get("args", [])]
        assert argv[0] == console_script()
        exe = shutil.which(argv[0])
        if exe: return [exe, *argv[1:]]
        # not pip-installed here: call the console script's entry point (mnist_k8s.cli:main) the same way
        return [sys.executable, "-c", "import sys; from mnist_k8s.cli import main; sys.exit(main())", *argv[1:]]

    def probe(self, kind: str) -> tuple[str, dict]:
        p = self.c[kind]
        port = p["httpGet"]["port"]
        if isinstance(port, str): port = next(x["containerPort"] for x in self.c["ports"] if x["name"] == port)
        return p["httpGet"]["path"], {"port": port, **p}


def digit_png(sample: Path) -> bytes:
    "The first test digit of the sample as a PNG (white ink on black, as MNIST stores it)."
    from PIL import Image
    raw = (sample / "MNIST" / "raw" / "t10k-images-idx3-ubyte").read_bytes()
    _, _, rows, cols = struct.unpack(">IIII", raw[:16])
    img = Image.frombytes("L", (cols, rows), raw[16:16 + rows * cols])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def wait_for(check, seconds: float, what: str, log: Path, proc: subprocess.Popen):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (result := check()) is not None: return result
        if proc.poll() is not None: pytest.fail(f"{what}: the server exited ({proc.returncode})\n{tail(log)}")
        time.sleep(0.25)
    pytest.fail(f"{what} within {seconds:g} s\n--- log ---\n{tail(log)}")


def test_job_and_deployment_run_as_their_containers_would(tmp_path, sample_root):
    import httpx
    objs = rendered("local")
    volumes: dict[str, Path] = {}
    train = Pod(find(objs, "Job"), volumes, tmp_path)
    infer = Pod(find(objs, "Deployment"), volumes, tmp_path)
    assert len(volumes) == 1, volumes  # one claim, shared by the Job and the Deployment

    port = free_port()
    server_env = infer.env({"MNIST_K8S_HOST": "127.0.0.1", "MNIST_K8S_PORT": str(port)})
    train_env = train.env(TRAIN_OVERRIDES)
    model_dir = Path(train_env["MNIST_K8S_MODEL_DIR"])
    assert Path(server_env["MNIST_K8S_MODEL_DIR"]) == model_dir and str(model_dir).startswith(str(tmp_path))
    data_root = Path(train_env["MNIST_K8S_DATA_ROOT"])
    shutil.copytree(sample_root / "MNIST", data_root / "MNIST")
    assert Path(train_env["MNIST_K8S_TRAIN_NOTEBOOK"]) == ROOT / "nbs" / "train.ipynb"

    url = lambda path: f"http://127.0.0.1:{port}{path}"  # noqa: E731
    status = lambda path: (lambda r: r.status_code)(httpx.get(url(path), timeout=5))  # noqa: E731

    def answers(path, code):
        def check():
            try: return True if status(path) == code else None
            except httpx.TransportError: return None
        return check

    server_log = tmp_path / "serve.log"
    with open(server_log, "wb") as out:
        server = subprocess.Popen(infer.argv(), env=server_env, cwd=infer.workdir, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        # 1. the pod starts on an empty volume: alive (startup and liveness probes), not ready
        path, p = infer.probe("startupProbe")
        wait_for(answers(path, 200), min(p["periodSeconds"] * p["failureThreshold"], 120),
                 f"startup probe {path} did not answer 200", server_log, server)
        # in the container the probes' named port is the one the app listens on (here: a free port)
        assert p["port"] == int(infer.env({})["MNIST_K8S_PORT"])
        assert status(infer.probe("livenessProbe")[0]) == 200
        ready_path = infer.probe("readinessProbe")[0]
        assert status(ready_path) == 503, "ready without a model"

        # 2. the training Job, as its container would run it
        train_log = tmp_path / "train.log"
        with open(train_log, "wb") as out:
            try:
                res = subprocess.run(train.argv(), env=train_env, cwd=train.workdir, stdout=out,
                                     stderr=subprocess.STDOUT, timeout=TRAIN_TIMEOUT)
            except subprocess.TimeoutExpired: pytest.fail(f"training did not finish\n{tail(train_log)}")
        assert res.returncode == 0, tail(train_log)
        version = (model_dir / "latest").read_text().strip()
        folder = model_dir / "versions" / version
        for name in ("model.pt", "metadata.json", "report.ipynb", "report.html"):
            assert (folder / name).is_file(), f"{name} missing from {folder}"
        meta = json.loads((folder / "metadata.json").read_text())
        assert meta["version"] == version
        assert meta["sha256"] == hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()
        assert meta["params"]["epochs"] == 1  # the overrides reached the notebook through the environment
        report = json.loads((folder / "report.ipynb").read_text())
        assert report["cells"] and report["metadata"].get("papermill"), "the report is not an executed notebook"

        # 3. the serving pod picks the model up by itself and turns ready
        wait_for(answers(ready_path, 200), 30, "the server did not load the published model", server_log, server)
        assert httpx.get(url("/model"), timeout=5).json()["version"] == version
        r = httpx.get(url("/report"), timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        r = httpx.post(url("/predict"), files={"file": ("digit.png", digit_png(sample_root), "image/png")},
                       timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["digit"] in range(10) and body["version"] == version

        # 4. Kubernetes stops a pod with SIGTERM: it drains and exits within the grace period
        grace = pod_spec(infer.obj)["terminationGracePeriodSeconds"]
        server.send_signal(signal.SIGTERM)
        try: rc = server.wait(timeout=grace)
        except subprocess.TimeoutExpired: pytest.fail(f"no exit within {grace} s of SIGTERM\n{tail(server_log)}")
        assert rc == 0, tail(server_log)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)
