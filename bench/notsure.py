#!/usr/bin/env python
"""How often the served model says "not sure": on non-digits (it should), on MNIST test digits and on realistic
uploads (it should not).

Everything goes the way an upload goes: each image is encoded as a PNG or JPEG file, `mnist_k8s.preprocess.
preprocess` turns the bytes into the 28x28 input, and the published model is loaded with `mnist_k8s.serving.
load_model`, so its calibration (temperature, "not a digit" output, threshold) is the one the server applies.

The non-digits are made here, apart from the ones the model was calibrated on:
- font: letters that cannot pass for a digit and symbols (`mnist_k8s.data.NON_DIGIT_CHARS`) in the TrueType
  fonts installed on this machine, leaving out the fonts training uses (those matplotlib ships);
- hand: the handwriting-like letters and symbols of `mnist_k8s.data.SKELETONS`, drawn with more wobble than
  in training;
- shape: triangles, squares, stars, arrows, hearts, spirals, zigzags, smileys;
- texture: noise, stripes, checks, dots, cross-hatching;
- pair: two MNIST test digits side by side.
Realistic uploads come from `bench/corpus.py` (MNIST test digits photographed, scanned, on ruled paper, ...).

    python bench/notsure.py --model-dir /tmp/models                   # the `latest` version
    python bench/notsure.py --model-dir NEW --compare OLD             # two stores side by side
    python bench/notsure.py --model-dir /tmp/models --quick           # fewer images
    python bench/notsure.py --model-dir NEW --compare OLD --speed     # the inference step's cost, both models

Goals (issue 11): at least 80% of non-digits flagged; at most 1% of MNIST test digits and at most 3% of
realistic uploads. A refused upload (the preprocessing finds no digit) is counted apart: the page shows an
error then, not an answer.
"""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import corpus  # noqa: E402  (bench/corpus.py)
from mnist_k8s import store  # noqa: E402
from mnist_k8s.data import NON_DIGIT_CHARS, SKELETONS, draw_strokes, draw_text, non_digit_fonts, on_paper, side_by_side, texture  # noqa: E402
from mnist_k8s.preprocess import ImageError, preprocess  # noqa: E402
from mnist_k8s.serving import load_model  # noqa: E402

KINDS = ("font", "hand", "shape", "texture", "pair")


def held_out_fonts() -> list[Path]:
    "TrueType fonts of this machine that training does not use (by file name)."
    seen = {p.name for p in non_digit_fonts()}
    try:
        out = subprocess.run(["fc-list", "--format", "%{file}\n"], capture_output=True, text=True, timeout=20).stdout
        files = {Path(f) for f in out.split()}
    except (OSError, subprocess.SubprocessError):
        files = set()
    files |= set(Path("/usr/share/fonts").rglob("*.ttf"))
    return sorted(f for f in files if f.suffix.lower() == ".ttf" and f.name not in seen and f.is_file())


def encode(img: Image.Image, rng: np.random.Generator) -> bytes:
    "PNG or JPEG bytes of `img`, like an upload."
    buf = io.BytesIO()
    if rng.random() < 0.5: img.save(buf, "PNG")
    else: img.convert("RGB").save(buf, "JPEG", quality=int(rng.integers(60, 96)))
    return buf.getvalue()


def non_digits(n: int, seed: int, fonts: list[Path], test_digits: np.ndarray) -> list[tuple[str, bytes]]:
    "`n` non-digit uploads per kind, as `(kind, bytes)`."
    rng = np.random.default_rng(seed)
    hand = [k for k in SKELETONS if len(k) == 1]
    shapes = [k for k in SKELETONS if len(k) > 1]
    out = []
    for i in range(n):
        if fonts:
            img = draw_text(NON_DIGIT_CHARS[rng.integers(len(NON_DIGIT_CHARS))], fonts[rng.integers(len(fonts))], rng)
            out.append(("font", img))
        out.append(("hand", draw_strokes(SKELETONS[hand[rng.integers(len(hand))]], rng, jitter=0.035)))
        out.append(("shape", draw_strokes(SKELETONS[shapes[rng.integers(len(shapes))]], rng, jitter=0.03)))
        out.append(("texture", texture(rng)))
        out.append(("pair", side_by_side(*test_digits[rng.integers(len(test_digits), size=2)], rng)))
    return [(kind, encode(on_paper(img, rng), rng)) for kind, img in out]


