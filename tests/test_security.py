"""Nobody gets in where they don't belong: no file outside the model volume is ever served, user-controlled
text is escaped, only tensors are ever unpickled, and every response carries headers fit for a public page.

Decision on symlinks: everything the server reads for a version (metadata, weights, report) must resolve
inside the model volume. A version folder, `metadata.json`, `model.pt` or `report.html` that is a symlink
leading out of the volume is refused like a corrupt file (the previous model keeps serving, readiness reports
the store as degraded); symlinks that stay inside the volume (as Kubernetes' ConfigMap and Secret volumes use)
are fine."""
from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

import mnist_k8s
from mnist_k8s import store
from helpers import (copy_version, encode, form_type, http_request, mnist_test_digits, multipart, part, raw_http,
                     RELOAD, serve_copy, Server, wait_for)

pytestmark = pytest.mark.timeout(300)
TICK = 10 * RELOAD + 5
SECRET = "s3cr3t-token-outside-the-volume-" + hashlib.sha256(b"proof").hexdigest()[:12]
PASSWD = re.compile(rb"root:[^:\n]*:0:0:")


def leaks(body: bytes) -> bool:
    return SECRET.encode() in body or bool(PASSWD.search(body))


def failures(server) -> float:
    line = next((l for l in server.get("/metrics").text.splitlines()
                 if l.startswith("mnist_model_reload_failures_total")), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    "A folder outside any model volume holding a secret file (what must never be served)."
    d = tmp_path_factory.mktemp("outside")
    (d / "secret.txt").write_text(SECRET + "\n")
    (d / "secret.json").write_text(json.dumps({"token": SECRET}))
    return d


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    with serve_copy(trained, tmp_path_factory.mktemp("security-models")) as s:
        yield s


# ------------------------------------------------------------------ path traversal
TRAVERSALS = [
    "/report?version=../../etc/passwd", "/report?version=..%2f..%2f..%2fetc%2fpasswd", "/report?file={secret}",
    "/model?version=../../etc/passwd", "/report/../../etc/passwd", "/report/%2e%2e/%2e%2e/etc/passwd",
    "/static/../../../../../../etc/passwd", "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/static/..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd", "/static/%252e%252e/%252e%252e/etc/passwd",
    "/static/....//....//....//etc/passwd", "/static/..\\..\\..\\..\\etc\\passwd", "/static//etc/passwd",
    "/static/{secret}", "/static/%2F{secret_q}", "/static/..%00/etc/passwd", "/docs-static/../../../etc/passwd",
    "/docs-static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "//etc/passwd", "/%2e%2e/%2e%2e/etc/passwd",
    "/versions/../latest", "/models/latest", "/openapi.json/../../etc/passwd",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_no_path_leaves_the_volume(server, outside, path):
    secret = str(outside / "secret.txt")
    target = path.format(secret=secret, secret_q=secret.lstrip("/").replace("/", "%2F"))
    r = raw_http(server.port, http_request("GET", target), timeout=10)
    assert r.status is not None and r.status < 500, (target, r.status)
    assert not leaks(r.raw), (target, r.raw[:300])
    if r.status >= 400 and r.headers.get("content-type", "").startswith("application/json"):
        assert r.is_json_error, r.body[:200]


def test_latest_pointing_outside_is_refused(trained, tmp_path, outside):
    "`latest` naming `../..`-style paths (or absolute ones) is never followed, whether serving or starting."
    evil = outside / "versions-evil"
    v = copy_version(trained, tmp_path / "good")
    models = tmp_path / "models"
    copy_version(trained, models, new_name=False)
    shutil.copytree(store.version_dir(tmp_path / "good", v), evil / "v1")
    (evil / "v1" / store.REPORT_HTML).write_text(f"<html>{SECRET}</html>")
    with Server(models) as s:
        wait_for(lambda: s.version(), timeout=30)
        good = s.version()
        for pointer in ["../../etc", f"../../{evil.relative_to(evil.anchor)}/v1", str(evil / "v1"), "..", ".",
                        "versions/../../x", "v1/../../../etc/passwd"]:
            (models / store.LATEST).write_text(pointer + "\n")
            time.sleep(3 * RELOAD)
            assert s.version() == good, pointer
            for path in ("/report", "/model", "/readyz"):
                r = s.get(path)
                assert not leaks(r.content) and r.status_code in (200, 503), (pointer, path, r.status_code)
    (models / store.LATEST).write_text("../../etc\n")
    with Server(models) as s:                        # a fresh server has nothing it may serve
        time.sleep(3 * RELOAD)
        assert s.get("/readyz").status_code == 503 and s.get("/report").status_code == 503


# ------------------------------------------------------------------ symlinks out of the volume
def publish_with(trained: Path, models: Path, change) -> str:
    "Publish (and promote) a copy of the trained version after `change(folder)` was applied to its folder."
    v = copy_version(trained, models, promote=False)
    change(store.version_dir(models, v))
    (models / store.LATEST).write_text(v + "\n")
    return v


@pytest.mark.parametrize("link", ["report_to_secret", "report_to_passwd", "metadata_to_secret_json",
                                  "model_to_passwd", "version_folder_outside"])
def test_symlinks_leaving_the_volume_are_refused(trained, tmp_path, outside, link):
    models = tmp_path / "models"
    with serve_copy(trained, models) as s:
        good = s.version()
        def change(folder: Path):
            if link == "report_to_secret":
                (folder / store.REPORT_HTML).unlink(); (folder / store.REPORT_HTML).symlink_to(outside / "secret.txt")
            elif link == "report_to_passwd":
                (folder / store.REPORT_HTML).unlink(); (folder / store.REPORT_HTML).symlink_to("/etc/passwd")
            elif link == "metadata_to_secret_json":
                (folder / store.METADATA_FILE).unlink(); (folder / store.METADATA_FILE).symlink_to(outside / "secret.json")
            elif link == "model_to_passwd":
                (folder / store.MODEL_FILE).unlink(); (folder / store.MODEL_FILE).symlink_to("/etc/passwd")
            else:                                   # the whole folder lives outside, complete and valid
                out = outside / f"moved-{folder.name}"
                shutil.copytree(folder, out)
                (out / store.REPORT_HTML).write_text(f"<html>{SECRET}</html>")
                shutil.rmtree(folder); folder.symlink_to(out, target_is_directory=True)
        v = publish_with(trained, models, change)
        wait_for(lambda: failures(s) >= 1, timeout=TICK)
        assert s.version() == good                   # refused: the previous model keeps serving
        for path in ("/", "/report", "/model", "/readyz", "/metrics"):
            r = s.get(path)
            assert r.status_code == 200 and not leaks(r.content), (path, r.status_code)
        assert v in s.get("/readyz").json().get("store_detail", ""), s.get("/readyz").json()
        assert not leaks(s.output().encode())


def test_symlinks_inside_the_volume_are_fine(trained, tmp_path):
    "Kubernetes ConfigMap/Secret volumes are made of symlinks that stay inside the volume: those work."
    models = tmp_path / "models"
    with serve_copy(trained, models) as s:
        def change(folder: Path):
            data = folder.parent / f".data-{folder.name}"
            folder.rename(data)
            folder.symlink_to(data.name, target_is_directory=True)
        v = publish_with(trained, models, change)
        wait_for(lambda: s.version() == v, timeout=TICK)
        assert s.get("/report").status_code == 200


# ------------------------------------------------------------------ escaping user-controlled text
XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def test_page_escapes_metadata_and_request_text(trained, tmp_path):
    models = tmp_path / "models"
    state, meta = store.load_state(trained, store.latest_version(trained))
    meta = {k: x for k, x in meta.items() if k not in ("version", "sha256", "size", "model_file")}
    meta.update(test_accuracy=XSS, created_at=XSS, git_rev=XSS, params={**meta.get("params", {}), "epochs": XSS},
                dataset={"train_size": XSS})
    store.publish(models, state, meta)
    with Server(models) as s:
        wait_for(lambda: s.version(), timeout=30)
        pages = [s.get("/").text,
                 s.get("/", headers={"host": f'x"><script>alert(2)</script>'}).text,
                 s.get("/", headers={"x-forwarded-proto": "javascript", "x-forwarded-host": XSS,
                                     "x-forwarded-for": XSS}).text]
        for page in pages:
            assert "<script>alert" not in page and "<img src=x" not in page, page
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in pages[0] or "&lt;script&gt;alert(&quot;x&quot;)" in pages[0]
        # metadata is served as JSON (nosniff), where it is data, not markup
        r = s.get("/model")
        assert r.headers["content-type"] == "application/json" and r.json()["test_accuracy"] == XSS
        # an uploaded file's name comes back only inside JSON
        png = mnist_test_digits(1)[0][0]
        name = "<script>alert(1)</script>.png"
        r = s.post("/predict/batch", files=[("files", (name, png, "image/png"))])
        assert r.headers["content-type"] == "application/json" and r.json()[0]["filename"] == name
        r = s.post("/predict", files={XSS: ("d.png", png, "image/png")})
        assert r.status_code == 422 and r.headers["content-type"] == "application/json"


def test_report_cannot_run_scripts(trained, tmp_path):
    """A report written by a hostile training job: the pipeline strips its scripts when it renders the report
    at publish time, the server only sends that file, under a CSP `sandbox` without script permission, so
    nothing in it runs; and a version published without its rendered report gets a 404, never a rendering."""
    from mnist_k8s.pipeline import render_html
    models = tmp_path / "models"
    nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
        {"cell_type": "code", "id": "a", "metadata": {}, "execution_count": 1, "source": "1",
         "outputs": [{"output_type": "display_data", "metadata": {},
                      "data": {"text/html": "<script>alert(1)</script><b>ok</b><SCRIPT >alert(4)</SCRIPT >"}},
                     {"output_type": "display_data", "metadata": {},
                      "data": {"text/html": "<scr<script>x</script>ipt>alert(5)</script>"}},
                     {"output_type": "display_data", "metadata": {}, "data": {"application/javascript": "alert(2)"}}]},
        {"cell_type": "markdown", "id": "b", "metadata": {}, "source": "<script>alert(3)</script> *text*"}]}
    def html_report(folder: Path):
        (folder / store.REPORT_HTML).write_text(f"<html><body><script>alert(1)</script>{XSS}</body></html>")
    def rendered_report(folder: Path):                  # what the pipeline publishes
        (folder / store.REPORT_FILE).write_text(json.dumps(nb))
        (folder / store.REPORT_HTML).write_text(render_html(folder / store.REPORT_FILE))
    def notebook_only(folder: Path):
        (folder / store.REPORT_HTML).unlink()
        (folder / store.REPORT_FILE).write_text(json.dumps(nb))
    with serve_copy(trained, models) as s:
        v = publish_with(trained, models, html_report)
        wait_for(lambda: s.version() == v, timeout=TICK)
        r = s.get("/report")
        csp = r.headers["content-security-policy"]
        assert r.status_code == 200 and "sandbox" in csp and "default-src 'none'" in csp and "script-src" not in csp
        assert "allow-scripts" not in csp
        v = publish_with(trained, models, rendered_report)
        wait_for(lambda: s.version() == v, timeout=TICK)
        r = s.get("/report")
        assert r.status_code == 200 and "<b>ok</b>" in r.text and "<script" not in r.text.lower(), r.text[-2000:]
        assert "sandbox" in r.headers["content-security-policy"]
        v = publish_with(trained, models, notebook_only)
        wait_for(lambda: s.version() == v, timeout=TICK)
        r = s.get("/report")
        assert (r.status_code, r.json()["error"]) == (404, "no_report") and v in r.json()["detail"], r.text


