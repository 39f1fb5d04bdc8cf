"""Helpers for the serving tests: real server processes, a model trained once per session, MNIST test digits."""
from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data"
CLI = "import sys; from mnist_k8s.cli import main; sys.exit(main(sys.argv[1:]))"
RELOAD = 0.2   # seconds between model checks in the servers these tests start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout: float = 30.0, every: float = 0.05):
    "Poll `cond()` until it returns something truthy; return it, or raise `TimeoutError`."
    deadline = time.monotonic() + timeout
    while True:
        try:
            if (r := cond()):
                return r
        except (httpx.HTTPError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        time.sleep(every)


class Server:
    "`mnist-k8s serve` in a subprocess on a free loopback port; a context manager that always stops it."
    def __init__(self, model_dir: Path, workers: int = 1, env: dict | None = None):
        self.model_dir, self.port = Path(model_dir), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "MNIST_K8S_RELOAD_INTERVAL": str(RELOAD), "MNIST_K8S_LOG_LEVEL": "warning",
                    "MNIST_K8S_TORCH_THREADS": "1", **(env or {})}
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.cmd = [sys.executable, "-c", CLI, "serve", "--host", "127.0.0.1", "--port", str(self.port),
                    "--workers", str(workers), "--model-dir", str(self.model_dir)]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> "Server":
        self.log = tempfile.NamedTemporaryFile(prefix="mnist-k8s-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            wait_for(lambda: self.proc.poll() is None and httpx.get(self.url + "/healthz", timeout=2).status_code == 200
                     or self._died(), timeout)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"server did not start:\n{self.output()}") from None
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
        return self

    def _died(self) -> bool:
        return self.proc.poll() is not None

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-5000:]

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=kw.pop("timeout", 10), **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def version(self) -> str | None:
        r = self.get("/readyz")
        return r.json().get("version") if r.status_code == 200 else None

    def terminate(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        Path(self.log.name).unlink(missing_ok=True)
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# ------------------------------------------------------------------ models
_TRAINED: dict[str, Path] = {}

def trained_model_dir(base: Path) -> Path:
    """A model store holding one version trained by the training notebook on the small sample shipped in
    tests/data (`mnist-k8s train --epochs 1`: its 4000 digits, about 95% test accuracy, under half a minute);
    trained once per test session. Set MNIST_K8S_TEST_MODEL_DIR to an existing model store to skip the
    training (for quick local iterations)."""
    if (given := os.environ.get("MNIST_K8S_TEST_MODEL_DIR")):
        return Path(given)
    if "dir" not in _TRAINED:
        out = base / "trained-models"
        cmd = [sys.executable, "-c", CLI, "train", "--epochs", "1", "--data-root", str(SAMPLE), "--model-dir", str(out)]
        env = {**os.environ, "MNIST_K8S_DOWNLOAD": "false"}
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
        assert r.returncode == 0, f"training failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        _TRAINED["dir"] = out
    return _TRAINED["dir"]


def latest(model_dir: Path) -> str:
    from mnist_k8s import store
    v = store.latest_version(model_dir)
    assert v, f"nothing published in {model_dir}"
    return v


def copy_version(src: Path, dst: Path, promote: bool = True, new_name: bool = True) -> str:
    """Publish the latest version of store `src` into store `dst` (under a fresh version name if `new_name`),
    the way the training pipeline does: stage a complete folder, then switch `latest`."""
    from mnist_k8s import store
    v = latest(src)
    state, meta = store.load_state(src, v)
    meta = {k: x for k, x in meta.items() if k not in ("version", "sha256", "size", "model_file")}
    version = store.new_version() if new_name else v
    store.stage_version(dst, version, state, meta)
    report = store.version_file(src, v, store.REPORT_HTML)
    if report.is_file():
        store.add_file(dst, version, store.REPORT_HTML, report.read_bytes())
    if promote:
        store.promote(dst, version)
    return version


def publish_corrupt(model_dir: Path, based_on: Path) -> str:
    "Publish a version whose model.pt is truncated after its checksum was recorded (a broken copy)."
    from mnist_k8s import store
    v = copy_version(based_on, model_dir, promote=False)
    f = store.version_file(model_dir, v, store.MODEL_FILE)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    (Path(model_dir) / store.LATEST).write_text(v + "\n")   # what a half-finished copy by hand would look like
    return v


# ------------------------------------------------------------------ images
def mnist_test_digits(n: int = 100, start: int = 0) -> list[tuple[bytes, int]]:
    "Real MNIST test digits from the shipped sample, as PNG bytes with their labels."
    raw = SAMPLE / "MNIST" / "raw"
    images = np.fromfile(raw / "t10k-images-idx3-ubyte", dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.fromfile(raw / "t10k-labels-idx1-ubyte", dtype=np.uint8, offset=8)
    out = []
    for img, label in zip(images[start:start + n], labels[start:start + n]):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        out.append((buf.getvalue(), int(label)))
    return out


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def bad_uploads() -> dict[str, tuple[bytes, str]]:
    "Files that must be refused: name -> (bytes, declared content type)."
    digit = mnist_test_digits(1)[0][0]
    big = Image.new("1", (6000, 5000))            # 30 Mpx of nothing: a few kB of PNG, a bomb when decoded
    return {
        "empty": (b"", "image/png"),
        "not_image": (b"Hello, this is plain text and certainly not a picture.\n" * 4, "image/png"),
        "unsupported_format": (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n", "application/pdf"),
        "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="28" height="28"><text>7</text></svg>', "image/svg+xml"),
        "truncated": (digit[: len(digit) // 2], "image/png"),
        "too_many_pixels": (encode(big, optimize=True), "image/png"),
        "aspect_ratio": (encode(Image.new("L", (2600, 20), 255)), "image/png"),
        "blank": (encode(Image.new("L", (100, 100), 255)), "image/png"),
    }
