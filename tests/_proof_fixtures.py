"""Helpers for the load, hostile-input, fuzz, fault and security tests: raw HTTP on loopback, multipart bodies
built by hand, memory sampling of a server process. Servers and the shared trained model come from
`_serve_fixtures`."""
from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from _serve_fixtures import Server, copy_version, trained_model_dir, wait_for


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    "The model store trained once per test session (see `_serve_fixtures.trained_model_dir`)."
    return trained_model_dir(tmp_path_factory.getbasetemp())


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


def _parse(data: bytes) -> Reply:
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
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
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
    return _parse(data) if data else Reply(None)


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
    "Resident memory (VmRSS, KiB) of `pid` and its descendants (uvicorn workers, if any)."
    from _train_fixtures import descendants
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