# ------------------------------------------------------------------ only tensors are unpickled
class _Payload:
    "Unpickling this runs a shell command that creates `marker`."
    def __init__(self, marker: Path): self.marker = marker
    def __reduce__(self): return (os.system, (f"touch {self.marker}",))


def payloads(marker: Path) -> dict[str, bytes]:
    def saved(obj):
        import io
        buf = io.BytesIO(); torch.save(obj, buf); return buf.getvalue()
    from mnist_k8s.model import build_model
    return {
        "raw_pickle": pickle.dumps(_Payload(marker), protocol=2),
        "torch_zip_with_code": saved({"conv.weight": torch.zeros(1), "evil": _Payload(marker)}),
        "whole_module_pickled": saved(build_model()),
        "tensors_and_a_string": saved({"conv.weight": torch.zeros(1), "note": "hello"}),
        "list_of_tensors": saved([torch.zeros(1)]),
    }


def sign(models: Path, version: str, data: bytes):
    "Put `data` in place of model.pt with a matching size and sha256 (so only the unpickling can refuse it)."
    store.version_file(models, version, store.MODEL_FILE).write_bytes(data)
    meta = store.read_metadata(models, version)
    meta.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    store.version_file(models, version, store.METADATA_FILE).write_text(json.dumps(meta))


