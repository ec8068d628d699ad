"""CLIP's evaluation transform, split so decoding and normalisation can run in different places.

Accuracy numbers are only comparable with the papers' if every evaluation image gets exactly the
pixels their pipeline produced, so this module reproduces that pipeline's integer arithmetic
rather than approximating it. Two pipelines are supported:

* `Preprocess.clip(n)`: open_clip's `image_transform(n, is_train=False)`, i.e. torchvision's
  `Resize(n, BICUBIC)`, `CenterCrop(n)`, `_convert_to_rgb`, `ToTensor`, `Normalize` on PIL
  images. The rules followed, read from torchvision's `transforms/functional.py`:

  - resize (`_compute_resized_output_size` with one size): the shorter side becomes `size`, the
    longer `int(size * long / short)`; when that is the image's own size nothing is resampled.
    PIL's `Image.resize(..., resample)` does the work, so modes "1" and "P" are resampled with
    NEAREST whatever is asked (PIL's rule, which torchvision inherits).
  - centre crop (`center_crop`): an image smaller than the crop along a side is first padded
    with zeros in its own mode, `(crop - side) // 2` before and the rest after; then
    `top = int(round((h - crop_h) / 2.0))`, `left = int(round((w - crop_w) / 2.0))` with
    Python's round-half-to-even (a difference of 3 gives offset 2, of 5 gives 2).
    Zero means zero in the image's mode: black for RGB/L/RGBA, palette index 0 for "P", white
    for CMYK once converted, exactly as torchvision's `pad` leaves it.
  - RGB conversion (`image.convert("RGB")`, alpha dropped) comes after resize and crop.

* `Preprocess.from_preprocessor_config(path)`: Hugging Face's `CLIPImageProcessor` as its PIL
  backend (`CLIPImageProcessorPil` in transformers 5, the only backend before it) computes it:

  - RGB conversion comes first (`image_transforms.convert_to_rgb`), and an image with an alpha
    band or a `transparency` entry is composited onto white rather than having alpha dropped.
  - resize (`get_resize_output_image_size(default_to_square=False)`): the same
    `int(size * long / short)` rule as torchvision; HF always calls PIL, which returns an
    unchanged copy when the size already matches, so the pixels are the same.
    `size = {"height", "width"}` resizes to exactly that.
  - centre crop (`image_transforms.center_crop`): `top = (h - crop_h) // 2`,
    `left = (w - crop_w) // 2`, floor division for both cropping and padding (a too-small
    side is placed `ceil((crop - side) / 2)` from the start). This is `crop_rounding="floor"`;
    it differs from torchvision when the size difference is odd and at least 3.

Normalisation is the same in both: `s = float32(x * rescale_factor)` (the product taken in
float64 and rounded once, which is HF's `rescale`, and for 1/255 equals torchvision's float32
`x / 255` for every x in 0..255), then `(s - mean) / std` in float32 (torchvision's `Normalize`,
HF's `normalize`). Because `x` is a byte, `normalize_batch` looks the 3 x 256 possible results
up in a table built once per device, so the device result is bit-identical to both libraries.

EXIF orientation is not applied: neither torchvision nor HF apply it, and the models were
evaluated on the stored pixel order.
"""

from __future__ import annotations

import functools
import io
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline.errors import InputError
from pipeline.io import storage
from pipeline.models.vit import CLIP_MEAN, CLIP_STD

CropRounding = Literal["torchvision", "floor"]
_RESAMPLE_CODES = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX",
                   5: "HAMMING"}
_CLIP_SIZE = 224


