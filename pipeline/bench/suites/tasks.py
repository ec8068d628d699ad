"""The built-in classification tasks: real images that ship inside installed wheels, and
deterministic generators for the rest.

Every task maps (split, count, seed) to uint8 images of shape (N, 3, S, S) and int64 labels.
The tasks are chosen to be far apart: handwriting, photographs, faces, geometry, counting,
frequency, glyphs, colour, symmetry, position, noise statistics. Real-data tasks keep their
splits disjoint by construction (a fixed permutation of the samples, or disjoint regions of
each photograph), so no test pixel is ever seen in training. Nothing is downloaded.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np

SPLITS = ("train", "val", "test")
# Fractions of a fixed pool (real datasets) or of each photograph's width (photo crops).
_SPLIT_FRACTIONS = {"train": (0.0, 0.6), "val": (0.6, 0.75), "test": (0.75, 1.0)}


@dataclass(frozen=True)
class Task:
    name: str
    classes: tuple[str, ...]
    source: str  # where the pixels come from, for the suite's description
    make: Callable[[str, int, np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


def split_seed(seed: int, task: str, split: str) -> int:
    return zlib.crc32(f"{seed}/{task}/{split}".encode())


def _to_rgb(gray: np.ndarray) -> np.ndarray:
    """(N, S, S) float in [0, 1] -> (N, 3, S, S) uint8."""
    img = np.clip(np.rint(gray * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(img[:, None], 3, axis=1)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (N, H, W[, C]) float images, via torch (already a dependency)."""
    import torch
    import torch.nn.functional as F
    t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    channels_last = t.dim() == 4
    t = t.permute(0, 3, 1, 2) if channels_last else t[:, None]
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                        antialias=True)
    return (out.permute(0, 2, 3, 1) if channels_last else out[:, 0]).numpy()


def _pool_split(labels: np.ndarray, split: str, seed: int) -> np.ndarray:
    """Indices of `split` in a fixed, class-stratified permutation of a real dataset."""
    lo, hi = _SPLIT_FRACTIONS[split]
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        chosen.append(idx[int(lo * len(idx)):int(hi * len(idx))])
    return np.sort(np.concatenate(chosen))


def _take(images: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator):
    order = rng.permutation(len(labels))[:n]
    return images[order], labels[order]


# ---- real data shipped inside wheels ------------------------------------------------------

def _digits(split: str, n: int, rng: np.random.Generator, size: int):
    from sklearn.datasets import load_digits
    bunch = load_digits()
    idx = _pool_split(bunch.target, split, seed=0)
    gray = _resize(bunch.images[idx] / 16.0, size)
    return _take(_to_rgb(gray), bunch.target[idx].astype(np.int64), n, rng)


def _faces(split: str, n: int, rng: np.random.Generator, size: int):
    from skimage.data import lfw_subset
    images = lfw_subset()  # 100 faces, then 100 non-faces (scikit-image's documentation)
    labels = np.repeat(np.arange(2), 100)
    idx = _pool_split(labels, split, seed=0)
    gray = _resize(images[idx], size)
    return _take(_to_rgb(gray), labels[idx].astype(np.int64), n, rng)


_GRAY_PHOTOS = ("brick", "grass", "gravel", "camera", "moon", "coins", "cell", "clock")
_COLOR_PHOTOS = ("coffee", "chelsea", "astronaut", "rocket", "hubble_deep_field",
                 "immunohistochemistry", "retina", "colorwheel")


@cache
def _photo(name: str) -> np.ndarray:
    from skimage import data
    img = getattr(data, name)().astype(np.float32) / 255.0
    return img if img.ndim == 3 else img[..., None]


def _photo_crops(names: tuple[str, ...], split: str, n: int, rng: np.random.Generator,
                 size: int):
    """Random crops (side 1-3x the output size) from one horizontal band of each photograph;
    the train, validation and test bands do not overlap."""
    lo, hi = _SPLIT_FRACTIONS[split]
    labels = rng.integers(0, len(names), n)
    crops = []
    for label in labels:
        img = _photo(names[label])
        h, w = img.shape[:2]
        x0, x1 = int(lo * w), int(hi * w)
        side = int(rng.integers(size, min(3 * size, x1 - x0, h) + 1))
        y = int(rng.integers(0, h - side + 1))
        x = int(rng.integers(x0, x1 - side + 1))
        crop = _resize(img[None, y:y + side, x:x + side, :3], size)[0]
        crops.append(np.broadcast_to(crop, (size, size, 3)))
    rgb = np.clip(np.rint(np.stack(crops) * 255.0), 0, 255).astype(np.uint8)
    return rgb.transpose(0, 3, 1, 2).copy(), labels.astype(np.int64)


