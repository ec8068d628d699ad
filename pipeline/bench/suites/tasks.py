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
    labels = rng.integers(0, 5, n)  # 1..5 dots
    images = []
    for label in labels:
        def paint(draw, s, fg, count=int(label) + 1):
            r = s * rng.uniform(0.045, 0.065)
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


def _all_photos(split: str, n: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """`n` crops (float RGB in [0, 1], (n, S, S, 3)) of every bundled photograph, from its
    `split` band: the raw material of the image-quality tasks, whose labels are what was done
    to a crop, not what it shows."""
    names = _GRAY_PHOTOS + _COLOR_PHOTOS
    rgb, _ = _photo_crops(names, split, n, rng, size)
    return rgb.transpose(0, 2, 3, 1).astype(np.float32) / 255.0


_BLUR_SIGMAS = (0.0, 0.8, 1.6, 2.8)


def _blur(split, n, rng, size):
    """How blurred a photograph crop is: Gaussian blur of one of four widths (pixels)."""
    import torch
    import torch.nn.functional as F
    labels = rng.integers(0, len(_BLUR_SIGMAS), n)
    crops = _all_photos(split, n, rng, size)
    out = np.empty_like(crops)
    radius = 8
    offsets = np.arange(-radius, radius + 1, dtype=np.float32)
    for label, sigma in enumerate(_BLUR_SIGMAS):
        rows = np.flatnonzero(labels == label)
        if not len(rows):
            continue
        if sigma == 0:
            out[rows] = crops[rows]
            continue
        kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
        k = torch.from_numpy(kernel / kernel.sum())
        t = torch.from_numpy(crops[rows]).permute(0, 3, 1, 2).reshape(-1, 1, size, size)
        t = F.pad(t, (radius, radius, radius, radius), mode="reflect")
        t = F.conv2d(t, k.view(1, 1, 1, -1))
        t = F.conv2d(t, k.view(1, 1, -1, 1))
        out[rows] = t.reshape(len(rows), 3, size, size).permute(0, 2, 3, 1).numpy()
    rgb = np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
    return rgb.transpose(0, 3, 1, 2).copy(), labels.astype(np.int64)


_NOISES = ("clean", "gaussian", "salt-pepper", "speckle", "posterised")


def _noise(split, n, rng, size):
    """Which corruption a photograph crop carries."""
    labels = rng.integers(0, len(_NOISES), n)
    img = _all_photos(split, n, rng, size)
    strength = rng.uniform(0.5, 1.0, n)[:, None, None, None]
    gaussian = img + rng.normal(0, 0.12, img.shape) * strength
    flips = (rng.random(img.shape[:3]) < 0.08 * strength[..., 0])[..., None]
    salt = np.where(flips, (rng.random(img.shape[:3]) < 0.5)[..., None].astype(np.float32),
                    img)
    speckle = img * (1 + rng.normal(0, 0.35, img.shape) * strength)
    levels = rng.integers(2, 4, n)[:, None, None, None]
    posterised = np.round(img * (levels - 1)) / (levels - 1)
    choices = np.stack([img, gaussian, salt, speckle, posterised])
    out = choices[labels, np.arange(n)]
    rgb = np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
    return rgb.transpose(0, 3, 1, 2).copy(), labels.astype(np.int64)


def _sizes(split, n, rng, size):
    """How large a disc is: five bins of its radius, as a fraction of the image."""
    labels = rng.integers(0, 5, n)
    images = []
    for label in labels:
        def paint(draw, s, fg, label=int(label)):
            r = (0.06 + 0.07 * (label + rng.uniform(0.15, 0.85))) * s
            cx, cy = rng.uniform(r, s - r, 2)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        images.append(_draw(size, paint, rng))
    return _to_rgb(np.stack(images)), labels.astype(np.int64)


def _arrows(split, n, rng, size):
    """Which of eight directions an arrow points to."""
    labels = rng.integers(0, 8, n)
    images = []
    for label in labels:
        def paint(draw, s, fg, label=int(label)):
            a = (label + rng.uniform(-0.3, 0.3)) * math.pi / 4
            length = rng.uniform(0.3, 0.45) * s
            cx, cy = rng.uniform(0.35, 0.65, 2) * s
            dx, dy = math.cos(a), -math.sin(a)
            tip = (cx + dx * length / 2, cy + dy * length / 2)
            tail = (cx - dx * length / 2, cy - dy * length / 2)
            draw.line([tail, tip], fill=fg, width=max(1, int(s * 0.05)))
            wing = length * 0.4
            for side in (-1, 1):
                b = a + math.pi + side * 0.5
                draw.polygon([tip, (tip[0] + wing * math.cos(b), tip[1] - wing * math.sin(b)),
                              (tip[0] + 0.5 * wing * math.cos(a + math.pi),
                               tip[1] - 0.5 * wing * math.sin(a + math.pi))], fill=fg)
        images.append(_draw(size, paint, rng))
    return _to_rgb(np.stack(images)), labels.astype(np.int64)


_PATTERNS = ("stripes", "checks", "dots", "zigzag", "rings", "crosshatch")


def _patterns(split, n, rng, size):
    """Which periodic pattern fills the image, at a random scale, angle and phase."""
    labels = rng.integers(0, len(_PATTERNS), n)
    x, y = _grid(size)
    out = []
    for label in labels:
        a = rng.uniform(0, math.pi)
        period = rng.uniform(0.12, 0.25)
        u = (x * math.cos(a) + y * math.sin(a)) / period + rng.uniform(0, 1)
        v = (-x * math.sin(a) + y * math.cos(a)) / period + rng.uniform(0, 1)
        kind = _PATTERNS[label]
        if kind == "stripes":
            g = (u % 1) < 0.5
        elif kind == "checks":
            g = ((np.floor(u) + np.floor(v)) % 2) == 0
        elif kind == "dots":
            g = ((u % 1 - 0.5) ** 2 + (v % 1 - 0.5) ** 2) < 0.09
        elif kind == "zigzag":
            g = ((u + 0.5 * np.abs((v % 1) - 0.5)) % 1) < 0.4
        elif kind == "rings":
            cx, cy = rng.uniform(0.2, 0.8, 2)
            g = (np.hypot(x - cx, y - cy) / period * 1.5 % 1) < 0.5
        else:
            g = ((u % 1) < 0.25) | ((v % 1) < 0.25)
        lo, hi = rng.uniform(0, 0.4), rng.uniform(0.6, 1.0)
        out.append(lo + (hi - lo) * g.astype(np.float32))
    return _to_rgb(_noisy(np.stack(out), rng, 0.05)), labels.astype(np.int64)


def _pie(split, n, rng, size):
    """How much of a disc is filled: sixths, from one to six, starting at a random angle."""
    labels = rng.integers(0, 6, n)
    images = []
    for label in labels:
        def paint(draw, s, fg, label=int(label)):
            r = rng.uniform(0.3, 0.42) * s
            cx, cy = rng.uniform(r, s - r, 2)
            start = rng.uniform(0, 360)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=max(1, int(s / 40)))
            draw.pieslice([cx - r, cy - r, cx + r, cy + r], start, start + 60 * (label + 1),
                          fill=fg)
        images.append(_draw(size, paint, rng))
    return _to_rgb(np.stack(images)), labels.astype(np.int64)