@dataclass(frozen=True)
class Preprocess:
    """One evaluation transform; `pixels_uint8` on the CPU side, `normalize_batch` on the device.

    `crop` is a side or `(height, width)`. `resize_to`, when set, replaces the shortest-side
    resize with a resize to exactly `(height, width)` (HF's `size={"height", "width"}`).
    `rgb_first` and `alpha_on_white` select HF's RGB conversion (see the module docstring).
    `rescale_factor` is the factor actually applied (1.0 when HF's `do_rescale` is false).
    """

    size: int = _CLIP_SIZE
    crop: int | tuple[int, int] = _CLIP_SIZE
    resample: int = 3
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resize: bool = True
    center_crop: bool = True
    convert_rgb: bool = True
    rescale_factor: float = 1 / 255
    normalize: bool = True
    rgb_first: bool = False
    alpha_on_white: bool = False
    crop_rounding: CropRounding = "torchvision"
    resize_to: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        # ValueError here is a programming error; `from_preprocessor_config` turns it into an
        # InputError naming the file it came from.
        if not _positive_int(self.size):
            raise ValueError(f"size must be a positive integer, got {self.size!r}")
        crop = (self.crop, self.crop) if isinstance(self.crop, int) else self.crop
        if not (isinstance(crop, tuple) and len(crop) == 2 and all(map(_positive_int, crop))):
            raise ValueError(f"crop size must be a positive integer or (height, width), "
                             f"got {self.crop!r}")
        if self.resize_to is not None and not (
                len(self.resize_to) == 2 and all(map(_positive_int, self.resize_to))):
            raise ValueError(f"resize size must be positive (height, width), got "
                             f"{self.resize_to!r}")
        if not (_int(self.resample) and self.resample in _RESAMPLE_CODES):
            raise ValueError(f"resample must be a PIL filter code 0-5, got {self.resample!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3 or not all(_finite(v) for v in values):
                raise ValueError(f"{name} must be 3 finite numbers, got {values!r}")
        if any(v == 0 for v in self.std):
            raise ValueError(f"std must not contain 0, got {self.std!r}")
        if not (_finite(self.rescale_factor) and self.rescale_factor > 0):
            raise ValueError(f"rescale factor must be a positive number, got "
                             f"{self.rescale_factor!r}")
        if self.crop_rounding not in ("torchvision", "floor"):
            raise ValueError(f"crop rounding must be 'torchvision' or 'floor', got "
                             f"{self.crop_rounding!r}")

    @classmethod
    def clip(cls, image_size: int) -> Preprocess:
        """open_clip's evaluation transform for a model whose input is `image_size` square."""
        return cls(size=image_size, crop=image_size)

    @classmethod
    def from_preprocessor_config(cls, location: str) -> Preprocess:
        """The transform a Hugging Face `preprocessor_config.json` (local path or URI) describes,
        with HF's conversion order and crop rounding. Missing fields take CLIP's defaults;
        fields this transform has no use for are ignored."""
        raw = storage.read_bytes(location)
        try:
            config = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{location}: not valid JSON ({exc}); expected a Hugging Face "
                             f"preprocessor_config.json") from None
        if not isinstance(config, dict):
            raise InputError(f"{location}: expected a JSON object (a Hugging Face "
                             f"preprocessor_config.json), got {type(config).__name__}")
        try:
            return cls._from_dict(config)
        except (ValueError, TypeError) as exc:
            raise InputError(f"{location}: {exc}") from None

    @classmethod
    def _from_dict(cls, config: dict[str, Any]) -> Preprocess:
        size, resize_to = _parse_size(config.get("size", {"shortest_edge": _CLIP_SIZE}))
        convert_rgb = _flag(config, "do_convert_rgb")
        rescale = _flag(config, "do_rescale")
        factor = config.get("rescale_factor", 1 / 255)
        if not _finite(factor):
            raise ValueError(f"rescale_factor must be a number, got {factor!r}")
        return cls(
            size=size, crop=_parse_crop(config.get("crop_size", _CLIP_SIZE)),
            resample=config.get("resample", 3),
            mean=_triple(config, "image_mean", CLIP_MEAN),
            std=_triple(config, "image_std", CLIP_STD),
            resize=_flag(config, "do_resize"), center_crop=_flag(config, "do_center_crop"),
            convert_rgb=convert_rgb, rescale_factor=float(factor) if rescale else 1.0,
            normalize=_flag(config, "do_normalize"), rgb_first=convert_rgb,
            alpha_on_white=convert_rgb, crop_rounding="floor", resize_to=resize_to)

    @property
    def crop_hw(self) -> tuple[int, int]:
        return (self.crop, self.crop) if isinstance(self.crop, int) else self.crop

    def pixels_uint8(self, image: Image.Image, where: str = "image") -> np.ndarray:
        """Resize, crop and convert `image`: the exact integer pixels, (3, H, W) uint8.

        `where` names the image in the error raised when the result is not RGB (only possible
        when conversion is off)."""
        if self.convert_rgb and self.rgb_first:
            image = self._to_rgb(image)
        if self.resize:
            image = self._resize(image)
        if self.center_crop:
            image = self._crop(image)
        if self.convert_rgb and not self.rgb_first:
            image = self._to_rgb(image)
        if image.mode != "RGB":
            raise InputError(f"{where}: image mode is {image.mode}, expected RGB (this "
                             f"preprocessor does not convert images to RGB)")
        return np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))

    def decode(self, data: bytes, where: str) -> np.ndarray:
        """Encoded bytes (any format PIL reads; the first frame of an animation) to
        `pixels_uint8`."""
        try:
            image = Image.open(io.BytesIO(data))
            image.load()  # PIL decodes lazily: truncation only shows here
        except Exception as exc:  # PIL raises many types for bad data
            raise InputError(f"{where}: cannot decode image ({_reason(exc)})") from None
        return self.pixels_uint8(image, where=where)

    def normalize_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 on any device to float32 `(x * rescale_factor - mean) / std` (the
        exact float32 sequence in the module docstring), on the same device."""
        if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected an (N, 3, H, W) uint8 batch, got "
                             f"{tuple(batch.shape)} {batch.dtype}")
        table = _table(self.rescale_factor, self.mean, self.std, self.normalize, batch.device)
        offsets = torch.arange(0, 3 * 256, 256, dtype=torch.int32, device=batch.device)
        return table[batch.to(torch.int32) + offsets.view(1, 3, 1, 1)]

    def _to_rgb(self, image: Image.Image) -> Image.Image:
        if self.alpha_on_white and ("A" in image.getbands()
                                    or image.info.get("transparency") is not None):
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")

    def _resize(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if self.resize_to is not None:
            target = (self.resize_to[1], self.resize_to[0])
        elif width <= height:
            target = (self.size, int(self.size * height / width))
        else:
            target = (int(self.size * width / height), self.size)
        if target == image.size:
            return image
        return image.resize(target, resample=self.resample)

    def _crop(self, image: Image.Image) -> Image.Image:
        crop_h, crop_w = self.crop_hw
        width, height = image.size
        offset = _floor_offset if self.crop_rounding == "floor" else _torchvision_offset
        top, left = offset(height - crop_h), offset(width - crop_w)
        if (top, left, crop_w, crop_h) == (0, 0, width, height):
            return image
        # PIL fills the part of the box outside the image with zeros in the image's own mode
        # (palette kept), which is exactly torchvision's zero padding and HF's.
        return image.crop((left, top, left + crop_w, top + crop_h))


def _torchvision_offset(excess: int) -> int:
    """torchvision's crop start for a side `excess` pixels longer than the crop (negative:
    shorter, padded by `-excess // 2` before)."""
    return int(round(excess / 2.0)) if excess >= 0 else -((-excess) // 2)


def _floor_offset(excess: int) -> int:
    """HF's `center_crop` start: floor division, for cropping and padding alike."""
    return excess // 2


