"""CLIP evaluation preprocessing against independent plain-PIL references and transformers.

The torchvision reference below is written from torchvision's own rules (Resize with one size,
CenterCrop with zero padding, ToTensor, Normalize) using only PIL, numpy and torch, so the
module's exact-pixel claim is checked against a second implementation, not against itself.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipeline.errors import InputError
from pipeline.evaluation.preprocess import Preprocess
from pipeline.models.vit import CLIP_MEAN, CLIP_STD

OPENAI_CONFIG = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224},
}


# ----------------------------------------------------------------------------- references


def tv_pixels(image: Image.Image, size: int | None, crop_h: int, crop_w: int) -> np.ndarray:
    """torchvision's Resize(size, BICUBIC) + CenterCrop((crop_h, crop_w)) + convert("RGB") on
    a PIL image, as (H, W, 3) uint8. `size=None` skips the resize."""
    if size is not None:
        w, h = image.size
        if w <= h:
            new_w, new_h = size, int(size * h / w)
        else:
            new_w, new_h = int(size * w / h), size
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    w, h = image.size
    if crop_w > w or crop_h > h:
        border = ((crop_w - w) // 2 if crop_w > w else 0, (crop_h - h) // 2 if crop_h > h else 0,
                  (crop_w - w + 1) // 2 if crop_w > w else 0,
                  (crop_h - h + 1) // 2 if crop_h > h else 0)
        palette = image.getpalette() if image.mode == "P" else None
        image = ImageOps.expand(image, border=border, fill=0)
        if palette is not None:
            image.putpalette(palette)
        w, h = image.size
    top, left = int(round((h - crop_h) / 2.0)), int(round((w - crop_w) / 2.0))
    image = image.crop((left, top, left + crop_w, top + crop_h))
    return np.asarray(image.convert("RGB"))


def to_tensor_normalize(hwc: np.ndarray, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """torchvision's ToTensor (float32 x / 255) then Normalize (sub, div in float32)."""
    x = torch.from_numpy(hwc.copy()).permute(2, 0, 1).float().div(255)
    return x.sub(torch.tensor(mean).view(3, 1, 1)).div(torch.tensor(std).view(3, 1, 1))


def numpy_normalize(chw: np.ndarray, rescale: float, mean, std) -> torch.Tensor:
    """HF's numpy rescale (float64 product, cast to float32) then float32 normalise."""
    x = (chw.astype(np.float64) * rescale).astype(np.float32)
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    return torch.from_numpy((x - m) / s)


def hf_pixels(image: Image.Image, shortest: int, crop_h: int, crop_w: int,
              resample: int) -> np.ndarray:
    """HF's PIL-backend order on an RGB image: resize (same int rule), floor-division crop."""
    w, h = image.size
    new = (shortest, int(shortest * h / w)) if w <= h else (int(shortest * w / h), shortest)
    arr = np.asarray(image.resize(new, resample))
    top, left = (arr.shape[0] - crop_h) // 2, (arr.shape[1] - crop_w) // 2
    assert top >= 0 and left >= 0  # the reference covers cropping only
    return arr[top:top + crop_h, left:left + crop_w].transpose(2, 0, 1)


