"""Realistic uploads (bench/corpus.py: photos and scans on ruled and squared paper, shadows, tight crops,
phone-like pictures, canvas drawings, ...) made from the MNIST test digits shipped in tests/data: each
condition is found by `preprocess`, and read by a running `mnist-k8s serve`. The large version of this corpus,
with accuracy per condition against the reference design, is `bench/recognition.py`."""
from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps

from helpers import SAMPLE, encode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import corpus  # noqa: E402

from mnist_k8s.preprocess import ImageError, preprocess  # noqa: E402

DIGITS, LABELS = corpus.mnist(SAMPLE, "t10k")
PER_CONDITION = 6


@pytest.fixture(scope="module")
def uploads() -> list[tuple[str, int, int, bytes]]:
    "(condition, index of the digit, label, bytes): PER_CONDITION of every condition, the same every run."
    rng = np.random.default_rng(11)
    out = []
    for c in corpus.CONDITIONS:
        for i in rng.choice(len(DIGITS), PER_CONDITION, replace=False):
            out.append((c, int(i), int(LABELS[i]), corpus.realistic(DIGITS[i], c, rng)))
    return out


def test_corpus_files_are_what_they_say(uploads):
    kinds = {}
    for c, _, _, data in uploads:
        img = Image.open(io.BytesIO(data))
        kinds.setdefault(c, set()).add((img.format, img.mode))
        if c == "exif_jpeg": assert img.getexif().get(0x0112) in (3, 6, 8)
        if c in ("phone_photo", "grid_photo"): assert max(img.size) >= 600 and img.format == "JPEG"
        if c in ("sticky_note", "tilted_page"): assert max(img.size) >= 500 and img.format == "JPEG"
        if c == "transparent_png": assert img.mode == "RGBA" and np.asarray(img)[..., 3].min() == 0
    assert kinds["canvas"] == {("PNG", "RGBA")} and kinds["transparent_png"] == {("PNG", "RGBA")}
    assert {f for f, _ in kinds["ruled_paper"]} <= {"PNG", "JPEG"}
    rng = lambda: np.random.default_rng(5)
    assert corpus.realistic(DIGITS[0], "squared_paper", rng()) == corpus.realistic(DIGITS[0], "squared_paper", rng())
    with pytest.raises(KeyError, match="unknown condition"): corpus.realistic(DIGITS[0], "napkin", rng())


def test_each_condition_gives_the_clean_digit(uploads):
    """Model-free: the upload comes out close to the clean digit (correlation), and nothing is refused. The
    conditions read only in part (`corpus.PARTLY_READ`) are only held to not being refused: part of a shadow
    still comes out as ink in some of them, even where the model reads the digit right. `bench/recognition.py`
    measures them, and `test_a_pen_shadow_across_the_digit_is_shade` and
    `test_a_pen_shadow_on_an_evenly_lit_page_is_left_out` test what makes them readable."""
    def turned(i, degrees):   # the clean digit, turned as the note or page it is written on (up to 20 and 16 degrees)
        return preprocess(encode(Image.fromarray(DIGITS[i]).rotate(degrees, Image.BILINEAR, expand=True)))
    r = {}
    for c, i, _, data in uploads:
        try: x = preprocess(data)
        except ImageError as e: pytest.fail(f"{c}: digit {i} refused ({e.kind}: {e.message})")
        tilts = range(-20, 21, 4) if c in ("sticky_note", "tilted_page") else (0,)
        r.setdefault(c, []).append(max(float(np.corrcoef(x.ravel(), turned(i, t).ravel())[0, 1]) for t in tilts))
    # thin strokes are redrawn from a skeleton, bold ones dilated: their shapes differ from the original a bit
    low = {c: min(v) for c, v in r.items()
           if c not in corpus.PARTLY_READ and min(v) < (0.4 if c in ("thin_strokes", "dilated_strokes", "thick_marker") else 0.6)}
    assert not low, low