@functools.lru_cache(maxsize=32)
def _table(rescale_factor: float, mean: tuple[float, ...], std: tuple[float, ...],
           normalize: bool, device: torch.device) -> torch.Tensor:
    """Every possible normalised value: row-major (3 channels x 256 byte values), float32."""
    scaled = torch.from_numpy((np.arange(256, dtype=np.float64) * rescale_factor)
                              .astype(np.float32)).expand(3, 256)
    if normalize:
        scaled = (scaled - torch.tensor(mean, dtype=torch.float32).view(3, 1)) \
            / torch.tensor(std, dtype=torch.float32).view(3, 1)
    return scaled.contiguous().view(-1).to(device)


def _reason(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image format PIL recognises"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return _int(value) and value > 0


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _flag(config: dict[str, Any], key: str) -> bool:
    value = config.get(key, True)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def _triple(config: dict[str, Any], key: str, default: tuple[float, float, float]
            ) -> tuple[float, float, float]:
    """HF allows one number (every channel) or one per channel."""
    value = config.get(key, default)
    if _finite(value):
        return (float(value), float(value), float(value))
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(map(_finite, value))):
        raise ValueError(f"{key} must be 3 numbers, got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def _height_width(value: Any, key: str) -> tuple[int, int] | None:
    """(height, width) from {"height", "width"} or [height, width]; None for other shapes."""
    if isinstance(value, dict) and set(value) == {"height", "width"}:
        pair = (value["height"], value["width"])
    elif isinstance(value, list) and len(value) == 2:
        pair = (value[0], value[1])
    else:
        return None
    if not all(map(_positive_int, pair)):
        raise ValueError(f"{key} must hold positive integers, got {value!r}")
    return pair[0], pair[1]


def _parse_size(value: Any) -> tuple[int, tuple[int, int] | None]:
    """HF's `size`: an int or {"shortest_edge"} resizes the shorter side; {"height", "width"}
    resizes to exactly that. Returns (shortest side, fixed size or None)."""
    if isinstance(value, dict) and set(value) == {"shortest_edge"}:
        value = value["shortest_edge"]
    if _positive_int(value):
        return value, None
    fixed = _height_width(value, "size")
    if fixed is None:
        raise ValueError(f"size must be a positive integer, {{\"shortest_edge\": N}} or "
                         f"{{\"height\": H, \"width\": W}}, got {value!r}")
    return min(fixed), fixed


def _parse_crop(value: Any) -> int | tuple[int, int]:
    if _positive_int(value):
        return int(value)
    pair = _height_width(value, "crop_size")
    if pair is None:
        raise ValueError(f"crop_size must be a positive integer or {{\"height\": H, "
                         f"\"width\": W}}, got {value!r}")
    return pair