def textured(h: int, w: int, channels: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: bicubic's overshoot and rounding both get exercised."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    planes = [x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + 2 * y) * 5 % 256,
              (x * y) % 256]
    base = np.stack(planes[:channels], axis=-1) + rng.integers(-30, 30, (h, w, channels))
    return np.clip(base, 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def check_against_torchvision(pre: Preprocess, image: Image.Image, size: int | None) -> None:
    crop_h, crop_w = pre.crop_hw
    expected = tv_pixels(image, size, crop_h, crop_w)
    ours = pre.pixels_uint8(image)
    assert ours.dtype == np.uint8 and ours.shape == (3, crop_h, crop_w)
    np.testing.assert_array_equal(ours, expected.transpose(2, 0, 1))
    normalised = pre.normalize_batch(torch.from_numpy(ours)[None])[0]
    assert normalised.dtype == torch.float32
    assert torch.equal(normalised, to_tensor_normalize(expected))


# ----------------------------------------------------------------------------- torchvision path


@pytest.mark.parametrize("w,h", [
    (500, 375),    # landscape
    (375, 500),    # portrait
    (300, 300),    # square, resized
    (224, 224),    # already the model's size
    (224, 300),    # shorter side already 224: no resize, crop only
    (227, 224),    # odd excess 3: torchvision rounds 1.5 to 2
    (224, 229),    # odd excess 5: round-half-even gives 2, not 3
    (231, 224),    # odd excess 7: 3.5 rounds to 4
    (1000, 739),   # resized to 303 x 224: odd excess 79 after resizing
    (97, 61),      # upscaled
])
def test_rgb_matches_torchvision(w: int, h: int) -> None:
    check_against_torchvision(Preprocess.clip(224), Image.fromarray(textured(h, w, 3)), 224)


def test_odd_cases_really_exercise_round_half_even() -> None:
    # Guards the parametrisation above: these excesses are where naive rounding differs.
    assert [int(round(d / 2.0)) for d in (3, 5, 7, 79)] == [2, 2, 4, 40]
    assert [d // 2 for d in (3, 5, 7, 79)] == [1, 2, 3, 39]


@pytest.mark.parametrize("size,crop,w,h,padded_axis", [
    (180, 224, 300, 200, 1),         # height padded 44 (22 + 22), width cropped
    (181, 224, 300, 200, 1),         # odd padding 43: 21 before, 22 after
    (200, (224, 240), 150, 300, 2),  # non-square crop: width padded 40, height cropped
])
def test_smaller_than_crop_is_zero_padded(size, crop, w, h, padded_axis) -> None:
    pre = Preprocess(size=size, crop=crop)
    image = Image.fromarray(textured(h, w, 3, seed=1))
    check_against_torchvision(pre, image, size)
    pixels = pre.pixels_uint8(image)
    assert (pixels.take(0, axis=padded_axis) == 0).all()
    assert (pixels.take(-1, axis=padded_axis) == 0).all()


def test_no_resize_pads_odd_differences() -> None:
    pre = Preprocess(resize=False, crop=(70, 90))
    check_against_torchvision(pre, Image.fromarray(textured(61, 97, 3, seed=2)), None)


def _mode_images() -> dict[str, tuple[bytes, str]]:
    rgb = Image.fromarray(textured(300, 420, 3, seed=3))
    rgba = Image.fromarray(textured(300, 420, 4, seed=4))
    return {
        "L": (encode(rgb.convert("L"), "PNG"), "L"),
        "RGBA": (encode(rgba, "PNG"), "RGBA"),
        "P": (encode(rgb.quantize(48), "PNG"), "P"),
        "P-transparent": (encode(rgb.quantize(48), "PNG", transparency=5), "P"),
        "CMYK": (encode(rgb.convert("CMYK"), "JPEG", quality=92), "CMYK"),
        "1": (encode(rgb.convert("1"), "PNG"), "1"),
        "JPEG": (encode(rgb, "JPEG", quality=90), "RGB"),
    }


@pytest.mark.parametrize("name", list(_mode_images()))
def test_decoded_modes_match_torchvision(name: str) -> None:
    data, mode = _mode_images()[name]
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == mode  # the case really is that mode
    expected = tv_pixels(opened, 224, 224, 224)
    ours = Preprocess.clip(224).decode(data, f"images/{name}")
    np.testing.assert_array_equal(ours, expected.transpose(2, 0, 1))
    normalised = Preprocess.clip(224).normalize_batch(torch.from_numpy(ours)[None])[0]
    assert torch.equal(normalised, to_tensor_normalize(expected))


def test_palette_padding_uses_index_zero_like_torchvision() -> None:
    # torchvision pads a "P" image with palette index 0 before converting: not black here.
    rgb = Image.fromarray(textured(120, 200, 3, seed=5))
    pal = rgb.quantize(16)
    palette = pal.getpalette()
    assert palette is not None
    colours = np.asarray(palette[:3], dtype=np.uint8)
    assert colours.any()
    pixels = Preprocess(size=100, crop=130).pixels_uint8(pal)
    np.testing.assert_array_equal(pixels[:, 0, 0], colours)
    check_against_torchvision(Preprocess(size=100, crop=130), pal, 100)


def test_normalize_batch_every_byte_value() -> None:
    pre = Preprocess.clip(224)
    values = torch.arange(256, dtype=torch.uint8).view(16, 16)
    batch = torch.stack([torch.stack([values, values.flip(0), values.t()])] * 2)
    ours = pre.normalize_batch(batch)
    hwc = batch[0].permute(1, 2, 0).numpy()
    assert torch.equal(ours[0], to_tensor_normalize(hwc))
    assert torch.equal(ours[1], numpy_normalize(batch[1].numpy(), 1 / 255, CLIP_MEAN, CLIP_STD))
    # Without normalisation it is the rescaled value only.
    plain = Preprocess(normalize=False).normalize_batch(batch)
    assert torch.equal(plain[0], batch[0].float() / 255)


def test_normalize_batch_rejects_wrong_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        Preprocess.clip(224).normalize_batch(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="uint8"):
        Preprocess.clip(224).normalize_batch(torch.zeros(3, 4, 4, dtype=torch.uint8))


# ----------------------------------------------------------------------------- decode errors


@pytest.mark.parametrize("data", [
    b"",
    np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes(),
    encode(Image.fromarray(textured(200, 300, 3)), "JPEG")[:1500],  # truncated
    encode(Image.fromarray(textured(200, 300, 3)), "PNG")[:300],
], ids=["empty", "random", "truncated-jpeg", "truncated-png"])
def test_undecodable_is_input_error(data: bytes) -> None:
    where = "s3://bucket/train/cat/0001.jpg"
    with pytest.raises(InputError) as info:
        Preprocess.clip(224).decode(data, where)
    message = str(info.value)
    assert message.startswith(f"{where}: cannot decode image (")
    assert "\n" not in message and "0x" not in message


def test_non_rgb_without_conversion_names_the_image() -> None:
    data = encode(Image.fromarray(textured(50, 60, 3)).convert("L"), "PNG")
    with pytest.raises(InputError, match=r"^data/x\.png: image mode is L, expected RGB"):
        Preprocess(convert_rgb=False).decode(data, "data/x.png")


# ----------------------------------------------------------------------------- HF configs


def write_config(tmp_path, config, name="preprocessor_config.json") -> str:
    path = tmp_path / name
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return str(path)


def test_openai_config_matches_clip_on_rgb(tmp_path) -> None:
    pre = Preprocess.from_preprocessor_config(write_config(tmp_path, OPENAI_CONFIG))
    clip = Preprocess.clip(224)
    assert (pre.size, pre.crop_hw, pre.resample, pre.mean, pre.std) == (224, (224, 224), 3,
                                                                       CLIP_MEAN, CLIP_STD)
    # Even excesses and an excess of 1 round the same way in both libraries.
    for i, (w, h) in enumerate([(500, 375), (375, 500), (224, 224), (225, 224), (640, 480)]):
        image = Image.fromarray(textured(h, w, 3, seed=10 + i))
        ours = pre.pixels_uint8(image)
        np.testing.assert_array_equal(ours, clip.pixels_uint8(image))
        batch = torch.from_numpy(ours)[None]
        assert torch.equal(pre.normalize_batch(batch), clip.normalize_batch(batch))


def test_hf_crop_rounds_down_where_torchvision_rounds_half_even(tmp_path) -> None:
    pre = Preprocess.from_preprocessor_config(write_config(tmp_path, OPENAI_CONFIG))
    image = Image.fromarray(textured(224, 227, 3, seed=20))  # excess 3
    source = np.asarray(image).transpose(2, 0, 1)
    np.testing.assert_array_equal(pre.pixels_uint8(image), source[:, :, 1:225])
    np.testing.assert_array_equal(Preprocess.clip(224).pixels_uint8(image), source[:, :, 2:226])


def test_hf_converts_first_and_composites_alpha_on_white(tmp_path) -> None:
    pre = Preprocess.from_preprocessor_config(write_config(tmp_path, OPENAI_CONFIG))
    rgba = np.zeros((224, 224, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, 112:, 3] = 255  # left half transparent, right half opaque red-ish
    pixels = pre.pixels_uint8(Image.fromarray(rgba))
    assert (pixels[:, :, :100] == 255).all()  # transparent -> white, as HF does
    assert (pixels[:, :, 120:] == np.array([200, 0, 0])[:, None, None]).all()
    assert (Preprocess.clip(224).pixels_uint8(Image.fromarray(rgba))[1:, :, :100] == 0).all()


def test_other_config_values_are_honoured(tmp_path) -> None:
    config = {"size": {"shortest_edge": 256}, "crop_size": {"height": 240, "width": 200},
              "resample": 2, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3],
              "rescale_factor": 1 / 255, "image_processor_type": "CLIPImageProcessor",
              "some_future_field": {"anything": 1}}
    pre = Preprocess.from_preprocessor_config(write_config(tmp_path, config))
    for i, (w, h) in enumerate([(500, 375), (301, 419)]):
        image = Image.fromarray(textured(h, w, 3, seed=30 + i))
        expected = hf_pixels(image, 256, 240, 200, Image.Resampling.BILINEAR)
        ours = pre.pixels_uint8(image)
        np.testing.assert_array_equal(ours, expected)
        normalised = pre.normalize_batch(torch.from_numpy(ours)[None])[0]
        assert torch.equal(normalised, numpy_normalize(expected, 1 / 255, config["image_mean"],
                                                       config["image_std"]))


def test_config_forms_and_defaults(tmp_path) -> None:
    openai = Preprocess.from_preprocessor_config(write_config(tmp_path, OPENAI_CONFIG, "a.json"))
    assert Preprocess.from_preprocessor_config(write_config(tmp_path, {}, "b.json")) == openai
    ints = {**OPENAI_CONFIG, "size": 224, "crop_size": {"height": 224, "width": 224}}
    from_ints = Preprocess.from_preprocessor_config(write_config(tmp_path, ints, "c.json"))
    assert (from_ints.size, from_ints.crop_hw) == (224, (224, 224))
    fixed = Preprocess.from_preprocessor_config(write_config(
        tmp_path, {"size": {"height": 100, "width": 150}, "do_center_crop": False,
                   "do_rescale": False, "do_normalize": False}, "d.json"))
    image = Image.fromarray(textured(90, 120, 3, seed=40))
    expected = np.asarray(image.resize((150, 100), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    ours = fixed.pixels_uint8(image)
    np.testing.assert_array_equal(ours, expected)
    assert torch.equal(fixed.normalize_batch(torch.from_numpy(ours)[None])[0],
                       torch.from_numpy(expected.copy()).float())
    uri = "file://" + write_config(tmp_path, OPENAI_CONFIG, "e.json")
    assert Preprocess.from_preprocessor_config(uri) == openai


@pytest.mark.parametrize("content,needle", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"size": -1}, "size must be"),
    ({"size": "224"}, "size must be"),
    ({"size": {"shortest_edge": 224, "longest_edge": 400}}, "size must be"),
    ({"crop_size": {"height": 0, "width": 224}}, "crop_size must hold positive"),
    ({"crop_size": 22.5}, "crop_size must be"),
    ({"image_mean": [0.5, 0.5]}, "image_mean must be 3 numbers"),
    ({"image_std": [0.0, 1.0, 1.0]}, "std must not contain 0"),
    ({"do_resize": "yes"}, "do_resize must be true or false"),
    ({"resample": 9}, "resample must be a PIL filter code"),
    ({"rescale_factor": None}, "rescale_factor must be a number"),
])
def test_invalid_config_is_input_error(tmp_path, content, needle) -> None:
    path = write_config(tmp_path, content)
    with pytest.raises(InputError) as info:
        Preprocess.from_preprocessor_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and needle in message and "\n" not in message


def test_missing_config_is_input_error(tmp_path) -> None:
    path = str(tmp_path / "nope" / "preprocessor_config.json")
    with pytest.raises(InputError, match=r"no such file"):
        Preprocess.from_preprocessor_config(path)


def test_config_from_object_store(s3_prefix) -> None:
    from pipeline.io import storage
    location = storage.join(s3_prefix, "preprocessor_config.json")
    storage.write_bytes(location, json.dumps({**OPENAI_CONFIG, "crop_size": 200}).encode())
    assert Preprocess.from_preprocessor_config(location).crop_hw == (200, 200)


# ----------------------------------------------------------------------------- transformers


def _hf_processor(config: dict):
    clip_pil = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    return clip_pil.CLIPImageProcessorPil(**{k: v for k, v in config.items()
                                             if k != "feature_extractor_type"})


@pytest.mark.parametrize("config", [
    OPENAI_CONFIG,
    {**OPENAI_CONFIG, "size": {"shortest_edge": 256}, "crop_size": {"height": 240, "width": 200},
     "resample": 2, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]},
], ids=["openai", "other"])
def test_matches_transformers_clip_image_processor(tmp_path, config) -> None:
    hf = _hf_processor(config)
    pre = Preprocess.from_preprocessor_config(write_config(tmp_path, config))
    rgb = [Image.fromarray(textured(h, w, 3, seed=50 + i))
           for i, (w, h) in enumerate([(500, 375), (375, 500), (227, 224), (100, 80), (224, 224)])]
    rgba = Image.fromarray(textured(260, 300, 4, seed=60))
    extra = [rgba, rgba.convert("L"), Image.fromarray(textured(260, 300, 3)).quantize(32),
             Image.fromarray(textured(260, 300, 3)).convert("CMYK")]
    for image in rgb + extra:
        expected = torch.from_numpy(hf(image, return_tensors="np")["pixel_values"])
        ours = pre.normalize_batch(torch.from_numpy(pre.pixels_uint8(image))[None])
        assert ours.shape == expected.shape
        assert torch.equal(ours, expected), (image.mode, image.size,
                                             (ours - expected).abs().max().item())