def _textures(split, n, rng, size):
    return _photo_crops(_GRAY_PHOTOS, split, n, rng, size)


def _photos(split, n, rng, size):
    return _photo_crops(_COLOR_PHOTOS, split, n, rng, size)


# ---- generated tasks -----------------------------------------------------------------------

def _canvas(rng: np.random.Generator, size: int) -> tuple[float, float]:
    """Random background and foreground grey levels with a guaranteed contrast."""
    bg = rng.uniform(0.0, 0.45)
    return bg, min(1.0, bg + rng.uniform(0.35, 0.55))


def _noisy(gray: np.ndarray, rng: np.random.Generator, sigma: float = 0.06) -> np.ndarray:
    return np.clip(gray + rng.normal(0.0, sigma, gray.shape), 0.0, 1.0)


def _draw(size: int, paint: Callable, rng: np.random.Generator, scale: int = 4) -> np.ndarray:
    """Draw at 4x and downsample: anti-aliased shapes without a graphics dependency beyond PIL."""
    from PIL import Image, ImageDraw
    bg, fg = _canvas(rng, size)
    big = Image.new("L", (size * scale, size * scale), int(bg * 255))
    paint(ImageDraw.Draw(big), size * scale, int(fg * 255))
    small = np.asarray(big.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0
    return _noisy(small, rng)


_SHAPES = ("circle", "square", "triangle", "cross", "ring", "star")


def _polygon(cx, cy, r, corners, turn, inner=None):
    pts = []
    for i in range(corners * (2 if inner else 1)):
        radius = r if not inner or i % 2 == 0 else r * inner
        angle = turn + 2 * math.pi * i / (corners * (2 if inner else 1))
        pts.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return pts


def _shapes(split, n, rng, size):
    labels = rng.integers(0, len(_SHAPES), n)
    images = []
    for label in labels:
        def paint(draw, s, fg, kind=_SHAPES[label]):
            r = rng.uniform(0.18, 0.34) * s
            cx, cy = rng.uniform(r, s - r, 2)
            turn = rng.uniform(0, 2 * math.pi)
            if kind == "circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
            elif kind == "ring":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=int(r * 0.3))
            elif kind == "square":
                draw.polygon(_polygon(cx, cy, r, 4, turn), fill=fg)
            elif kind == "triangle":
                draw.polygon(_polygon(cx, cy, r, 3, turn), fill=fg)
            elif kind == "star":
                draw.polygon(_polygon(cx, cy, r, 5, turn, inner=0.45), fill=fg)
            else:  # cross
                w = r * 0.3
                for a in (turn, turn + math.pi / 2):
                    dx, dy = math.cos(a), math.sin(a)
                    draw.polygon([(cx - r * dx - w * dy, cy - r * dy + w * dx),
                                  (cx + r * dx - w * dy, cy + r * dy + w * dx),
                                  (cx + r * dx + w * dy, cy + r * dy - w * dx),
                                  (cx - r * dx + w * dy, cy - r * dy - w * dx)], fill=fg)
        images.append(_draw(size, paint, rng))
    return _to_rgb(np.stack(images)), labels.astype(np.int64)


def _counting(split, n, rng, size):
    labels = rng.integers(0, 8, n)  # 1..8 dots
    images = []
    for label in labels:
        def paint(draw, s, fg, count=int(label) + 1):
            r = s * rng.uniform(0.035, 0.055)
            placed: list[tuple[float, float]] = []
            while len(placed) < count:
                x, y = rng.uniform(r * 1.5, s - r * 1.5, 2)
                if all((x - px) ** 2 + (y - py) ** 2 > (3.2 * r) ** 2 for px, py in placed):
                    placed.append((x, y))
                    draw.ellipse([x - r, y - r, x + r, y + r], fill=fg)
        images.append(_draw(size, paint, rng))
    return _to_rgb(np.stack(images)), labels.astype(np.int64)


