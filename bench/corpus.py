"""Realistic uploads made from MNIST digits: photos and scans of a digit on paper, canvas drawings, odd files.

Not part of mnist-k8s: the recognition benchmark (`bench/recognition.py`) and the tests draw their inputs from
here. Each condition turns one MNIST digit (28x28 uint8, white ink on black, as in the IDX files) into the
bytes of an image file, with its settings drawn from `rng` (line spacing and colour, shadow direction and depth,
crop margin, digit size and position, rotation, noise, JPEG quality, ...):

    import numpy as np, corpus                       # with bench/ on sys.path
    data = corpus.realistic(digit, "ruled_paper", np.random.default_rng(0))   # bytes of a PNG or JPEG
    for condition, label, data in corpus.uploads(digits, labels, per_condition=100, seed=0): ...

`CONDITIONS` lists them; `PARTLY_READ` names those that mnist-k8s reads only in part. The label of the upload
is the label of the digit: no condition changes which digit it shows (tight crops cut at most a few percent of
the digit's size off its edges).
"""
from __future__ import annotations

import io
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["CONDITIONS", "PARTLY_READ", "PHONE_DIGIT", "realistic", "uploads", "mnist", "shape", "phone_photo_1mp"]

# ------------------------------------------------------------------ the digit's shape at any size