def png(digit: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(digit).save(buf, "PNG")
    return buf.getvalue()


def prepare(items):
    "Preprocess `(group, label, bytes)`: `(groups, labels, inputs [N, 1, 28, 28])` of those accepted, and refusals per group."
    groups, labels, xs, refused = [], [], [], {}
    for group, label, data in items:
        try: xs.append(preprocess(data))
        except ImageError:
            refused[group] = refused.get(group, 0) + 1
            continue
        groups.append(group); labels.append(label)
    x = torch.from_numpy(np.stack(xs)).unsqueeze(1) if xs else torch.zeros(0, 1, 28, 28)
    return np.array(groups), np.array(labels), x, refused


@torch.inference_mode()
def answers(model, x: torch.Tensor):
    "Digit, confident flag and confidence for inputs `x`, as the server computes them."
    out = [model.calibration(model.net(x[i:i + 500])) for i in range(0, len(x), 500)]
    probs, conf, ok = (np.concatenate([o[k] for o in out]) for k in (0, 2, 3))
    return probs.argmax(1), ok, conf


def measure(model_dir: Path, sets: dict) -> dict:
    "Per set and group: `(n, flagged, refused, correct)` counts for the latest version in `model_dir`."
    version = store.latest_version(model_dir)
    if version is None: sys.exit(f"no model published in {model_dir}")
    model = load_model(model_dir, version)
    res = {"version": version, "calibration": model.calibration}
    for name, (groups, labels, x, refused) in sets.items():
        digit, ok, _ = answers(model, x)
        rows = {}
        for g in list(dict.fromkeys(groups.tolist())) + [g for g in refused if g not in groups]:
            m = groups == g
            rows[g] = dict(n=int(m.sum()) + refused.get(g, 0), flagged=int((~ok[m]).sum()), refused=refused.get(g, 0),
                           correct=int(((digit[m] == labels[m]) & ok[m]).sum()) if name != "non-digits" else 0)
        res[name] = rows
    return res


def _total(rows: dict) -> dict:
    return {k: sum(r[k] for r in rows.values()) for k in ("n", "flagged", "refused", "correct")}


def report(results: list[dict], names: list[str]):
    heads = "".join(f" | {n[:34]:>34}" for n in names)
    print(f"\n{'set / group':<30}{heads}")
    print("-" * (30 + 37 * len(names)))
    for r, n in zip(results, names):
        c = r["calibration"]
        print(f"  {n}: version {r['version']}, temperature {c.temperature:.3f}, threshold {c.threshold:.3f}")
    for name, goal in (("non-digits", ">= 80% flagged or refused"), ("MNIST test", "<= 1% flagged"),
                       ("realistic uploads", "<= 3% flagged")):
        print(f"\n{name} (goal: {goal})")
        groups = list(results[0][name])
        for g in groups + ["all"]:
            cells = []
            for r in results:
                t = _total(r[name]) if g == "all" else r[name].get(g)
                if not t: cells.append(f"{'':>34}"); continue
                answered = t["n"] - t["refused"]
                if name == "non-digits":
                    cells.append(f"{(t['flagged'] + t['refused']) / t['n']:>7.1%} of {t['n']:>5} (refused {t['refused'] / t['n']:5.1%})")
                else:
                    cells.append(f"{t['flagged'] / max(answered, 1):>7.2%} of {answered:>5}, right+sure {t['correct'] / max(answered, 1):6.2%}")
            print(f"  {g:<28}" + "".join(f" | {c:>34}" for c in cells))


def speed(model_dir: Path, compare: Path, rounds: int = 400) -> None:
    """The inference thread's work per batch (forward pass and turning logits into answers): today's way (the
    10-output network, plain softmax) against the calibrated network of `model_dir` (11 outputs, `Calibration`),
    interleaved, median per batch size."""
    new, old = (load_model(d, store.latest_version(d)) for d in (model_dir, compare))
    def plain(x):
        probs = torch.softmax(old.net(x).float(), dim=1).numpy()
        return probs
    def calibrated(x):
        probs, not_digit, _, confident = new.calibration(new.net(x))
        return probs, not_digit.tolist(), confident.tolist()
    print(f"\ninference per batch (median of {rounds}; today's: {compare}, plain softmax; now: {model_dir}, calibrated)")
    for n in (1, 8, 32):
        x = torch.rand(n, 1, 28, 28)
        times = {"today": [], "now": []}
        with torch.inference_mode():
            for _ in range(20): plain(x); calibrated(x)
            for _ in range(rounds):
                for name, f in (("today", plain), ("now", calibrated)):
                    t = time.perf_counter(); f(x); times[name].append(time.perf_counter() - t)
        med = {k: sorted(v)[len(v) // 2] * 1e6 for k, v in times.items()}
        print(f"  batch {n:>2}: today {med['today']:8.0f} us, now {med['now']:8.0f} us ({med['now'] / med['today']:.2f}x)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, required=True, help="model store whose `latest` version is measured")
    p.add_argument("--compare", type=Path, action="append", default=[], help="another model store, side by side")
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data", help="folder holding MNIST/raw")
    p.add_argument("--per-kind", type=int, default=400, help="non-digits per kind")
    p.add_argument("--per-condition", type=int, default=100, help="realistic uploads per condition")
    p.add_argument("--test-limit", type=int, default=None, help="MNIST test digits (default: all 10,000)")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--quick", action="store_true", help="60 non-digits per kind, 20 uploads per condition, 1,000 test digits")
    p.add_argument("--speed", action="store_true", help="only time the inference step against the first --compare store")
    a = p.parse_args(argv)
    if a.speed:
        torch.set_num_threads(1)
        return speed(a.model_dir, a.compare[0])
    if a.quick: a.per_kind, a.per_condition, a.test_limit = 60, 20, 1000
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    digits, labels = corpus.mnist(str(a.data_root), "t10k")
    n_test = len(digits) if a.test_limit is None else a.test_limit
    fonts = held_out_fonts()
    print(f"fonts held out from training: {len(fonts)} ({', '.join(sorted({f.stem.split('-')[0] for f in fonts})) or 'none'})")
    sets = {
        "non-digits": prepare((k, -1, d) for k, d in non_digits(a.per_kind, a.seed, fonts, digits)),
        "MNIST test": prepare(("all test digits", int(labels[i]), png(digits[i])) for i in range(n_test)),
        "realistic uploads": prepare(corpus.uploads(digits, labels, per_condition=a.per_condition, seed=a.seed)),
    }
    print(f"corpus prepared in {time.perf_counter() - t0:.0f} s: " +
          ", ".join(f"{k} {len(v[2]) + sum(v[3].values())}" for k, v in sets.items()))
    dirs = [a.model_dir, *a.compare]
    report([measure(d, sets) for d in dirs], [str(d) for d in dirs])


if __name__ == "__main__":
    main()