def test_loader_refuses_code_and_non_tensors(trained, tmp_path):
    "In-process: `store.load_state` and the training checkpoint loader refuse every payload, and none runs."
    from mnist_k8s.train import load_checkpoint
    marker = tmp_path / "pwned"
    for name, data in payloads(marker).items():
        v = copy_version(trained, tmp_path / "models", promote=False)
        sign(tmp_path / "models", v, data)
        with pytest.raises(store.ModelStoreError):
            store.load_state(tmp_path / "models", v)
        (ckpt := tmp_path / f"{name}.pt").write_bytes(data)
        with pytest.warns(UserWarning, match="ignoring checkpoint"):
            assert load_checkpoint(ckpt, "key") is None
        assert not marker.exists(), f"{name}: the payload ran"


def test_server_refuses_malicious_pickle_and_keeps_its_model(trained, tmp_path):
    marker = tmp_path / "pwned"
    models = tmp_path / "models"
    with serve_copy(trained, models) as s:
        good = s.version()
        for i, (name, data) in enumerate(payloads(marker).items(), 1):
            v = copy_version(trained, models, promote=False)
            sign(models, v, data)
            store.promote(models, v)                 # the size matches: promote's own check passes
            wait_for(lambda: failures(s) >= i, timeout=TICK)
            assert s.version() == good, name
            assert s.post("/predict", files={"file": ("d.png", mnist_test_digits(1)[0][0], "image/png")}).json()["version"] == good
            assert not marker.exists(), f"{name}: the payload ran"


