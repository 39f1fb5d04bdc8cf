"""Plain helpers shared by the tests: paths, small training settings, the CLI in a subprocess, real server
processes, model stores, MNIST test digits, raw HTTP and multipart by hand, process memory, and `need` for
external tools. Nothing runs at import time; pytest fixtures live in `conftest.py`."""
from __future__ import annotations

import importlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data"
CLI = "import sys; from mnist_k8s.cli import main; sys.exit(main(sys.argv[1:]))"
RELOAD = 0.2   # seconds between model checks in the servers these tests start


# ------------------------------------------------------------------ external tools
def in_ci() -> bool:
    "True on CI: `CI=true`, as GitHub Actions, GitLab CI and most others set it, and as `.ci/run` does."
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(reason: str):
    """Skip the calling test (or module, at module level) with `reason` on a laptop; fail it in CI, where every
    tool the tests use must be installed."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: tests may not skip for a missing tool)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def need(tool: str, hint: str = "") -> str:
    "The path of executable `tool` (a name on PATH, or a path); if it is missing, skip on a laptop, fail in CI."
    if (path := shutil.which(tool)):
        return path
    missing(f"{tool} is not installed" + (f": {hint}" if hint else ""))


def need_module(name: str, hint: str = ""):
    "Import and return module `name`; if it cannot be imported, skip on a laptop, fail in CI."
    try:
        return importlib.import_module(name)
    except ImportError as e:
        missing(f"cannot import {name} ({e})" + (f": {hint}" if hint else ""))


# ------------------------------------------------------------------ training
# A small run on the shipped sample: 38 steps, a few seconds even on a busy 2-core machine. With seeds 0-6 and 42
# it reaches 88-94% test accuracy (small batches matter: 600 digits in batches of 100 reach only 22-55%).
SMALL = dict(epochs=1, batch_size=32, limit=1200, test_limit=300, torch_threads=1)
SMALL_MIN_ACCURACY = 0.85   # a small run below this has a real regression, not bad luck


def small_settings(model_dir: Path, **overrides):
    "Settings for a small training run on the sample, publishing to `model_dir`; no `.env`, no download."
    from mnist_k8s.config import Settings
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


@contextmanager
def kernel_tmpdir():
    """A new folder in the system's temporary folder, removed afterwards: the TMPDIR of a training run whose
    kernel's socket folder a signal may leave behind. (Under pytest's `tmp_path` the sockets' paths could pass
    the 107 bytes a Unix socket's path may have.)"""
    d = Path(tempfile.mkdtemp(prefix="mnist-k8s-test-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------ servers
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
        except (httpx2.HTTPError, OSError):
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
            wait_for(lambda: self.proc.poll() is None
                     and httpx2.get(self.url + "/healthz", timeout=2).status_code == 200 or self._died(), timeout)
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

    def get(self, path: str, **kw) -> httpx2.Response:
        return httpx2.get(self.url + path, timeout=kw.pop("timeout", 10), **kw)

    def post(self, path: str, **kw) -> httpx2.Response:
        return httpx2.post(self.url + path, timeout=kw.pop("timeout", 30), **kw)

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
def trained_model_dir(base: Path) -> Path:
    """A model store in `base` holding one version trained by the training notebook on the small sample
    shipped in tests/data (`mnist-k8s train --epochs 1`), trained unless `base` already holds one. The
    session fixture `trained` (conftest.py) calls it once per test session. Set MNIST_K8S_TEST_MODEL_DIR to
    an existing model store to skip the training (for quick local iterations)."""
    from mnist_k8s import store
    if (given := os.environ.get("MNIST_K8S_TEST_MODEL_DIR")):
        return Path(given)
    out = Path(base) / "trained-models"
    if store.latest_version(out):
        return out
    cmd = [sys.executable, "-c", CLI, "train", "--epochs", "1", "--data-root", str(SAMPLE), "--model-dir", str(out)]
    env = {**os.environ, "MNIST_K8S_DOWNLOAD": "false"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert r.returncode == 0, f"training failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    accuracy = store.read_metadata(out, store.latest_version(out))["test_accuracy"]
    assert accuracy >= 0.85, f"the session model reached only {accuracy:.1%} (this run gives about 93%)"
    return out


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
    import numpy as np
    from PIL import Image
    raw = SAMPLE / "MNIST" / "raw"
    images = np.fromfile(raw / "t10k-images-idx3-ubyte", dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.fromfile(raw / "t10k-labels-idx1-ubyte", dtype=np.uint8, offset=8)
    out = []
    for img, label in zip(images[start:start + n], labels[start:start + n]):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        out.append((buf.getvalue(), int(label)))
    return out


def encode(img, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def bad_uploads() -> dict[str, tuple[bytes, str]]:
    "Files that must be refused: name -> (bytes, declared content type)."
    from PIL import Image
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


def server_for(model_dir: Path, wrap: list[str] | None = None, **kw) -> Server:
    "A (not yet started) server on `model_dir`; `wrap` prefixes its command (e.g. `setpriv ...`)."
    s = Server(model_dir, **kw)
    if wrap: s.cmd = [*wrap, *s.cmd]
    return s


def serve_copy(trained: Path, model_dir: Path, **kw) -> Server:
    """A started server on a copy of the trained model in `model_dir` (its own store, free to damage), serving
    it; the caller stops it (`with serve_copy(...) as s:` does)."""
    v = copy_version(trained, model_dir)
    s = server_for(model_dir, **kw).start()
    try:
        wait_for(lambda: s.version() == v, timeout=30)
    except BaseException:
        s.stop(); raise
    s.__class__ = _Started                         # already started: `with` only stops it at the end
    return s


class _Started(Server):
    def __enter__(self): return self


# ------------------------------------------------------------------ raw HTTP
@dataclass
class Reply:
    "One HTTP response as read off the socket (`status` None when the server closed without answering)."
    status: int | None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    raw: bytes = b""

    def json(self):
        return json.loads(self.body)

    @property
    def is_json_error(self) -> bool:
        "A JSON body of the app's error shape: `{error, detail}`, both set."
        if not self.headers.get("content-type", "").startswith("application/json"): return False
        try: j = self.json()
        except ValueError: return False
        return isinstance(j, dict) and set(j) == {"error", "detail"} and bool(j["error"]) and bool(j["detail"])


def parse_reply(data: bytes) -> Reply:
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    m = re.match(r"HTTP/1\.[01] (\d{3})", lines[0])
    if not m: return Reply(None, raw=data)
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body, buf = b"", rest
        while buf:
            size_line, _, buf = buf.partition(b"\r\n")
            n = int(size_line.split(b";")[0] or b"0", 16)
            if n == 0: break
            body, buf = body + buf[:n], buf[n + 2:]
        rest = body
    return Reply(int(m.group(1)), headers, rest, data)


def _complete(data: bytes) -> bool:
    if b"\r\n\r\n" not in data: return False
    head, _, rest = data.partition(b"\r\n\r\n")
    h = head.lower()
    if (m := re.search(rb"\r\ncontent-length:\s*(\d+)", h)): return len(rest) >= int(m.group(1))
    if b"transfer-encoding: chunked" in h: return rest.endswith(b"0\r\n\r\n")
    return False


def raw_http(port: int, request: bytes | list[bytes], timeout: float = 30.0, pause: float = 0.0,
             half_close: bool = False) -> Reply:
    """Send `request` (bytes, or pieces sent `pause` s apart) on a fresh connection to 127.0.0.1:`port` (then
    shut down the sending side if `half_close`) and read one response. The whole exchange must finish within `timeout` seconds (a hang raises `TimeoutError`). A
    reset or a close before any byte of a response gives `Reply(None)`."""
    deadline = time.monotonic() + timeout
    data = b""
    try: s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except ConnectionResetError:
        # The handshake completed into the listener's queue, and the listener closed before we were accepted (a
        # server stopping): the kernel resets the queued connection, and connect's wait reports it as a reset.
        return Reply(None)
    with s:
        try:
            for piece in ([request] if isinstance(request, bytes) else request):
                s.sendall(piece)
                if pause: time.sleep(pause)
            if half_close: s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass                                  # the server answered (and closed) before the body was all sent
        while not _complete(data):
            left = deadline - time.monotonic()
            if left <= 0: raise TimeoutError(f"no complete response within {timeout} s (got {data[:200]!r})")
            s.settimeout(left)
            try: chunk = s.recv(65536)
            except ConnectionResetError: break
            except socket.timeout: raise TimeoutError(f"no complete response within {timeout} s (got {data[:200]!r})")
            if not chunk: break
            data += chunk
    return parse_reply(data) if data else Reply(None)


def http_request(method: str, path: str, body: bytes = b"", headers: dict | list | None = None,
                 content_length: bool = True) -> bytes:
    "An HTTP/1.1 request as bytes (`Connection: close`); `headers` may repeat names when given as a list."
    hs = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    names = {k.lower() for k, _ in hs}
    if content_length and "content-length" not in names and "transfer-encoding" not in names and (body or method == "POST"):
        hs.append(("Content-Length", str(len(body))))
    if "host" not in names: hs.insert(0, ("Host", "127.0.0.1"))
    if "connection" not in names: hs.append(("Connection", "close"))
    head = f"{method} {path} HTTP/1.1\r\n".encode() + b"".join(
        (k if isinstance(k, bytes) else k.encode("latin-1")) + b": " +
        (v if isinstance(v, bytes) else str(v).encode("latin-1")) + b"\r\n" for k, v in hs)
    return head + b"\r\n" + body


# ------------------------------------------------------------------ multipart by hand
BOUNDARY = "proofboundary7MA4YWxkTrZu0gW"

def part(name: str | bytes | None = "file", data: bytes = b"", filename: str | bytes | None = "digit.png",
         ctype: str | None = "image/png", extra: bytes = b"") -> bytes:
    "One multipart part (no boundary line): Content-Disposition (+ Content-Type), blank line, data."
    def q(x): return x if isinstance(x, bytes) else x.encode()
    disp = b"Content-Disposition: form-data"
    if name is not None: disp += b'; name="' + q(name) + b'"'
    if filename is not None: disp += b'; filename="' + q(filename) + b'"'
    head = disp + b"\r\n" + (f"Content-Type: {ctype}\r\n".encode() if ctype else b"") + extra
    return head + b"\r\n" + data


def multipart(*parts: bytes, boundary: str = BOUNDARY, close: bool = True) -> bytes:
    b = boundary.encode()
    body = b"".join(b"--" + b + b"\r\n" + p + b"\r\n" for p in parts)
    return body + (b"--" + b + b"--\r\n" if close else b"")


def form_type(boundary: str = BOUNDARY) -> str:
    return f"multipart/form-data; boundary={boundary}"


# ------------------------------------------------------------------ process memory
def rss_kib(pid: int) -> int:
    "Resident memory (VmRSS, KiB) of `pid` and its descendants (gunicorn's workers)."
    total = 0
    for p in [pid, *descendants(pid)]:
        try: status = Path(f"/proc/{p}/status").read_text()
        except OSError: continue
        if (m := re.search(r"VmRSS:\s+(\d+)", status)): total += int(m.group(1))
    return total


class RssSampler(threading.Thread):
    "Sample `rss_kib(pid)` every `every` seconds in the background: `(seconds since start, KiB)` pairs."
    def __init__(self, pid: int, every: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.every, self.samples = pid, every, []
        self._stop_event = threading.Event()

    def run(self):
        t0 = time.monotonic()
        while not self._stop_event.is_set():
            self.samples.append((time.monotonic() - t0, rss_kib(self.pid)))
            self._stop_event.wait(self.every)

    def stop(self) -> list[tuple[float, int]]:
        self._stop_event.set(); self.join(5)
        return self.samples