def test_reference_preprocessing_fails_where_ours_reads(uploads):
    "The reference design's resize sees ruled paper, shadows and phone photos as a grey mess (a sanity check)."
    def reference(data):
        return np.asarray(Image.open(io.BytesIO(data)).convert("L").resize((28, 28)), np.float32) / 255
    for c, i, _, data in uploads:
        if c in ("ruled_paper", "phone_photo", "uneven_light"):
            clean = preprocess(encode(Image.fromarray(DIGITS[i])))
            assert np.corrcoef(reference(data).ravel(), clean.ravel())[0, 1] < 0.5, (c, i)


@pytest.mark.server
@pytest.mark.slow
def test_server_reads_every_condition(server, uploads):
    """Post every upload to a running `mnist-k8s serve` (the session's model: one epoch on the sample), and the
    clean digit it was made from. The model is weak, so each upload is held to what it reads in the clean digit:
    a different answer means that the upload's preprocessing lost the digit."""
    def read(name, data, fmt):
        r = server.post("/predict", files={"file": (f"{name}.{fmt.lower()}", data, f"image/{fmt.lower()}")})
        return r.json()["digit"] if r.status_code == 200 else (r.status_code, r.text[:200])
    clean = {i: read("clean", encode(Image.fromarray(DIGITS[i])), "PNG") for _, i, _, _ in uploads}
    wrong, differ, refused = [], [], []
    for c, i, label, data in uploads:
        digit = read(c, data, Image.open(io.BytesIO(data)).format)
        if not isinstance(digit, int): refused.append((c, i, digit)); continue
        if digit != label: wrong.append((c, i, label, digit))
        if digit != clean[i]: differ.append((c, i, clean[i], digit))
    assert not refused, refused
    # a model trained for one epoch on 4,000 digits reads about 93% of MNIST's own test digits
    assert len(wrong) <= 0.15 * len(uploads), wrong
    assert len(differ) <= 0.1 * len(uploads), differ
    per = {c: sum(d[0] == c for d in differ) for c in corpus.CONDITIONS}
    assert max(per.values()) <= PER_CONDITION // 2, per   # garbage would change about 9 answers in 10


def _correlation(data: bytes, i: int, fn=preprocess) -> float:
    return float(np.corrcoef(fn(data).ravel(), preprocess(encode(Image.fromarray(DIGITS[i]))).ravel())[0, 1])


def _read(data: bytes, i: int) -> float:
    "`_correlation`, or -1 when the upload is refused (as blank)."
    try: return _correlation(data, i)
    except ImageError: return -1.0


@pytest.mark.parametrize("covered", [0.55, 0.7, 0.85])
def test_a_shadow_over_most_of_the_border_is_not_ink(covered):
    """A shadow's edge crossing the digit, the shade over most of the page: the border's median is then the
    shadow's grey, and the lit paper outweighs the ink. Dark ink on shaded paper is still found."""
    rng = np.random.default_rng(3)
    for i in range(8):
        a = corpus.shape(DIGITS[i], 160, rng, 0.3)
        page = np.full((320, 320), 225.0)
        page[80:80 + a.shape[0], 110:110 + a.shape[1]] -= 190 * a
        x = np.arange(320, dtype=float)
        page *= 1 - 0.62 * (1 / (1 + np.exp(-(x - 320 * (1 - covered)) / 8)))[None, :]   # shade on the right
        data = encode(Image.fromarray(np.clip(page + rng.normal(0, 3, page.shape), 0, 255).astype(np.uint8)))
        assert _correlation(data, i) > 0.6, (covered, i)


def _page(i: int, rng: np.random.Generator, height: int = 80) -> tuple[np.ndarray, np.ndarray]:
    "MNIST digit `i`, `height` px high, written at (120, 120) on a 320 px page; the page (float) and the digit's coverage."
    a = corpus.shape(DIGITS[i], height, rng, 0.0)
    page = np.full((320, 320), 225.0)
    page[120:120 + a.shape[0], 120:120 + a.shape[1]] -= 190 * a
    return page, a


def _photo(page: np.ndarray, pen: np.ndarray, depth: float, rng: np.random.Generator, light=1.0) -> bytes:
    "`page` under a pen's hard shadow (where `pen` is true, its edge blurred over 1.5 px) `depth` darker, lit by `light`, noisy."
    shade = np.asarray(Image.fromarray(pen.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(1.5)), float) / 255
    page = page * (1 - depth * shade) * light
    return encode(Image.fromarray(np.clip(page + rng.normal(0, 3, page.shape), 0, 255).astype(np.uint8)))