def test_every_torch_load_in_the_package_is_weights_only():
    "Statically: each `torch.load(...)` call in the package passes `weights_only=True`; nothing uses pickle."
    calls = 0
    for py in Path(mnist_k8s.__file__).parent.glob("*.py"):
        tree = ast.parse(py.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                calls += 1
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                    f"{py.name}:{node.lineno}: torch.load without weights_only=True"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                assert not {"pickle", "dill", "cloudpickle", "joblib"} & set(names), f"{py.name}:{node.lineno}"
    assert calls >= 2, calls                         # the model store and the checkpoint loader


# ------------------------------------------------------------------ response headers
def _requests_to_check() -> dict[str, bytes]:
    png = encode(__import__("PIL.Image", fromlist=["Image"]).new("L", (50, 50), 255))
    digit = mnist_test_digits(1)[0][0]
    return {
        "page": http_request("GET", "/"), "healthz": http_request("GET", "/healthz"),
        "readyz": http_request("GET", "/readyz"), "metrics": http_request("GET", "/metrics"),
        "model": http_request("GET", "/model"), "report": http_request("GET", "/report"),
        "docs": http_request("GET", "/docs"), "openapi": http_request("GET", "/openapi.json"),
        "static_js": http_request("GET", "/static/app.js"), "static_css": http_request("GET", "/static/app.css"),
        "static_svg": http_request("GET", "/static/favicon.svg"), "static_missing": http_request("GET", "/static/nope.js"),
        "predict": http_request("POST", "/predict", multipart(part("file", digit)), [("Content-Type", form_type())]),
        "not_found_404": http_request("GET", "/nowhere"), "method_405": http_request("DELETE", "/predict"),
        "media_type_415": http_request("POST", "/predict", b"x", [("Content-Type", "text/plain")]),
        "bad_multipart_400": http_request("POST", "/predict", b"--x\r\n", [("Content-Type", form_type("x"))]),
        "blank_422": http_request("POST", "/predict", png, [("Content-Type", "image/png")]),
        "too_large_413": http_request("POST", "/predict", b"", [("Content-Type", "image/png"),
                                                                 ("Content-Length", str(6 << 20))], content_length=False),
        "head_page": http_request("HEAD", "/"),
    }


def check_headers(name: str, r, allow_503: bool = False):
    h = r.headers
    assert r.status is not None and (r.status < 500 or allow_503 and r.status == 503), (name, r.status)
    assert h.get("x-content-type-options") == "nosniff", (name, h)
    csp = h.get("content-security-policy", "")
    assert "frame-ancestors 'none'" in csp and ("default-src 'self'" in csp or "default-src 'none'" in csp), (name, csp)
    assert "'unsafe-eval'" not in csp and not re.search(r"script-src[^;]*'unsafe-inline'", csp), (name, csp)
    assert h.get("x-frame-options") == "DENY" and h.get("referrer-policy") == "no-referrer", (name, h)
    assert not re.search(r"\d", h.get("server", "")), (name, h)        # no version (gunicorn says "gunicorn/asgi")
    assert "access-control-allow-origin" not in h and "x-powered-by" not in h, (name, h)
    assert h.get("content-type"), name
    if h["content-type"].startswith("text/html"): assert "charset=utf-8" in h["content-type"].lower(), (name, h)
    if r.status >= 400 and name != "head_page":
        assert r.is_json_error, (name, r.body[:200])


@pytest.mark.parametrize("name", list(_requests_to_check()))
def test_security_headers_on_every_route(server, name):
    check_headers(name, raw_http(server.port, _requests_to_check()[name], timeout=20)
                  if name != "head_page" else _head(server.port))


def _head(port: int):
    "HEAD has headers and no body: read up to the blank line."
    import socket
    from helpers import parse_reply as _parse
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(http_request("HEAD", "/"))
        data = b""
        while b"\r\n\r\n" not in data and (chunk := s.recv(65536)): data += chunk
    return _parse(data)


def test_security_headers_without_a_model(tmp_path):
    with Server(tmp_path) as s:
        for path in ("/readyz", "/model", "/report", "/"):
            r = raw_http(s.port, http_request("GET", path), timeout=10)
            check_headers(path, r, allow_503=True)
            if path != "/": assert r.status == 503


def test_page_satisfies_its_own_csp(server):
    """The page needs nothing its CSP forbids: no inline scripts, event handlers, inline styles or
    `javascript:` URLs; scripts and styles come from the same origin. (The browser test also watches for
    CSP violations while the page is used.)"""
    page = server.get("/").text
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page), "inline script"
    assert not re.search(r"\son[a-z]+\s*=", page, re.I), "inline event handler"
    assert not re.search(r"\sstyle\s*=", page, re.I) and "<style" not in page.lower(), "inline style"
    assert "javascript:" not in page.lower()
    for url in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert not re.match(r"(?:[a-z]+:)?//", url), f"resource from another origin: {url}"
    js = server.get("/static/app.js").text
    assert "eval(" not in js and "new Function" not in js and "innerHTML" not in js

