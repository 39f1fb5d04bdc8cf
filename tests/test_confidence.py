"""The calibrated confidence and the "not sure" flag: what training publishes, what the loaded model computes, and
what `/predict` answers for digits and for things that are not digits (through the real server)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from helpers import SAMPLE, mnist_test_digits


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def non_digit_uploads(n: int = 60, seed: int = 2024) -> list[tuple[str, bytes]]:
    "Handwriting-like letters, symbols and shapes, letters in a font, textures, two digits side by side, as PNGs."
    from mnist_k8s.data import load_mnist, render_non_digits
    pairs = load_mnist(SAMPLE, train=False).images[:200].numpy()
    return [(kind, _png(img)) for kind, img in render_non_digits(n, seed, pairs_from=pairs)]


def test_training_publishes_a_calibrated_model(trained):
    from mnist_k8s import store
    from mnist_k8s.confidence import Calibration
    from mnist_k8s.serving import load_model
    version = store.latest_version(trained)
    meta = store.read_metadata(trained, version)
    cal = meta["calibration"]
    assert meta["arch"]["not_digit"] is True
    assert cal["held_out"] >= 100 and cal["negatives"] >= 100
    assert cal["ece_held_out_after"] < cal["ece_held_out_before"]
    assert cal["flagged_held_out"] <= cal["rate"] + 1e-6
    model = load_model(trained, version)
    assert model.calibration == Calibration(cal["temperature"], cal["threshold"])
    with torch.inference_mode():
        assert model.net(torch.zeros(1, 1, 28, 28)).shape == (1, 11)


def test_calibration_holds_on_the_test_digits(trained):
    "Temperature scaling lowers the expected calibration error on test digits the model never saw."
    from mnist_k8s import store
    from mnist_k8s.confidence import expected_calibration_error
    from mnist_k8s.data import load_mnist
    from mnist_k8s.serving import load_model
    model = load_model(trained, store.latest_version(trained))
    test = load_mnist(SAMPLE, train=False)
    with torch.inference_mode():
        logits = model.net(test.floats())
    probs, _, conf, ok = model.calibration(logits)
    raw = torch.softmax(logits[:, :10].float(), 1)
    assert expected_calibration_error(torch.from_numpy(probs), test.labels) < expected_calibration_error(raw, test.labels)
    assert (~ok).mean() < 0.05                                    # few real digits are "not sure"


@pytest.mark.server
def test_predict_is_sure_of_digits_and_not_of_non_digits(server):
    digits = mnist_test_digits(100)
    answers = [server.post("/predict", files={"file": ("d.png", d, "image/png")}).json() for d, _ in digits]
    for a in answers:
        assert isinstance(a["confident"], bool) and 0 <= a["confidence"] <= max(a["probabilities"]) + 1e-6
    sure = [a["confident"] for a in answers]
    assert np.mean(sure) >= 0.95, f"only {np.mean(sure):.0%} of test digits confident"
    right = [a["digit"] == label for a, (_, label) in zip(answers, digits) if a["confident"]]
    assert np.mean(right) >= 0.9

    flagged, kinds = [], {}
    for kind, data in non_digit_uploads(100):
        r = server.post("/predict", files={"file": ("x.png", data, "image/png")})
        if r.status_code == 422:                     # no digit found at all: refused, not answered
            continue
        assert r.status_code == 200, r.text
        kinds.setdefault(kind, []).append(not r.json()["confident"])
    # two digits side by side are left out: preprocessing may keep only one of them (then it is a digit)
    flagged = [f for k, v in kinds.items() if k != "pair" for f in v]
    rates = {k: f"{np.mean(v):.0%}" for k, v in kinds.items()}
    # the test model is small (one epoch on the sample): the published model's figures are in bench/notsure.py
    assert len(flagged) >= 60 and np.mean(flagged) >= max(0.4, 10 * (1 - np.mean(sure))), rates


@pytest.mark.server
def test_predict_not_sure_of_a_letter(server):
    "The issue's cases: typed letters used to get answers such as 'It's a 0 (90% sure)' for a D."
    from PIL import Image, ImageDraw, ImageFont
    from mnist_k8s.data import non_digit_fonts
    font = ImageFont.truetype(str(next(p for p in non_digit_fonts() if p.name == "DejaVuSans.ttf")), 160)
    answers = {}
    for ch in "DXKH#":
        img = Image.new("L", (240, 240), 255)
        ImageDraw.Draw(img).text((120, 120), ch, fill=0, font=font, anchor="mm")
        answers[ch] = server.post("/predict", files={"file": ("t.png", _png(img), "image/png")}).json()
    assert sum(not a["confident"] for a in answers.values()) >= 3, {c: (a["digit"], a["confidence"]) for c, a in answers.items()}
