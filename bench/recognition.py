#!/usr/bin/env python
"""Recognition benchmark: how well realistic uploads are read, per condition, and what preprocessing costs.

    python bench/recognition.py --model-dir /tmp/recmodels            # 100 uploads per condition
    python bench/recognition.py --model-dir /tmp/recmodels --per-condition 300 --speed-runs 400
    python bench/recognition.py --model-dir /tmp/recmodels --conditions phone_photo --phone-digit 0.06,0.1
                                                # phone photos with smaller digits

The uploads come from `bench/corpus.py`: MNIST *test* digits (never seen in training) turned into photos and
scans on paper (ruled and squared paper, uneven light, tight crops, phone-photo-like pictures, ...), canvas
drawings and odd files, `--per-condition` of each, with settings drawn at random (seed `--seed`).

Every upload is read three ways, all with the SAME trained model (the newest version in `--model-dir`, e.g.
trained with `MNIST_K8S_DATA_ROOT=/work/shared/data mnist-k8s train --model-dir /tmp/recmodels`), so that only
the preprocessing differs:

- `new`: `mnist_k8s.preprocess.preprocess` of the working tree;
- `old`: the same module as committed at `--baseline`, loaded from `git show` at run time; the default,
  `e0d8f49`, is the preprocessing as it was before the rework for real photos and scans (the speed goal's "today");
- `reference`: the reference design's preprocessing (PIL open, convert("L"), resize((28, 28)), / 255; see
  `bench/serve.py`), fed to our model rather than to `bench/reference_net.py`'s.

Digits are read as `/predict` reads them: the model loaded by `mnist_k8s.serving.load_model`, calibrated, the
answer being the likeliest of the 10 digits. Accuracy counts a refusal (`ImageError`, e.g. "blank" 422) as
wrong; the refusals are also shown, and for `new` the share that is right *and* sure, and the share the service
would call "not sure" (`confident: false`). The speed
table gives p50/p90 of the preprocessing alone (decode included) of 1-megapixel phone-photo-like images, new
against old, timed in turns in one process.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import corpus  # noqa: E402

from mnist_k8s import store  # noqa: E402
from mnist_k8s.preprocess import preprocess  # noqa: E402
from mnist_k8s.serving import load_model  # noqa: E402


def baseline_module(rev: str):
    "`mnist_k8s/preprocess.py` as committed at `rev`, imported as a separate module."
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:mnist_k8s/preprocess.py"],
                         check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_preprocess.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("baseline_preprocess", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def reference(data: bytes) -> np.ndarray:
    "The reference design's preprocessing: PIL open, convert('L'), resize((28, 28)), / 255."
    return np.asarray(Image.open(io.BytesIO(data)).convert("L").resize((28, 28)), np.float32) / 255


def load_net(model_dir: Path):
    "The newest model in `model_dir`, loaded as the service loads it (calibration and 'not a digit' output included)."
    version = store.latest_version(model_dir)
    if version is None: sys.exit(f"no model in {model_dir}: train one first (see the module's docstring)")
    return load_model(model_dir, version)


def read(model, fn, uploads) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Digits as the service answers them (-1 where `fn` refused the upload), whether each was refused, and whether
    the service would call its answer "not sure" (`confident: false`)."""
    xs, refused = [], []
    for _, _, data in uploads:
        try: xs.append(fn(data)); refused.append(False)
        except Exception as e:  # the baseline module raises its own ImageError class
            if type(e).__name__ != "ImageError": raise
            xs.append(np.zeros((28, 28), np.float32)); refused.append(True)
    with torch.inference_mode():
        logits = torch.cat([model.net(torch.from_numpy(np.stack(xs[i:i + 256]))[:, None])
                            for i in range(0, len(xs), 256)])
    probs, _, _, confident = model.calibration(logits)   # digits from the 10 digit outputs, as in `/predict`
    refused = np.array(refused)
    return np.where(refused, -1, probs.argmax(1)), refused, ~confident & ~refused