_LETTERS = tuple("ABCDEFGHJK")


def _glyphs(split, n, rng, size):
    from PIL import Image, ImageDraw, ImageFont
    labels = rng.integers(0, len(_LETTERS), n)
    images = []
    for label in labels:
        bg, fg = _canvas(rng, size)
        big = Image.new("L", (size * 4, size * 4), int(bg * 255))
        font = ImageFont.load_default(size=float(rng.uniform(0.45, 0.8) * size * 4))
        draw = ImageDraw.Draw(big)
        left, top, right, bottom = draw.textbbox((0, 0), _LETTERS[label], font=font)
        x = rng.uniform(-left, size * 4 - right) if size * 4 > right - left else 0
        y = rng.uniform(-top, size * 4 - bottom) if size * 4 > bottom - top else 0
        draw.text((x, y), _LETTERS[label], fill=int(fg * 255), font=font)
        big = big.rotate(float(rng.uniform(-20, 20)), resample=Image.Resampling.BILINEAR,
                         fillcolor=int(bg * 255))
        small = np.asarray(big.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0
        images.append(_noisy(small, rng))
    return _to_rgb(np.stack(images)), labels.astype(np.int64)


def _grid(size):
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return x, y


def _orientation(split, n, rng, size):
    labels = rng.integers(0, 8, n)  # angle bins of 22.5 degrees
    x, y = _grid(size)
    angles = (labels + rng.uniform(0.15, 0.85, n)) * math.pi / 8
    freq = rng.uniform(2.5, 6.0, n)
    phase = rng.uniform(0, 2 * math.pi, n)
    u = x[None] * np.cos(angles)[:, None, None] + y[None] * np.sin(angles)[:, None, None]
    wave = 0.5 + 0.5 * np.sin(2 * math.pi * freq[:, None, None] * u + phase[:, None, None])
    contrast = rng.uniform(0.4, 1.0, n)[:, None, None]
    gray = 0.5 + (wave - 0.5) * contrast
    return _to_rgb(_noisy(gray, rng, 0.08)), labels.astype(np.int64)


def _hue(split, n, rng, size):
    """Colour of a blob on a grey, noisy background: 8 hue bins, random saturation/value."""
    labels = rng.integers(0, 8, n)
    x, y = _grid(size)
    hue = (labels + rng.uniform(0.2, 0.8, n)) / 8.0
    sat, val = rng.uniform(0.5, 1.0, n), rng.uniform(0.5, 1.0, n)
    k = np.stack([(5 + hue * 6) % 6, (3 + hue * 6) % 6, (1 + hue * 6) % 6], axis=1)
    rgb = val[:, None] - val[:, None] * sat[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)
    cx, cy, r = rng.uniform(0.3, 0.7, n), rng.uniform(0.3, 0.7, n), rng.uniform(0.15, 0.3, n)
    mask = (((x[None] - cx[:, None, None]) ** 2 + (y[None] - cy[:, None, None]) ** 2)
            < (r ** 2)[:, None, None])[:, None]
    background = rng.uniform(0.2, 0.8, (n, 1, 1, 1)) + rng.normal(0, 0.08, (n, 1, size, size))
    img = np.where(mask, rgb[:, :, None, None], background)
    img = np.clip(img + rng.normal(0, 0.04, img.shape), 0, 1)
    return np.rint(img * 255).astype(np.uint8), labels.astype(np.int64)


_SYMMETRIES = ("none", "left-right", "top-bottom", "both")


def _symmetry(split, n, rng, size):
    labels = rng.integers(0, 4, n)
    half = size // 4  # 8x8 random cells, upsampled 4x
    cells = rng.random((n, 2 * half, 2 * half)) < rng.uniform(0.3, 0.6, (n, 1, 1))
    cells = cells.astype(np.float32)
    lr = (labels == 1) | (labels == 3)
    tb = (labels == 2) | (labels == 3)
    cells[lr] = np.concatenate([cells[lr][:, :, :half], cells[lr][:, :, :half][:, :, ::-1]], 2)
    cells[tb] = np.concatenate([cells[tb][:, :half], cells[tb][:, :half][:, ::-1]], 1)
    gray = np.kron(cells, np.ones((size // (2 * half), size // (2 * half)), np.float32))
    lo, hi = rng.uniform(0, 0.4, (n, 1, 1)), rng.uniform(0.6, 1.0, (n, 1, 1))
    return _to_rgb(_noisy(lo + (hi - lo) * gray, rng, 0.05)), labels.astype(np.int64)


def _position(split, n, rng, size):
    """Which cell of a 3x3 grid holds the bright square, among dimmer distractor dots."""
    labels = rng.integers(0, 9, n)
    images = []
    cell = size / 3
    for label in labels:
        def paint(draw, s, fg, label=int(label)):
            k = s / size
            for _ in range(int(rng.integers(2, 6))):  # distractors: small, dim
                x, y = rng.uniform(0, s, 2)
                draw.ellipse([x - 1.2 * k, y - 1.2 * k, x + 1.2 * k, y + 1.2 * k],
                             fill=int(fg * 0.6))
            half = rng.uniform(0.22, 0.34) * cell * k
            cx = (label % 3 + rng.uniform(0.35, 0.65)) * cell * k
            cy = (label // 3 + rng.uniform(0.35, 0.65)) * cell * k
            draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fg)
        images.append(_draw(size, paint, rng))
    return _to_rgb(np.stack(images)), labels.astype(np.int64)


_SLOPES = (0.0, 1.0, 2.0, 3.0)


def _roughness(split, n, rng, size):
    """1/f^beta noise: how rough a texture is (beta in 0, 1, 2, 3), at random contrast."""
    labels = rng.integers(0, len(_SLOPES), n)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    radius = np.sqrt(fx ** 2 + fy ** 2)
    radius[0, 0] = 1.0
    beta = np.asarray(_SLOPES)[labels] + rng.uniform(-0.25, 0.25, n)
    spectrum = (rng.normal(size=(n, size, size // 2 + 1))
                + 1j * rng.normal(size=(n, size, size // 2 + 1)))
    spectrum *= radius[None] ** (-beta[:, None, None] / 2.0)
    spectrum[:, 0, 0] = 0
    field = np.fft.irfft2(spectrum, s=(size, size))
    field /= field.std(axis=(1, 2), keepdims=True)
    gray = 0.5 + field * rng.uniform(0.08, 0.2, (n, 1, 1))
    return _to_rgb(np.clip(gray, 0, 1)), labels.astype(np.int64)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("digits", tuple(str(d) for d in range(10)), "scikit-learn load_digits (real)", _digits),
    Task("textures", _GRAY_PHOTOS, "scikit-image grey photographs, crops (real)", _textures),
    Task("shapes", _SHAPES, "generated", _shapes),
    Task("counting", tuple(str(c) for c in range(1, 9)), "generated", _counting),
    Task("orientation", tuple(f"{22.5 * i:g}deg" for i in range(8)), "generated", _orientation),
    Task("glyphs", _LETTERS, "generated (Pillow's bundled font)", _glyphs),
    Task("hue", tuple(f"hue{i}" for i in range(8)), "generated", _hue),
    Task("symmetry", _SYMMETRIES, "generated", _symmetry),
    Task("faces", ("face", "non-face"), "scikit-image lfw_subset (real)", _faces),
    Task("photos", _COLOR_PHOTOS, "scikit-image colour photographs, crops (real)", _photos),
    Task("position", tuple(f"cell{i}" for i in range(9)), "generated", _position),
    Task("roughness", tuple(f"beta{b:g}" for b in _SLOPES), "generated", _roughness),
)}


def make_split(task: str, split: str, n: int, seed: int, size: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """`n` examples (fewer if a real dataset's split is smaller) of `task`'s `split`."""
    spec = TASKS[task]
    rng = np.random.default_rng(split_seed(seed, task, split))
    images, labels = spec.make(split, n, rng, size)
    assert images.dtype == np.uint8 and images.shape[1:] == (3, size, size), (task, images.shape)
    return images, labels