def _under_a_pen(i: int, rng: np.random.Generator, bar: float = 30, height: int = 80) -> bytes:
    "MNIST digit `i` on a page lit from the right, with a pen's hard shadow `bar` px wide across it from the right."
    page, a = _page(i, rng, height)
    yy, xx = np.mgrid[0:320, 0:320].astype(float)
    t = math.radians(rng.uniform(-20, 20))
    cy, cx = 120 + a.shape[0] * rng.uniform(0.3, 0.7), 120 + a.shape[1] / 2
    across = (yy - cy) * math.cos(t) - (xx - cx) * math.sin(t)
    along = (xx - cx) * math.cos(t) + (yy - cy) * math.sin(t)
    return _photo(page, (abs(across) < bar / 2) & (along > -a.shape[1]), 0.5, rng, 0.6 + 0.4 * xx / 320)


def test_a_pen_shadow_across_the_digit_is_shade():
    """A pen's hard shadow across the digit, on a page lit unevenly: wider than the strokes, it is shade, not
    ink (with the paper judged over a fifth of the picture, every one of these read as a bar: median 0.1)."""
    rng = np.random.default_rng(5)
    r = [_correlation(_under_a_pen(i, rng), i) for i in range(12)]
    assert np.median(r) > 0.85 and sum(x <= 0.6 for x in r) <= 1, np.round(r, 2)


def _pen_to_the_digit(i: int, rng: np.random.Generator, height: int = 80) -> bytes:
    """MNIST digit `i` on an evenly lit page, with the hard shadow of a pen held over it (8 to 24 px wide, 35-55%
    darker) coming in from beyond the picture's side, in any direction, its tip on the digit."""
    page, a = _page(i, rng, height)
    yy, xx = np.mgrid[0:320, 0:320].astype(float)
    t = rng.uniform(0, 2 * math.pi)
    ty, tx = 120 + a.shape[0] * rng.uniform(0.2, 0.8), 120 + a.shape[1] * rng.uniform(0.2, 0.8)
    along = (xx - tx) * math.cos(t) + (yy - ty) * math.sin(t)
    across = (yy - ty) * math.cos(t) - (xx - tx) * math.sin(t)
    pen = (abs(across) < rng.uniform(4, 12)) & (along > 0)
    return _photo(page, pen, rng.uniform(0.35, 0.55), rng)


def test_a_pen_shadow_on_an_evenly_lit_page_is_left_out():
    """A pen's shadow from beyond the picture's side to the digit, on an evenly lit page: the page does not
    look unevenly lit, so the shadow is found by its contrast (`_shadow`), and the digit is read without it.
    Before, 23 to 32 of 40 came out at 0.6 or below (four seeds); now 1 to 6."""
    rng = np.random.default_rng(3)
    r = [_correlation(_pen_to_the_digit(i, rng), i) for i in range(40)]
    assert np.median(r) > 0.8 and sum(x <= 0.6 for x in r) <= 8, np.round(r, 2)


def test_bold_ink_cut_by_the_frame_is_not_a_shadow():
    """Tight crops of bold dark ink touching the edges, covering up to 60% of the frame: the ink is not taken
    for paper under a shadow. (Beyond that, bold dark ink over most of the border looks like a light digit on a
    dark page, which is what MNIST-style drawings are.)"""
    rng = np.random.default_rng(4)
    tried, poor = 0, []
    for i in range(len(DIGITS)):
        a = corpus.shape(DIGITS[i], int(rng.integers(60, 200)), rng, 0.9)
        ys, xs = np.nonzero(a > 0.02)
        a = a[ys.min() + 2:ys.max() - 1, xs.min() + 2:xs.max() - 1]   # framed to the ink, a little cut off
        if a.mean() > 0.6: continue
        page = 220.0 - 190 * a
        data = encode(Image.fromarray(np.clip(page + rng.normal(0, 3, page.shape), 0, 255).astype(np.uint8)))
        tried += 1
        if _correlation(data, i) <= 0.6: poor.append(i)
    assert tried >= 500 and len(poor) <= 0.02 * tried, (tried, poor)