def shape(digit: np.ndarray, height: int, rng: np.random.Generator, weight: float = 0.0) -> np.ndarray:
    """The ink coverage (float32 in [0, 1]) of `digit` cropped to its ink and scaled to `height` px, with
    pen-like edges. `weight` thickens (> 0) or thins (< 0) the stroke: -1 .. 1 moves the edge threshold."""
    d = np.asarray(digit, np.uint8)
    ys, xs = np.nonzero(d > 30)
    d = d[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    s = height / d.shape[0]
    w = max(1, round(d.shape[1] * s))
    pad = 2
    big = Image.fromarray(np.pad(d, pad)).resize((w + round(2 * pad * s), height + round(2 * pad * s)), Image.BICUBIC)
    a = np.asarray(big, np.float32) / 255
    thr = float(np.clip(0.45 - 0.3 * weight, 0.08, 0.92))
    soft = max(0.5 / max(s, 1.0), 0.02)   # about one output pixel of anti-aliasing
    return np.clip((a - thr) / (2 * soft) + 0.5, 0, 1).astype(np.float32)


def _fit(a: np.ndarray) -> np.ndarray:
    "`a` cropped to its non-zero pixels."
    ys, xs = np.nonzero(a > 0.02)
    return a[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _rotate(a: np.ndarray, degrees: float) -> np.ndarray:
    img = Image.fromarray(np.rint(a * 255).astype(np.uint8)).rotate(degrees, Image.BILINEAR, expand=True)
    return _fit(np.asarray(img, np.float32) / 255)


def _grow(a: np.ndarray, px: int) -> np.ndarray:
    "Thicken (px > 0) or thin (px < 0) the strokes of coverage `a` by about |px| pixels on each side."
    if px == 0: return a
    img = Image.fromarray(np.rint(np.pad(a, abs(px) + 1) * 255).astype(np.uint8))
    f = ImageFilter.MaxFilter if px > 0 else ImageFilter.MinFilter
    for _ in range(abs(px)): img = img.filter(f(3))
    return np.asarray(img, np.float32) / 255

# ------------------------------------------------------------------ paper, light, noise, files

def _paper(h: int, w: int, colour) -> np.ndarray:
    return np.broadcast_to(np.asarray(colour, np.float32), (h, w, 3)).copy()


def _lines(h: int, w: int, spacing: float, thickness: float, degrees: float, offset: float) -> np.ndarray:
    "Coverage of parallel straight lines (anti-aliased), `degrees` off horizontal."
    t = math.radians(degrees)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    d = np.mod(y * math.cos(t) - x * math.sin(t) - offset, spacing)
    d = np.minimum(d, spacing - d)
    return np.clip(thickness / 2 + 0.5 - d, 0, 1)


def _drawn(h: int, w: int, paint) -> np.ndarray:
    "Coverage (float32 in [0, 1]) of what `paint(draw, s)` draws on an h x w page scaled by s: drawn at 4x, then averaged (anti-aliased)."
    s = 4
    canvas = Image.new("L", (w * s, h * s), 0)
    paint(ImageDraw.Draw(canvas), s)
    return np.asarray(canvas.reduce(s), np.float32) / 255


def _lay(img: np.ndarray, cover: np.ndarray, colour) -> None:
    "Lay ink of `colour` with coverage `cover` on `img` (in place)."
    c = cover[..., None]
    img *= 1 - c
    img += c * np.asarray(colour, np.float32)


def _place(img: np.ndarray, a: np.ndarray, x: int, y: int, colour) -> None:
    "Ink the coverage `a` onto `img` with its top-left corner at (x, y), clipped to the image."
    h, w = img.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + a.shape[1], w), min(y + a.shape[0], h)
    if x1 <= x0 or y1 <= y0: return
    sub = img[y0:y1, x0:x1]
    _lay(sub, a[y0 - y:y1 - y, x0 - x:x1 - x], colour)


def _light(h: int, w: int, rng: np.random.Generator, depth: float, kind: str) -> np.ndarray:
    "An illumination field in [1 - depth, 1]: a gradient, a shadow with a soft edge, or a dim corner."
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    t = rng.uniform(0, 2 * math.pi)
    u = ((x - w / 2) * math.cos(t) + (y - h / 2) * math.sin(t)) / max(h, w)   # -0.7 .. 0.7 along a direction
    if kind == "gradient":
        f = np.clip(u + 0.5, 0, 1)
    elif kind == "edge":   # a shadow's edge across the page, soft over 1..15% of the image
        f = 1 / (1 + np.exp(-(u - rng.uniform(-0.25, 0.25)) / rng.uniform(0.01, 0.15)))
    else:                  # a spot of light: the far side dim
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        f = np.clip(1 - np.hypot(x - cx, y - cy) / (1.2 * max(h, w)), 0, 1)
    return (1 - depth * f).astype(np.float32)


def _encode(img: np.ndarray | Image.Image, fmt: str = "PNG", **kw) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def _photo_file(img: np.ndarray, rng: np.random.Generator, quality: tuple[int, int] = (40, 92)) -> bytes:
    "A PNG or a JPEG of quality in `quality`."
    if rng.random() < 0.3: return _encode(img)
    return _encode(img, "JPEG", quality=int(rng.integers(*quality)))


def _ink(rng: np.random.Generator, kind: str = "any"):
    "An RGB ink colour: black-ish, ballpoint blue, or (for 'any') either."
    if kind == "blue" or (kind == "any" and rng.random() < 0.4):
        return (rng.uniform(10, 60), rng.uniform(30, 90), rng.uniform(120, 200))
    v = rng.uniform(5, 60)
    return (v, v, v)


def _paper_colour(rng: np.random.Generator, lo: float = 215, hi: float = 255):
    v = rng.uniform(lo, hi)
    return (v, v * rng.uniform(0.97, 1.0), v * rng.uniform(0.9, 1.0))   # white to slightly warm


def _on_paper(digit, rng, size_frac=(0.45, 0.8), canvas=(200, 700), weight=(-0.3, 0.6), paper=None, ink=None,
              rotate=4.0):
    "A digit on paper: the image as float RGB, and the digit's coverage placed in it (for later layers)."
    H = int(rng.integers(*canvas))
    W = int(H * rng.uniform(0.75, 1.35))
    a = shape(digit, max(8, round(H * rng.uniform(*size_frac))), rng, rng.uniform(*weight))
    if rotate: a = _rotate(a, rng.uniform(-rotate, rotate))
    H, W = max(H, a.shape[0] + 4), max(W, a.shape[1] + 4)   # the whole digit on the page (a cut one is a tight crop)
    x = int(rng.integers(1, max(2, W - a.shape[1] - 1)))
    y = int(rng.integers(1, max(2, H - a.shape[0] - 1)))
    img = _paper(H, W, paper or _paper_colour(rng))
    return img, a, x, y, ink or _ink(rng)

# ------------------------------------------------------------------ the conditions

def _blue_ink(digit, rng):
    img, a, x, y, ink = _on_paper(digit, rng, ink=_ink(rng, "blue"))
    _place(img, a, x, y, ink)
    return _photo_file(img + rng.normal(0, 3, img.shape), rng)


def _pencil(digit, rng):
    img, a, x, y, _ = _on_paper(digit, rng, weight=(-0.4, 0.3))
    grain = np.clip(rng.normal(rng.uniform(0.5, 0.8), 0.2, a.shape), 0, 1).astype(np.float32)  # graphite on paper fibres
    a = a * grain
    v = rng.uniform(60, 130)
    _place(img, a, x, y, (v, v, v * 1.05))
    return _photo_file(img, rng)


def _low_res_blur(digit, rng):
    H = int(rng.integers(24, 72))
    img, a, x, y, ink = _on_paper(digit, rng, size_frac=(0.5, 0.85), canvas=(H, H + 1), weight=(0, 0.7), rotate=0)
    _place(img, a, x, y, ink)
    out = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.8)))
    return _photo_file(np.asarray(out, np.float32), rng, (60, 95))


def _sensor_noise(digit, rng):
    img, a, x, y, ink = _on_paper(digit, rng)
    _place(img, a, x, y, ink)
    img += rng.normal(0, rng.uniform(8, 35), img.shape[:2])[..., None] + rng.normal(0, 6, img.shape)
    if rng.random() < 0.5:   # salt and pepper
        m = rng.random(img.shape[:2]) < rng.uniform(0.002, 0.02)
        img[m] = rng.choice([0.0, 255.0], size=(int(m.sum()), 1))
    return _photo_file(img, rng, (70, 95))