def _colours(split, n, rng, size):
    """How many distinct hues (one to four) the six squares on a grey background take."""
    labels = rng.integers(0, 4, n)
    out = np.empty((n, size, size, 3), np.float32)
    cells = [(i, j) for i in range(3) for j in range(3)]
    step = size // 3
    for k, label in enumerate(labels):
        hues = (rng.uniform(0, 1) + np.arange(label + 1) / (label + 1)
                + rng.uniform(-0.04, 0.04, label + 1)) % 1.0
        pick = np.concatenate([np.arange(label + 1), rng.integers(0, label + 1, 5 - label)])
        img = np.full((size, size, 3), rng.uniform(0.35, 0.65), np.float32)
        for cell, h in zip(rng.permutation(len(cells))[:6], hues[rng.permutation(pick)]):
            i, j = cells[cell]
            rgb = np.clip(np.abs(((h * 6 + np.array([0, 4, 2])) % 6) - 3) - 1, 0, 1)
            pad = int(rng.integers(1, 3))
            img[i * step + pad:(i + 1) * step - pad, j * step + pad:(j + 1) * step - pad] = rgb
        out[k] = img
    out = np.clip(out + rng.normal(0, 0.03, out.shape), 0, 1)
    return np.rint(out * 255).astype(np.uint8).transpose(0, 3, 1, 2).copy(), \
        labels.astype(np.int64)