def test_a_markers_digit_cropped_to_its_ink_is_not_a_shadow():
    """A digit drawn with a marker (strokes up to a quarter of its width), enlarged with soft edges and cropped
    to its ink, reads as the same digit with paper around it. Before the paper's window was made twice as wide
    as the boldest strokes, 44 of these 200 came out as their stroke edges or were refused (at 0.6 or below; 9 now)."""
    rng = np.random.default_rng(7)
    r = []
    for i in range(200):
        s, k = int(rng.integers(100, 300)), int(rng.choice([3, 5, 7]))
        a = Image.fromarray(255 - DIGITS[i]).resize((s, s), Image.BICUBIC).filter(ImageFilter.MinFilter(k * s // 56 | 1))
        ys, xs = np.nonzero(np.asarray(a) < 195)
        tight = np.asarray(a)[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        framed = preprocess(encode(Image.fromarray(np.pad(tight, 20, constant_values=255))))
        try: r.append(float(np.corrcoef(preprocess(encode(Image.fromarray(tight))).ravel(), framed.ravel())[0, 1]))
        except ImageError: r.append(-1.0)   # refused as blank: the strokes taken for the paper
    assert np.median(r) > 0.95 and sum(x <= 0.6 for x in r) <= 12, (np.median(r), sorted(r)[:12])


def test_a_small_digit_in_a_photo_is_read_from_more_pixels(monkeypatch):
    """Phone photos with the digit 1/16 to 1/10 of the picture's height: a JPEG is decoded at about 256 px, where
    the digit spans 10 to 25 px, so it is read again from the picture decoded larger (before: median 0.79)."""
    monkeypatch.setattr(corpus, "PHONE_DIGIT", (0.06, 0.1))
    rng = np.random.default_rng(4)
    r = [_correlation(corpus.realistic(DIGITS[i], "phone_photo", rng), i) for i in rng.choice(len(DIGITS), 16, replace=False)]
    assert np.median(r) > 0.88 and min(r) > 0.6, np.round(r, 2)


def _tilted_ruling(i: int, rng: np.random.Generator) -> bytes:
    "MNIST digit `i` written with a pen on a page ruled (odd `i`: squared), its lines 6 to 12 degrees off level: a scan."
    img, a, x, y, ink = corpus._on_paper(DIGITS[i], rng, size_frac=(0.25, 0.45), canvas=(300, 700), weight=(-0.4, 0.2),
                                         rotate=0)
    corpus._ruling(img, rng, grid=bool(i % 2), tilt=float(rng.choice([-1, 1]) * rng.uniform(6, 12)))
    corpus._place(img, a, x, y, ink)
    return corpus._photo_file(img + rng.normal(0, 3, img.shape), rng)


def test_lines_of_a_page_at_an_angle_are_found():
    """Ruled and squared pages photographed or scanned at an angle: their lines are levelled before they are looked
    for (`_slope`), so that they are found and left out (before: 2 to 7 of 16 read with a mesh or bars, over three
    seeds; median 0.82 to 0.94)."""
    rng = np.random.default_rng(1)
    r = [_correlation(_tilted_ruling(i, rng), i) for i in range(16)]
    assert np.median(r) > 0.9 and min(r) > 0.6, np.round(r, 2)


def _cropped_marker(i: int, rng: np.random.Generator) -> bytes:
    "MNIST digit `i` in marker (strokes about a sixth of its height) on a page lit from one side, cropped to its ink: a JPEG."
    img, a, x, y, ink = corpus._on_paper(DIGITS[i], rng, size_frac=(0.3, 0.5), canvas=(400, 700), weight=(0.5, 0.9), rotate=0)
    a = corpus._grow(a, a.shape[0] // 25)
    corpus._place(img, a, x, y, ink)
    h, w = img.shape[:2]
    img = img * corpus._light(h, w, rng, rng.uniform(0.3, 0.5), "gradient")[..., None] + rng.normal(0, 3, img.shape)
    ys, xs = np.nonzero(a > 0.3)
    m = int(0.03 * a.shape[0])
    box = (max(0, x + xs.min() - m), max(0, y + ys.min() - m), min(w, x + xs.max() + 1 + m), min(h, y + ys.max() + 1 + m))
    return encode(Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8)).crop(box), "JPEG", quality=85)


def test_a_markers_digit_cropped_from_a_photo_keeps_its_strokes():
    """A tight crop of a photographed marker digit: its strokes are wider than a fifth of the picture, and a closing
    that narrow took their middles for paper (median 0.32 to 0.43 over three seeds, 10 to 12 of 16 lost). The window
    now spans twice the darkest strokes (4 to 6 of 16 still lost), and the paper's level is corrected by the
    lower quartile of its excess, not the median, which was the ink's contrast where the ink covers most of the
    crop (none lost; median 0.75 to 0.77). With the light even, these read 0.76 (median): strokes this bold are
    not MNIST's."""
    rng = np.random.default_rng(1)
    r = [_read(_cropped_marker(i, rng), i) for i in range(16)]
    assert np.median(r) > 0.7 and min(r) > 0.6, np.round(r, 2)


def _ballpoint(i: int, rng: np.random.Generator) -> bytes:
    """MNIST digit `i`, 1/8 to 1/5 of a 1600 x 1200 page high, drawn with a ballpoint 1 or 2 px wide (its centre
    lines), photographed under light falling off across the page (`corpus._photo_finish`): a JPEG."""
    h = int(1200 * rng.uniform(1 / 8, 1 / 5))
    line = corpus._skeleton(corpus.shape(DIGITS[i], h, rng, 0.0))
    if rng.random() < 0.5: line = np.maximum(line, np.roll(line, 1, axis=1))   # 2 px wide
    page = np.full((1200, 1600, 3), 215.0)
    y, x = int(rng.integers(100, 1100 - h)), int(rng.integers(100, 1500 - line.shape[1]))
    page[y:y + line.shape[0], x:x + line.shape[1]] -= rng.uniform(110, 170) * line[..., None]
    light = corpus._light(1200, 1600, rng, rng.uniform(0.1, 0.35), "gradient")
    return corpus._photo_finish(page, rng, light, noise=(2, 4), blur=(0.4, 0.8), quality=(70, 92))


def test_a_ballpoint_line_in_a_big_photo_is_found():
    """A digit written with a ballpoint in a 1600 x 1200 photo: decoded at 400 px (a JPEG's draft) and analysed
    at about 130 px under the uneven light, its strokes keep a twelfth to a sixth of their contrast, and the
    photo came out blank (15 or 16 of 16 refused, three seeds). Looked at again with each block's darkest pixel
    kept (`_thin`), 0 or 1 of 16 are refused."""
    rng = np.random.default_rng(2)
    r = [_read(_ballpoint(i, rng), i) for i in range(16)]
    assert np.median(r) > 0.75 and sum(x <= 0.6 for x in r) <= 2, np.round(r, 2)


def _on_coloured_squares(i: int, rng: np.random.Generator) -> bytes:
    """MNIST digit `i`, 1/6 to 1/4 of a 1200 x 900 page high, drawn with a ballpoint 1 or 2 px wide in black or
    blue-black, on paper squared in blue (even `i`) or green (odd) every 3 to 5% of its height: a phone photo (JPEG).
    Decoded at a quarter of its size, the lines are as dark as the strokes."""
    H, W = 1200, 900
    h = int(H * rng.uniform(1 / 6, 1 / 4))
    line = corpus._skeleton(corpus.shape(DIGITS[i], h, rng, 0.0))
    if rng.random() < 0.5: line = np.maximum(line, np.roll(line, 1, axis=1))   # 2 px wide
    page = np.full((H, W, 3), 228.0)
    spacing, thick, tilt = rng.uniform(0.03, 0.05) * H, rng.uniform(1.2, 2.0), rng.uniform(-2, 2)
    cover = np.maximum(corpus._lines(H, W, spacing, thick, tilt, rng.uniform(0, spacing)),
                       corpus._lines(W, H, spacing, thick, -tilt, rng.uniform(0, spacing)).T)
    colour = [(rng.uniform(80, 130), rng.uniform(140, 180), rng.uniform(215, 235)),    # blue
              (rng.uniform(110, 150), rng.uniform(185, 210), rng.uniform(130, 160))][i % 2]   # green
    corpus._lay(page, cover, colour)
    y, x = int(rng.integers(100, H - 100 - h)), int(rng.integers(100, W - 100 - line.shape[1]))
    corpus._lay(page[y:y + line.shape[0], x:x + line.shape[1]], line, [(30, 30, 35), (35, 45, 100)][int(rng.integers(2))])
    light = corpus._light(H, W, rng, rng.uniform(0.1, 0.3), "gradient")
    return corpus._photo_finish(page, rng, light, noise=(2, 4), blur=(0.4, 0.8), quality=(75, 92))


def test_a_ballpoint_on_coloured_squares_is_read_where_the_lines_fade():
    """A thin pen's digit on blue or green squared paper: in grey, clearing the lines took the strokes along
    them, and pieces of the squares were read as the digit (median 0.43 to 0.44 over three seeds, 9 or 10 of 16
    at 0.6 or below). Read in the channel where the lines fade (`_in_channel`): median 0.78 to 0.82, 3 or 4."""
    rng = np.random.default_rng(1)
    r = [_read(_on_coloured_squares(i, rng), i) for i in range(16)]
    assert np.median(r) > 0.7 and sum(x <= 0.6 for x in r) <= 5, np.round(r, 2)


def _worksheet(i: int, rng: np.random.Generator) -> bytes:
    """MNIST digit `i`, 7 to 10% of a 1200 x 900 worksheet high, in blue-black ink, with three blanks to fill in
    (lines 150 to 400 px long, 3 px wide) elsewhere on the page: a phone photo (JPEG)."""
    H, W = 1200, 900
    page = np.full((H, W, 3), 232.0)
    h = int(H * rng.uniform(0.07, 0.1))
    a = corpus.shape(DIGITS[i], h, rng, 0.0)
    y, x = int(rng.integers(150, H - 150 - h)), int(rng.integers(150, W - 150 - a.shape[1]))
    blanks = []
    while len(blanks) < 3:
        x0, y0, n = rng.uniform(60, 400), rng.uniform(80, 1100), rng.uniform(150, 400)
        if x0 - 40 < x + a.shape[1] and x0 + n + 40 > x and y - 40 < y0 < y + h + 40: continue   # clear of the digit
        blanks.append((x0, y0, n))
    cover = corpus._drawn(H, W, lambda d, s: [d.line([(s * x0, s * y0), (s * (x0 + n), s * (y0 + 3))], fill=255,
                                                     width=3 * s) for x0, y0, n in blanks])
    corpus._lay(page, cover, (40, 40, 45))
    corpus._lay(page[y:y + a.shape[0], x:x + a.shape[1]], a, (30, 40, 90))
    light = corpus._light(H, W, rng, rng.uniform(0.05, 0.25), "gradient")
    return corpus._photo_finish(page, rng, light, noise=(2, 4), blur=(0.4, 0.8), quality=(75, 92))


def test_a_small_digit_among_blanks_to_fill_in_is_the_digit():
    """A worksheet's blanks hold more ink than a small digit: one was read instead of it (1 to 3 of 16 over three
    seeds). A mark four times wider than tall is now taken only when nothing else is left (0 or 1 of 16)."""
    rng = np.random.default_rng(3)
    r = [_correlation(_worksheet(i, rng), i) for i in range(16)]
    assert np.median(r) > 0.9 and sum(x <= 0.6 for x in r) <= 1, np.round(r, 2)


def _on_ruled_with_margin(i: int, rng: np.random.Generator) -> bytes:
    """MNIST digit `i`, 8 to 14% of a 1200 x 900 notebook page high, with a ballpoint 1 or 2 px wide in black or
    blue-black, on paper ruled in light blue every 4 to 6% of its height with a red margin: a phone photo (JPEG)."""
    H, W = 1200, 900
    h = int(H * rng.uniform(0.08, 0.14))
    line = corpus._skeleton(corpus.shape(DIGITS[i], h, rng, 0.0))
    if rng.random() < 0.5: line = np.maximum(line, np.roll(line, 1, axis=1))   # 2 px wide
    page = np.full((H, W, 3), 230.0)
    spacing, tilt = rng.uniform(0.04, 0.06) * H, rng.uniform(-2, 2)
    corpus._lay(page, corpus._lines(H, W, spacing, rng.uniform(1.2, 2.0), tilt, rng.uniform(0, spacing)),
                (rng.uniform(90, 140), rng.uniform(150, 190), rng.uniform(215, 235)))
    margin = int(W * rng.uniform(0.08, 0.15))
    corpus._lay(page, corpus._lines(W, H, W, rng.uniform(1.5, 2.5), -tilt, margin).T,
                (rng.uniform(215, 235), rng.uniform(90, 130), rng.uniform(100, 140)))
    y, x = int(rng.integers(100, H - 100 - h)), int(rng.integers(margin + 60, W - 60 - line.shape[1]))
    corpus._lay(page[y:y + line.shape[0], x:x + line.shape[1]], line, [(30, 30, 35), (35, 45, 100)][int(rng.integers(2))])
    light = corpus._light(H, W, rng, rng.uniform(0.1, 0.3), "gradient")
    return corpus._photo_finish(page, rng, light, noise=(2, 4), blur=(0.4, 0.8), quality=(75, 92))


def test_a_ballpoint_on_a_notebook_page_is_not_its_margin():
    """In the blue channel, where a notebook's lines fade, its red margin stays dark and alone, and was read as a
    "1"; the lines' pieces left there were joined to the digit. Over four seeds, at 41106e1: median 0.36 to 0.80,
    3 to 10 of 16 at 0.6 or below. Read with the page known to be ruled, and grey's digit kept when the channel's
    is that digit with the lines' pieces (`_joined`): median 0.84 to 0.90, 1 to 3."""
    rng = np.random.default_rng(4)
    r = [_read(_on_ruled_with_margin(i, rng), i) for i in range(16)]
    assert np.median(r) > 0.8 and sum(x <= 0.6 for x in r) <= 3, np.round(r, 2)


def _flashed(i: int, rng: np.random.Generator) -> bytes:
    """MNIST digit `i`, 6 to 12% of a 1200 x 900 page high, in pencil or a light ballpoint (50 to 90 grey levels
    below the paper), 1 px wide (2 px in a third), away from the middle of a phone photo taken with its flash:
    the middle 13 to 28% brighter than the border (JPEG)."""
    H, W = 900, 1200
    h = int(H * rng.uniform(0.06, 0.12))
    line = corpus._skeleton(corpus.shape(DIGITS[i], h, rng, 0.0))
    if rng.random() < 1 / 3: line = np.maximum(line, np.roll(line, 1, axis=1))   # 2 px wide
    paper = rng.uniform(220, 240)
    page = np.full((H, W, 3), paper)
    while True:   # away from the middle, where the flash is
        y, x = int(rng.integers(60, H - 60 - h)), int(rng.integers(60, W - 60 - line.shape[1]))
        if math.hypot((x - W / 2) / W, (y - H / 2) / H) > 0.25: break
    d = rng.uniform(50, 90)
    ink = [(paper - d,) * 3, (paper - 1.3 * d, paper - 1.1 * d, paper - 0.4 * d)][int(rng.integers(2))]
    corpus._lay(page[y:y + line.shape[0], x:x + line.shape[1]], line, ink)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    s = rng.uniform(0.2, 0.4) * math.hypot(W, H) / 2
    light = 0.9 + rng.uniform(0.12, 0.25) * np.exp(-((xx - W / 2) ** 2 + (yy - H / 2) ** 2) / (2 * s * s))
    return corpus._photo_finish(page, rng, light.astype(np.float32), vignette=(0, 0.05), noise=(2, 4),
                                blur=(0.4, 0.8), quality=(75, 92))


def test_a_faint_digit_photographed_with_a_flash_is_not_the_flash():
    """A flash lights the middle of the page, over a patch far larger than a small digit, and a faint pen keeps
    almost no contrast at the working size: the bright patch was read as bright ink, a "0". Over seeds 0 to 7,
    at d2a468f: median 0.56 to 0.86, 2 to 10 of 16 at 0.6 or below. With a border as bright as paper taken
    for paper with dark ink: median 0.77 to 0.90, 0 to 3."""
    rng = np.random.default_rng(1)
    r = [_read(_flashed(i, rng), i) for i in range(16)]
    assert np.median(r) > 0.8 and sum(x <= 0.6 for x in r) <= 3, np.round(r, 2)