def _thick_marker(digit, rng):
    img, a, x, y, ink = _on_paper(digit, rng, weight=(0.5, 0.9))
    a = _grow(a, int(rng.integers(1, max(2, a.shape[0] // 25))))
    _place(img, a, x, y, ink)
    return _photo_file(img, rng)


def _ruling(img, rng, grid: bool, faint: bool = False, tilt: float | None = None):
    "Ruled (or squared) lines on `img`, in place, `tilt` degrees off level (default: up to 2.5); `faint`: between a quarter and four fifths as dark as usual."
    h, w = img.shape[:2]
    colour = [(rng.uniform(90, 160), rng.uniform(130, 190), rng.uniform(200, 240)),   # blue
              (v := rng.uniform(110, 190), v, v),                                      # grey
              (rng.uniform(200, 240), rng.uniform(80, 150), rng.uniform(80, 150)),     # red
              (rng.uniform(100, 170), rng.uniform(170, 210), rng.uniform(120, 180))][int(rng.integers(4))]  # green
    spacing = rng.uniform(0.05, 0.09 if grid else 0.2) * h
    thick = rng.uniform(0.8, 2.5) * max(1.0, h / 500)
    if tilt is None: tilt = rng.uniform(-2.5, 2.5)
    cover = _lines(h, w, spacing, thick, tilt, rng.uniform(0, spacing))
    if grid:
        cover = np.maximum(cover, _lines(w, h, spacing, thick, -tilt, rng.uniform(0, spacing)).T)
    elif rng.random() < 0.4:   # a margin line
        cover = np.maximum(cover, _lines(w, h, w * 2, thick * 1.3, -tilt, rng.uniform(0.05, 0.2) * w).T)
    if faint: cover *= rng.uniform(0.25, 0.8)
    _lay(img, cover, colour)


def _ruled_paper(digit, rng):
    img, a, x, y, ink = _on_paper(digit, rng, size_frac=(0.3, 0.7), canvas=(200, 900))
    _ruling(img, rng, grid=False)
    _place(img, a, x, y, ink)
    return _photo_file(img + rng.normal(0, 3, img.shape), rng)


def _squared_paper(digit, rng):
    img, a, x, y, ink = _on_paper(digit, rng, size_frac=(0.3, 0.7), canvas=(200, 900))
    _ruling(img, rng, grid=True)
    _place(img, a, x, y, ink)
    return _photo_file(img + rng.normal(0, 3, img.shape), rng)


def _uneven_light(digit, rng):
    img, a, x, y, ink = _on_paper(digit, rng, size_frac=(0.35, 0.8))
    _place(img, a, x, y, ink)
    h, w = img.shape[:2]
    img *= _light(h, w, rng, rng.uniform(0.3, 0.7), ["gradient", "edge", "spot"][int(rng.integers(3))])[..., None]
    return _photo_file(img + rng.normal(0, 3, img.shape), rng)


def _tight_crop(digit, rng):
    "Framed to the ink or closer (cutting up to 5% off an edge); thick strokes covering up to about 70% of the frame."
    target = rng.uniform(0.25, 0.7)
    for weight in np.linspace(rng.uniform(0.2, 0.9), -0.6, 8):   # thinner until the coverage is at most `target`
        a = _fit(shape(digit, int(rng.integers(40, 320)), rng, weight))
        if a.mean() <= target: break
    h, w = a.shape
    m = [round(rng.uniform(-0.05, 0.03) * s) for s in (w, h, w, h)]   # left, top, right, bottom; < 0 cuts
    a = np.pad(a, [(max(m[1], 0), max(m[3], 0)), (max(m[0], 0), max(m[2], 0))])
    a = a[max(-m[1], 0):a.shape[0] - max(-m[3], 0), max(-m[0], 0):a.shape[1] - max(-m[2], 0)]
    dark_on_light = rng.random() < 0.8
    paper, ink = (_paper_colour(rng, 190), _ink(rng)) if dark_on_light else ((rng.uniform(0, 50),) * 3, (rng.uniform(200, 255),) * 3)
    img = _paper(*a.shape, paper)
    _lay(img, a, ink)
    return _photo_file(img + rng.normal(0, 3, img.shape), rng)


PHONE_DIGIT = (0.2, 0.3)   # the phone photo's digit: this fraction of the picture's height (smaller: more of the page)


def _phone_photo(digit, rng, size: tuple[int, int] | None = None):
    "A photo of a page: the digit about a quarter of the image high, off-centre, tilted, uneven light, noise, JPEG."
    if size is None:
        H = int(rng.integers(600, 1000))
        W = int(H * rng.choice([4 / 3, 3 / 4, 16 / 9, 1.0]))
    else: W, H = size
    img, a, _, _, ink = _on_paper(digit, rng, size_frac=PHONE_DIGIT, canvas=(H, H + 1), paper=_paper_colour(rng, 170, 240),
                                  rotate=8.0)
    img = _paper(H, W, img[0, 0])
    x = int(rng.integers(0, W - a.shape[1])); y = int(rng.integers(0, H - a.shape[0]))
    _place(img, a, x, y, ink)
    light = _light(H, W, rng, rng.uniform(0.2, 0.55), ["gradient", "edge", "spot"][int(rng.integers(3))])
    return _photo_finish(img, rng, light, noise=(2, 9), blur=(0.3, 1.5), quality=(40, 92))


def _photo_finish(img, rng, light=None, vignette=(0.05, 0.25), noise=(1, 5), blur=(0.3, 1.2), quality=(50, 93)) -> bytes:
    "A camera's look: the `light` field, darker towards the corners, noise, a little blur, a JPEG."
    H, W = img.shape[:2]
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    fall = 1 - rng.uniform(*vignette) * (((xx / W - 0.5) ** 2 + (yy / H - 0.5) ** 2) * 2)
    img *= (fall if light is None else light * fall)[..., None]
    out = Image.fromarray(np.clip(np.rint(img + rng.normal(0, rng.uniform(*noise), img.shape)), 0, 255).astype(np.uint8))
    return _encode(out.filter(ImageFilter.GaussianBlur(rng.uniform(*blur))), "JPEG", quality=int(rng.integers(*quality)))


def _table(H: int, W: int, rng: np.random.Generator) -> np.ndarray:
    "A table's top (float RGB, H x W): dark or mid grey, wood or plain, with stripes along its boards."
    tone = rng.uniform(25, 140)
    hue = np.array((1.0, 0.72, 0.45) if rng.random() < 0.5 else (1.0, 1.0, 1.0), np.float32)   # wood or plain
    yy = np.mgrid[0:H, 0:W][0].astype(np.float32)
    grain = 1 + 0.12 * np.sin(yy / H * rng.uniform(20, 80) + rng.normal(0, 0.5, (H, W)))   # stripes along the boards
    return (tone * grain)[..., None] * hue


def _page_on_table(digit, rng):
    "A photo of a page on a table: the table (dark or mid grey, wood or plain) along one or two sides, beyond the page's slanted edge."
    H = int(rng.integers(500, 1000)); W = int(H * rng.choice([4 / 3, 3 / 4, 1.0]))
    img, a, _, _, ink = _on_paper(digit, rng, size_frac=(0.12, 0.3), canvas=(H, H + 1), rotate=10.0)
    img = _paper(H, W, img[0, 0])
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    inward = {0: xx / W, 1: 1 - xx / W, 2: yy / H, 3: 1 - yy / H}       # from the left, right, top, bottom side
    along = {0: yy / H, 1: yy / H, 2: xx / W, 3: xx / W}
    table = np.zeros((H, W), bool)
    for side in rng.choice(4, size=int(rng.integers(1, 3)), replace=False):
        table |= inward[side] < rng.uniform(0.05, 0.25) + rng.uniform(-0.12, 0.12) * (along[side] - 0.5)
    m = H // 10   # the digit on the page, clear of its edge (one within about 1/16 of the image is read with the table)
    for _ in range(100):
        x, y = int(rng.integers(0, W - a.shape[1])), int(rng.integers(0, H - a.shape[0]))
        if not table[max(0, y - m):y + a.shape[0] + m, max(0, x - m):x + a.shape[1] + m].any(): break
    else: table[:] = False
    _place(img, a, x, y, ink)
    img[table] = _table(H, W, rng)[table]
    return _photo_finish(img, rng)


def _vignette(digit, rng):
    "A photo of plain paper, 10 to 30% darker in its corners than in its middle, the digit anywhere on it."
    img, a, x, y, ink = _on_paper(digit, rng, size_frac=(0.1, 0.35), canvas=(400, 1000), rotate=8.0)
    _place(img, a, x, y, ink)
    return _photo_finish(img, rng, vignette=(0.2, 0.6))   # x 0.5 at the corners: 10 to 30%


def _faint_pencil(digit, rng):
    "Light pencil, or a washed-out photo: the strokes only 25 to 50 grey levels darker than the paper."
    v = rng.uniform(150, 235)   # the paper's grey
    img, a, x, y, _ = _on_paper(digit, rng, paper=(v, v, v), weight=(-0.2, 0.4))
    a = a * np.clip(rng.normal(0.85, 0.1, a.shape), 0, 1).astype(np.float32)   # graphite on paper fibres
    _place(img, a, x, y, (v - rng.uniform(25, 50) / 0.85,) * 3)
    return _photo_file(img + rng.normal(0, rng.uniform(0.5, 2.5), img.shape), rng, (70, 95))


def _boxed(digit, rng):
    "A digit written in a form's box, or circled: a closed rectangle (tilted) or ellipse around it, clear of its strokes."
    img, a, _, _, ink = _on_paper(digit, rng, size_frac=(0.2, 0.4), canvas=(200, 900), rotate=5.0)
    (h, w), (H, W) = a.shape, img.shape[:2]
    gap = rng.uniform(0.12, 0.3) * max(h, w)                             # between the strokes and the frame
    rx, ry = w / 2 + gap, h / 2 + gap
    box = rng.random() < 0.5
    if not box:                                                          # a circle, or an ellipse
        r = max(rx, ry) * rng.uniform(1.0, 1.15)
        rx, ry = (r, r) if rng.random() < 0.5 else (rx * 1.25, ry * 1.2)
    width = max(1, round(rng.uniform(0.01, 0.03) * max(H, W)))
    m = 1.1 * max(rx, ry) + width                                        # room for the frame, tilted, inside the picture
    cx, cy = rng.uniform(m, max(m + 1, W - m)), rng.uniform(m, max(m + 1, H - m))
    t = math.radians(rng.uniform(-4, 4)) if box else 0.0                 # a box is tilted up to 4 degrees

    def paint(draw, s):
        if box:
            corners = [(cx + dx * math.cos(t) - dy * math.sin(t), cy + dx * math.sin(t) + dy * math.cos(t))
                       for dx, dy in ((-rx, -ry), (rx, -ry), (rx, ry), (-rx, ry))]
            draw.line([(u * s, v * s) for u, v in corners + corners[:1]], fill=255, width=width * s, joint="curve")
        else: draw.ellipse([(cx - rx) * s, (cy - ry) * s, (cx + rx) * s, (cy + ry) * s], outline=255, width=width * s)
    _lay(img, _drawn(H, W, paint), ink if rng.random() < 0.5 else _ink(rng))
    _place(img, a, round(cx - w / 2), round(cy - h / 2), ink)
    return _photo_file(img + rng.normal(0, 3, img.shape), rng)


def _underlined(digit, rng):
    "An answer underlined on a form: a line under the digit, clear of its strokes, as wide as it or wider, tilted a little."
    img, a, x, y, ink = _on_paper(digit, rng, size_frac=(0.25, 0.5), canvas=(200, 900), rotate=5.0)
    (h, w), (H, W) = a.shape, img.shape[:2]
    y = min(y, int(H - 1.35 * h))                                       # room below the digit for the line
    gap, reach = rng.uniform(0.08, 0.25) * h, rng.uniform(0.55, 0.9) * max(w, 0.6 * h)
    cx, ly, t = x + w / 2, y + h + gap, math.tan(math.radians(rng.uniform(-3, 3)))
    width = max(1, round(rng.uniform(0.04, 0.1) * h))
    _lay(img, _drawn(H, W, lambda draw, s: draw.line([((cx - reach) * s, (ly - reach * t) * s),
                                                       ((cx + reach) * s, (ly + reach * t) * s)], fill=255, width=width * s)), ink)
    _place(img, a, x, y, ink)
    return _photo_file(img + rng.normal(0, 3, img.shape), rng)


def _hard_shadow(digit, rng):
    """A photo with the hard-edged shadow of a pen, a finger or a phone across the page: a round-tipped bar 3 to
    12% of the picture wide (blurred over 1 to 3 px) from beyond one side to near the digit, often over it."""
    H = int(rng.integers(500, 1000)); W = int(H * rng.choice([4 / 3, 3 / 4, 1.0]))
    img, a, _, _, ink = _on_paper(digit, rng, size_frac=(0.15, 0.35), canvas=(H, H + 1), rotate=8.0)
    img = _paper(H, W, img[0, 0])
    (h, w), n = a.shape, min(H, W)
    x, y = int(rng.integers(0, W - w)), int(rng.integers(0, H - h))
    _place(img, a, x, y, ink)
    width = rng.uniform(0.03, 0.12) * n
    tx, ty = x + w * rng.uniform(-0.3, 1.3), y + h * rng.uniform(-0.3, 1.3)      # the tip: near the digit or on it
    t = rng.uniform(0, 2 * math.pi)
    sx, sy = tx + 2 * max(H, W) * math.cos(t), ty + 2 * max(H, W) * math.sin(t)  # from far beyond a side

    def paint(draw, s):
        draw.line([(sx * s, sy * s), (tx * s, ty * s)], fill=255, width=round(width * s))
        r = width / 2
        draw.ellipse([(tx - r) * s, (ty - r) * s, (tx + r) * s, (ty + r) * s], fill=255)
    cover = np.asarray(Image.fromarray(np.rint(_drawn(H, W, paint) * 255).astype(np.uint8))
                       .filter(ImageFilter.GaussianBlur(rng.uniform(1, 3))), np.float32) / 255
    img *= (1 - rng.uniform(0.3, 0.55) * cover)[..., None]
    light = _light(H, W, rng, rng.uniform(0.1, 0.4), ["gradient", "spot"][int(rng.integers(2))])
    return _photo_finish(img, rng, light)


def phone_photo_1mp(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    "A phone-photo-like JPEG of about one megapixel (1152x864, either way up): the speed benchmark's input."
    return _phone_photo(np.asarray(digit, np.uint8), rng, (1152, 864) if rng.random() < 0.5 else (864, 1152))


def _canvas(digit, rng):
    "280x280 PNG as the page's pad sends it (white strokes on black), or black strokes on white or transparent."
    a = shape(digit, int(rng.integers(150, 240)), rng, rng.uniform(0.2, 0.8))
    a = _fit(_rotate(a, rng.uniform(-5, 5)))[:276, :276]
    cover = np.zeros((280, 280), np.float32)
    x, y = int(rng.integers(2, 280 - a.shape[1] - 1)), int(rng.integers(2, 280 - a.shape[0] - 1))
    cover[y:y + a.shape[0], x:x + a.shape[1]] = a
    v = np.rint(cover * 255).astype(np.uint8)
    style = int(rng.integers(3))
    if style == 0: return _encode(Image.fromarray(v).convert("RGBA"))                    # the page: white on black
    if style == 1: return _encode(Image.fromarray(255 - v).convert("RGBA"))              # black on white
    return _encode(Image.merge("RGBA", [Image.new("L", (280, 280), 0)] * 3 + [Image.fromarray(v)]))  # black on clear


def _transparent_png(digit, rng):
    "Dark or light ink on a fully transparent background, any size."
    a = shape(digit, int(rng.integers(20, 400)), rng, rng.uniform(-0.2, 0.6))
    h, w = a.shape
    m = int(rng.integers(1, max(2, h // 2)))
    a = np.pad(a, m)
    alpha = Image.fromarray(np.rint(a * 255).astype(np.uint8))
    c = _ink(rng) if rng.random() < 0.7 else (255, 255, 255)
    rgb = Image.new("RGB", alpha.size, tuple(int(v) for v in c))
    return _encode(Image.merge("RGBA", [*rgb.split(), alpha]))


def _exif_jpeg(digit, rng):
    img, a, x, y, ink = _on_paper(digit, rng, canvas=(300, 1000))
    _place(img, a, x, y, ink)
    up = Image.fromarray(np.clip(np.rint(img + rng.normal(0, 3, img.shape)), 0, 255).astype(np.uint8))
    tag = int(rng.choice([3, 6, 8]))
    stored = up.transpose({3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[tag])
    exif = Image.Exif(); exif[0x0112] = tag
    return _encode(stored, "JPEG", quality=int(rng.integers(60, 95)), exif=exif)


def _off_white(digit, rng):
    v = rng.uniform(150, 215)
    img, a, x, y, ink = _on_paper(digit, rng, paper=(v, v * rng.uniform(0.9, 1), v * rng.uniform(0.8, 1)))
    _place(img, a, x, y, ink)
    return _photo_file(img + rng.normal(0, 2, img.shape), rng)


def _skeleton(a: np.ndarray) -> np.ndarray:
    """The centre lines of `a` > 0.5, one pixel wide and connected as the strokes are (Zhang and Suen's thinning,
    1984), as a pen would draw them. (A morphological skeleton would break them apart, which no pen does.)"""
    m = np.pad(a > 0.5, 1)
    while True:
        changed = False
        for step in (0, 1):   # peel the south-east boundary, then the north-west one
            p = m.astype(np.uint8)
            n = [p[:-2, 1:-1], p[:-2, 2:], p[1:-1, 2:], p[2:, 2:], p[2:, 1:-1], p[2:, :-2], p[1:-1, :-2], p[:-2, :-2]]
            count = sum(n)                                                     # set neighbours, N clockwise
            turns = sum((n[i] == 0) & (n[(i + 1) % 8] == 1) for i in range(8))   # 0 -> 1 changes around
            n2, n4, n6, n8 = n[0], n[2], n[4], n[6]
            side = ((n2 * n4 * n6 == 0) & (n4 * n6 * n8 == 0)) if step == 0 else ((n2 * n4 * n8 == 0) & (n2 * n6 * n8 == 0))
            drop = m[1:-1, 1:-1] & (count >= 2) & (count <= 6) & (turns == 1) & side
            if drop.any(): m[1:-1, 1:-1] &= ~drop; changed = True
        if not changed: return m[1:-1, 1:-1].astype(np.float32)


def _thin_strokes(digit, rng):
    "A thin pen on a big image: strokes 1/200 .. 1/40 of the digit's height, hairlines at 28x28."
    H = int(rng.integers(400, 1400))
    img, a, x, y, ink = _on_paper(digit, rng, canvas=(H, H + 1), rotate=0)
    k = rng.uniform(1, 4)                     # pen width, in pixels of a 160 px skeleton
    smooth = Image.fromarray(np.rint(shape(digit, 160, rng, 0.3) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(4))
    sk = _grow(_skeleton(np.asarray(smooth, np.float32) / 255), int(k > 2.5))
    big = Image.fromarray(np.rint(sk * 255).astype(np.uint8)).resize((a.shape[1], a.shape[0]), Image.BILINEAR)
    a = np.clip((np.asarray(big, np.float32) / 255 - 0.25) * 2, 0, 1)   # in the digit's place on the page
    _place(img, a, x, y, ink)
    return _photo_file(img, rng, (75, 95))


def _grid_photo(digit, rng):
    """A phone photo of squared or ruled paper, the digit written small (1/10 to 1/4 of the picture's height) with
    a ballpoint (strokes 1 or 3 px wide) or a broader pen, the lines faint to clear: uneven light, noise, JPEG."""
    H = int(rng.integers(600, 1000)); W = int(H * rng.choice([4 / 3, 3 / 4, 1.0]))
    img, a, _, _, ink = _on_paper(digit, rng, size_frac=(0.1, 0.25), canvas=(H, H + 1), weight=(-0.4, 0.2), rotate=6.0)
    if rng.random() < 0.5: a = _grow(_skeleton(a), int(rng.integers(0, 2)))   # the centre lines, grown by 0 or 1 px
    img = _paper(H, W, img[0, 0])
    _ruling(img, rng, grid=bool(rng.random() < 0.6), faint=True)
    _place(img, a, int(rng.integers(0, W - a.shape[1])), int(rng.integers(0, H - a.shape[0])), ink)
    light = _light(H, W, rng, rng.uniform(0.1, 0.4), ["gradient", "edge", "spot"][int(rng.integers(3))])
    return _photo_finish(img, rng, light, noise=(2, 6), blur=(0.3, 1.0), quality=(50, 92))


def _tilted_page(digit, rng):
    """A phone photo of a ruled or squared page held at an angle: its lines 3 to 12 degrees off level, the digit
    (1/8 to 1/3 of the picture's height) turned with the page, give or take 4 degrees; lit evenly or not, noise, JPEG."""
    tilt = float(rng.choice([-1, 1]) * rng.uniform(3, 12))
    H = int(rng.integers(500, 1000))
    img, a, _, _, ink = _on_paper(digit, rng, size_frac=(0.125, 0.33), canvas=(H, H + 1), weight=(-0.4, 0.3), rotate=0)
    a = _rotate(a, -tilt + rng.uniform(-4, 4))     # PIL turns counter-clockwise; a positive tilt runs down to the right
    W = img.shape[1]
    _ruling(img, rng, grid=bool(rng.random() < 0.5), tilt=tilt)
    _place(img, a, int(rng.integers(0, max(1, W - a.shape[1]))), int(rng.integers(0, max(1, H - a.shape[0]))), ink)
    light = _light(H, W, rng, rng.uniform(0.1, 0.4), ["gradient", "edge", "spot"][int(rng.integers(3))])
    return _photo_finish(img, rng, light if rng.random() < 0.5 else None, noise=(2, 6), blur=(0.3, 1.0), quality=(50, 92))


def _sticky_note(digit, rng):
    """A phone photo of a sticky note or an index card on a darker table (wood or plain): the note inside the
    picture, tilted by up to 20 degrees, a third to two thirds of its shorter side; the digit written across it."""
    H = int(rng.integers(500, 1000)); W = int(H * rng.choice([4 / 3, 3 / 4, 1.0]))
    side = int(min(H, W) * rng.uniform(0.35, 0.65))
    h, w = side, int(side * (1.0 if rng.random() < 0.6 else rng.uniform(1.3, 1.6)))   # a square note or a card
    if W < H: h, w = w, h                                                              # a card along the picture
    t = rng.uniform(-20, 20); cos, sin = math.cos(math.radians(t)), abs(math.sin(math.radians(t)))
    k = min(1.0, 0.92 * W / (w * cos + h * sin), 0.92 * H / (w * sin + h * cos))      # tilted, it fits inside
    h, w = int(h * k), int(w * k)
    colour = [(250, 235, 110), (250, 190, 205), (195, 240, 170), (190, 220, 250), (245, 243, 235)][int(rng.integers(5))]
    _, a, _, _, ink = _on_paper(digit, rng, size_frac=(0.45, 0.75), canvas=(min(h, w), min(h, w) + 1), paper=colour)
    note = _paper(h, w, colour)
    m = min(h, w) // 10                                                                # written clear of its edges
    _place(note, a, int(rng.integers(m, max(m + 1, w - a.shape[1] - m))), int(rng.integers(m, max(m + 1, h - a.shape[0] - m))), ink)
    rgb = Image.fromarray(np.clip(np.rint(note), 0, 255).astype(np.uint8)).rotate(t, Image.BILINEAR, expand=True)
    cover = np.asarray(Image.new("L", (w, h), 255).rotate(t, Image.BILINEAR, expand=True), np.float32) / 255
    img = _table(H, W, rng)
    g = min(H, W) // 30                                                                # the table shows all round
    x, y = int(rng.integers(g, W - cover.shape[1] - g + 1)), int(rng.integers(g, H - cover.shape[0] - g + 1))
    c = cover[..., None]
    img[y:y + c.shape[0], x:x + c.shape[1]] *= 1 - c
    img[y:y + c.shape[0], x:x + c.shape[1]] += c * np.asarray(rgb, np.float32)
    light = _light(H, W, rng, rng.uniform(0.05, 0.3), ["gradient", "spot"][int(rng.integers(2))])
    return _photo_finish(img, rng, light, noise=(2, 6), blur=(0.3, 1.2), quality=(50, 92))


def _dilated_strokes(digit, rng):
    "Bold strokes (a marker, or a drawing dilated): the stroke about 1/5 to 1/4 of the digit's height."
    img, a, x, y, ink = _on_paper(digit, rng, canvas=(60, 300), weight=(0.5, 0.8))
    a = _grow(a, int(rng.integers(1, max(2, a.shape[0] // 20))))
    h, w = img.shape[:2]
    a = a[:h, :w]
    _place(img, a, (w - a.shape[1]) // 2, (h - a.shape[0]) // 2, ink)
    return _photo_file(img, rng)


def _tight_dark_on_light(digit, rng):
    "An MNIST test digit (other writers than training) inverted, framed to its ink, small, grey levels."
    d = np.asarray(digit, np.uint8)
    ys, xs = np.nonzero(d > 0)
    m = int(rng.integers(0, 2))
    d = np.pad(d, m)[ys.min():ys.max() + 1 + 2 * m, xs.min():xs.max() + 1 + 2 * m]
    s = rng.uniform(1, 3)
    img = Image.fromarray(255 - d).resize((max(1, round(d.shape[1] * s)), round(d.shape[0] * s)), Image.BICUBIC)
    return _photo_file(np.asarray(img.convert("RGB"), np.float32), rng, (80, 96))


_CONDITIONS = {
    "blue_ink": _blue_ink, "pencil": _pencil, "low_res_blur": _low_res_blur, "sensor_noise": _sensor_noise,
    "thick_marker": _thick_marker, "squared_paper": _squared_paper, "uneven_light": _uneven_light,
    "tight_crop": _tight_crop, "ruled_paper": _ruled_paper, "phone_photo": _phone_photo,
    "tight_dark_on_light": _tight_dark_on_light,
    "canvas": _canvas, "transparent_png": _transparent_png, "exif_jpeg": _exif_jpeg, "off_white": _off_white,
    "thin_strokes": _thin_strokes, "dilated_strokes": _dilated_strokes,
    "page_on_table": _page_on_table, "vignette": _vignette, "faint_pencil": _faint_pencil, "boxed": _boxed,
    "underlined": _underlined, "hard_shadow": _hard_shadow, "grid_photo": _grid_photo,
    "sticky_note": _sticky_note, "tilted_page": _tilted_page,
}
CONDITIONS: tuple[str, ...] = tuple(_CONDITIONS)
# read only in part (about 93%, see the README): a shadow as dark as the ink, or one whose grey varies along it
# (light falling off across the page), can still join the digit
PARTLY_READ: tuple[str, ...] = ("hard_shadow",)


def realistic(digit: np.ndarray, condition: str, rng: np.random.Generator) -> bytes:
    "The bytes of an image file showing MNIST `digit` (28x28 uint8, white on black) under `condition`."
    if condition not in _CONDITIONS: raise KeyError(f"unknown condition {condition!r}; one of {CONDITIONS}")
    return _CONDITIONS[condition](np.asarray(digit, np.uint8), rng)


def uploads(digits: np.ndarray, labels: Iterable[int], per_condition: int, seed: int = 0,
            conditions: Iterable[str] = CONDITIONS) -> Iterator[tuple[str, int, bytes]]:
    "(condition, label, bytes) for `per_condition` digits drawn at random (without repeats) for each condition."
    labels = np.asarray(list(labels))
    rng = np.random.default_rng(seed)
    for c in conditions:
        for i in rng.choice(len(digits), size=min(per_condition, len(digits)), replace=False):
            yield c, int(labels[i]), realistic(digits[i], c, rng)


def mnist(root: str | Path, split: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    "The digits (uint8 [N, 28, 28]) and labels of a torchvision-layout MNIST under `root` (raw IDX files)."
    raw = Path(root) / "MNIST" / "raw"
    images = np.frombuffer((raw / f"{split}-images-idx3-ubyte").read_bytes(), np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer((raw / f"{split}-labels-idx1-ubyte").read_bytes(), np.uint8, offset=8)
    return images, labels
