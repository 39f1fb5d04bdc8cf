"""The app in-process (no server): property-based tests that no request, however odd, gets a 500, a non-JSON
error or a hang. Schemathesis generates requests from the app's own OpenAPI schema; Hypothesis mutates real
PNG files byte by byte."""
from __future__ import annotations

import io

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import mnist_test_digits
from mnist_k8s import store
from mnist_k8s.api import create_app
from mnist_k8s.config import Settings
from mnist_k8s.model import build_model


@pytest.fixture(scope="module")
def app_settings(tmp_path_factory) -> Settings:
    "Settings for the apps of this module: a model store of its own, small limits, one torch thread."
    return Settings(_env_file=None, model_dir=tmp_path_factory.mktemp("app-models"), torch_threads=1,
                    max_upload_bytes=256 * 1024, max_batch_files=4)


@pytest.fixture(scope="module")
def published(app_settings):
    "An untrained network of the real architecture in the store (it costs the same to run as a trained one)."
    store.publish(app_settings.model_dir, build_model().state_dict(), {"arch": {}})


@pytest.fixture(scope="module")
def client(app_settings, published):
    with TestClient(create_app(app_settings)) as c:   # runs the lifespan: model loaded, inference thread started
        assert c.get("/readyz").status_code == 200
        yield c


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    "Five MNIST test digits as PNG files."
    return [d for d, _ in mnist_test_digits(5)]


def assert_clean(r):
    "A 2xx, or a 4xx with the JSON error shape: never a 500."
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert set(r.json()) == {"error", "detail"}, r.text[:300]


# ------------------------------------------------------------------ schema-driven fuzzing
@pytest.fixture(scope="module")
def started_app(app_settings, published):
    "An app with its service started by hand, as its lifespan would (schemathesis calls the app without running the lifespan)."
    app = create_app(app_settings)
    svc = app.state.service
    svc.predictor.start(); svc.holder.check()
    yield app
    svc.predictor.stop()


@pytest.fixture(scope="module")
def app_schema(started_app):
    "The app's own OpenAPI schema, read from its `/openapi.json` in-process."
    return schemathesis.openapi.from_asgi("/openapi.json", started_app)


schema = schemathesis.pytest.from_fixture("app_schema")   # loaded when the test runs, not at import


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_generated_request_breaks_the_api(case):
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert set(response.json()) == {"error", "detail"}


# ------------------------------------------------------------------ damaged images
@given(data=st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_damaged_pngs_get_a_clear_answer(client, pngs, data):
    b = bytearray(data.draw(st.sampled_from(pngs), label="png"))
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, max(0, len(b) - 1)))
        if op == "flip" and b: b[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut": del b[i:i + data.draw(st.integers(1, 64))]
        else: b[i:i] = data.draw(st.binary(min_size=1, max_size=64))
    r = client.post("/predict", files={"file": ("x.png", bytes(b), "image/png")})
    assert_clean(r)
    if r.status_code == 200:
        assert len(r.json()["probabilities"]) == 10


@given(body=st.binary(max_size=2048), ctype=st.sampled_from(["image/png", "application/octet-stream", "image/jpeg"]))
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_random_raw_bodies(client, body, ctype):
    assert_clean(client.post("/predict", content=body, headers={"content-type": ctype}))


@given(body=st.binary(max_size=1024), boundary=st.text("abcXYZ0123-", min_size=1, max_size=20))
@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
def test_random_multipart_bodies(client, body, boundary):
    for path in ("/predict", "/predict/batch"):
        assert_clean(client.post(path, content=f"--{boundary}\r\n".encode() + body,
                                 headers={"content-type": f"multipart/form-data; boundary={boundary}"}))


def test_every_format_pillow_writes(client, pngs):
    """The same digit in every common format is read the same (or refused with a clear 415). The network here
    is untrained, so its answers are close calls that JPEG's artefacts can tip over: lossless formats must give
    the PNG's probabilities, lossy ones must decode to the PNG's digit."""
    import numpy as np
    from PIL import Image

    from mnist_k8s.preprocess import preprocess
    img = Image.open(io.BytesIO(pngs[0]))
    answers, probs, files = {}, {}, {}
    for fmt in ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM", "ICO", "PDF"]:
        buf = io.BytesIO()
        (img.convert("RGB") if fmt in ("PDF",) else img).save(buf, fmt)
        files[fmt] = buf.getvalue()
        r = client.post("/predict", files={"file": (f"d.{fmt.lower()}", files[fmt], "application/octet-stream")})
        assert_clean(r)
        answers[fmt], probs[fmt] = r.json().get("digit", r.json().get("error")), r.json().get("probabilities")
    for fmt in ("GIF", "BMP", "TIFF"):       # the same pixels: the same answer (up to bfloat16 rounding)
        assert max(abs(a - b) for a, b in zip(probs[fmt], probs["PNG"])) < 1e-3, (fmt, answers)
    for fmt in ("JPEG", "WEBP"):             # read, and the same digit with its compression's artefacts
        assert isinstance(answers[fmt], int), answers
        assert np.corrcoef(preprocess(files[fmt]).ravel(), preprocess(files["PNG"]).ravel())[0, 1] > 0.95, fmt
    assert answers["PDF"] == "unsupported_format", answers


def test_concurrent_requests_get_their_own_answers(client):
    "Batching never mixes up answers: each of many concurrent requests gets the answer for its own image."
    from concurrent.futures import ThreadPoolExecutor
    digits = [d for d, _ in mnist_test_digits(24)]
    alone = [client.post("/predict", files={"file": ("d.png", d, "image/png")}).json()["probabilities"] for d in digits]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda d: client.post("/predict", files={"file": ("d.png", d, "image/png")})
                                 .json()["probabilities"], digits * 3))
    import numpy as np
    alone, together = np.array(alone), np.array(together)
    dist = np.abs(together[:, None] - alone[None]).max(-1)        # each answer against every image's own answer
    assert (dist.argmin(1) == np.arange(len(together)) % 24).all()   # closest to its own image's answer...
    assert dist[np.arange(len(together)), np.arange(len(together)) % 24].max() < 1e-3  # ...up to bfloat16 rounding