_ANGLES = (30, 60, 90, 120, 150)


def _angles(split, n, rng, size):
    """The angle between two rays from a common point: five bins of 30 degrees."""
    labels = rng.integers(0, len(_ANGLES), n)
    images = []
    for label in labels:
        def paint(draw, s, fg, label=int(label)):
            cx, cy = rng.uniform(0.3, 0.7, 2) * s
            a = rng.uniform(0, 2 * math.pi)
            b = a + math.radians(_ANGLES[label] + rng.uniform(-8, 8))
            length = rng.uniform(0.3, 0.45) * s
            for t in (a, b):
                draw.line([(cx, cy), (cx + length * math.cos(t), cy - length * math.sin(t))],
                          fill=fg, width=max(1, int(s * 0.045)))
        images.append(_draw(size, paint, rng))
    return _to_rgb(np.stack(images)), labels.astype(np.int64)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("digits", tuple(str(d) for d in range(10)), "scikit-learn load_digits (real)", _digits),
    Task("textures", _GRAY_PHOTOS, "scikit-image grey photographs, crops (real)", _textures),
    Task("shapes", _SHAPES, "generated", _shapes),
    Task("counting", tuple(str(c) for c in range(1, 6)), "generated", _counting),
    Task("orientation", tuple(f"{22.5 * i:g}deg" for i in range(8)), "generated", _orientation),
    Task("glyphs", _LETTERS, "generated (Pillow's bundled font)", _glyphs),
    Task("hue", tuple(f"hue{i}" for i in range(8)), "generated", _hue),
    Task("symmetry", _SYMMETRIES, "generated", _symmetry),
    Task("faces", ("face", "non-face"), "scikit-image lfw_subset (real)", _faces),
    Task("photos", _COLOR_PHOTOS, "scikit-image colour photographs, crops (real)", _photos),
    Task("position", tuple(f"cell{i}" for i in range(9)), "generated", _position),
    Task("roughness", tuple(f"beta{b:g}" for b in _SLOPES), "generated", _roughness),
    Task("blur", tuple(f"sigma{s:g}" for s in _BLUR_SIGMAS),
         "scikit-image photographs, crops, blurred (real)", _blur),
    Task("noise", _NOISES, "scikit-image photographs, crops, corrupted (real)", _noise),
    Task("sizes", tuple(f"size{i}" for i in range(5)), "generated", _sizes),
    Task("arrows", tuple(f"{45 * i}deg" for i in range(8)), "generated", _arrows),
    Task("patterns", _PATTERNS, "generated", _patterns),
    Task("pie", tuple(f"{i}/6" for i in range(1, 7)), "generated", _pie),
    Task("colours", tuple(f"{i}hue{'s' if i > 1 else ''}" for i in range(1, 5)), "generated",
         _colours),
    Task("angles", tuple(f"{a}deg" for a in _ANGLES), "generated", _angles),
)}


def make_split(task: str, split: str, n: int, seed: int, size: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """`n` examples (fewer if a real dataset's split is smaller) of `task`'s `split`."""
    spec = TASKS[task]
    rng = np.random.default_rng(split_seed(seed, task, split))
    images, labels = spec.make(split, n, rng, size)
    assert images.dtype == np.uint8 and images.shape[1:] == (3, size, size), (task, images.shape)
    return images, labels