def timings(fns: dict, images: list[bytes], runs: int) -> dict[str, np.ndarray]:
    "Seconds per call of each of `fns` on `images`, timed in turns."
    out = {k: [] for k in fns}
    for i in range(runs):
        data = images[i % len(images)]
        for k, fn in fns.items():
            t = time.perf_counter(); fn(data); out[k].append(time.perf_counter() - t)
    return {k: np.array(v) for k, v in out.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=Path(os.environ.get("MNIST_K8S_MODEL_DIR", "/tmp/recmodels")))
    ap.add_argument("--data-root", type=Path, default=Path(os.environ.get("MNIST_K8S_DATA_ROOT", "/work/shared/data")))
    ap.add_argument("--per-condition", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline", default="e0d8f49",
                    help="git revision of the preprocess.py to compare with (default: before the rework for photos)")
    ap.add_argument("--speed-runs", type=int, default=200)
    ap.add_argument("--conditions", default=",".join(corpus.CONDITIONS))
    ap.add_argument("--phone-digit", default=None, metavar="LO,HI",
                    help="phone photos with the digit LO to HI of the picture's height (default %s)" %
                         ",".join(map(str, corpus.PHONE_DIGIT)))
    a = ap.parse_args(argv)
    if a.phone_digit: corpus.PHONE_DIGIT = tuple(float(v) for v in a.phone_digit.split(","))
    torch.set_num_threads(1)

    model = load_net(a.model_dir)
    old = baseline_module(a.baseline)
    digits, labels = corpus.mnist(a.data_root, "t10k")
    conditions = a.conditions.split(",")
    t = time.perf_counter()
    ups = list(corpus.uploads(digits, labels, a.per_condition, a.seed, conditions))
    print(f"model {model.version} from {a.model_dir}; {len(ups)} uploads ({a.per_condition} per condition, seed {a.seed}) "
          f"made in {time.perf_counter() - t:.0f} s; baseline = preprocess.py at {a.baseline}"
          + (f"; phone photos' digit {a.phone_digit} of the height" if a.phone_digit else "") + "\n")
    cond = np.array([c for c, _, _ in ups]); truth = np.array([y for _, y, _ in ups])
    ways = {"new": preprocess, "old": old.preprocess, "reference": reference}
    res = {k: read(model, fn, ups) for k, fn in ways.items()}

    head = (f"| {'condition':<20} | " + " | ".join(f"{k} correct | {k} refused" for k in ways)
            + " | new right and sure | new not sure |")
    print(head); print("|" + "|".join("---" for _ in head.split("|")[1:-1]) + "|")
    for c in [*conditions, "overall"]:
        m = np.ones(len(ups), bool) if c == "overall" else cond == c
        cells = []
        for k in ways:
            pred, refused, _ = res[k]
            cells += [f"{(pred[m] == truth[m]).mean():.1%}", f"{refused[m].mean():.1%}"]
        pred, _, unsure = res["new"]
        cells += [f"{((pred[m] == truth[m]) & ~unsure[m]).mean():.1%}", f"{unsure[m].mean():.1%}"]
        print(f"| {c:<20} | " + " | ".join(cells) + " |")

    if a.speed_runs <= 0: return                   # --speed-runs 0: accuracy only
    rng = np.random.default_rng(a.seed + 1)
    photos = [corpus.phone_photo_1mp(digits[i], rng) for i in rng.choice(len(digits), 20, replace=False)]
    sizes = {Image.open(io.BytesIO(p)).size for p in photos}
    ts = timings({"new": lambda d: preprocess(d, blank="zeros"), "old": lambda d: old.preprocess(d, blank="zeros")},
                 photos, a.speed_runs)
    print(f"\npreprocessing one 1-megapixel phone-photo-like JPEG ({len(photos)} images, sizes {sorted(sizes)[:3]}..., "
          f"{a.speed_runs} runs each, in turns, one process):")
    print("| code | p50 ms | p90 ms |\n|---|---|---|")
    for k, v in ts.items(): print(f"| {k} | {np.percentile(v, 50) * 1e3:.2f} | {np.percentile(v, 90) * 1e3:.2f} |")
    r = np.percentile(ts["new"], 50) / np.percentile(ts["old"], 50)
    print(f"new p50 / old p50 = {r:.2f}")


if __name__ == "__main__":
    main()
