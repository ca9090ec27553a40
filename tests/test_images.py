"""Image modes and formats: every image a ViRL39K-format dataset can hold becomes 8-bit RGB once, at
load time, and that RGB image feeds both views (original and masked); bad files are skipped and
counted (papo/images.py, train/data.py, papo/masking.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from papo.images import to_rgb
from papo.masking import mask_image, mask_images
from train import data as D
from train.tiny import TinyModelSpec, build_tiny_model_dir

SMALL = dict(min_pixels=56 * 56, max_pixels=112 * 112)
W, H = 42, 28  # 3 x 2 tiles of 14 px


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from transformers import AutoProcessor

    model_dir = build_tiny_model_dir(tmp_path_factory.mktemp("tiny"), TinyModelSpec())
    return AutoProcessor.from_pretrained(model_dir, local_files_only=True)


def _stripes(values: list, dtype=np.uint8) -> np.ndarray:
    """[H, W, ...] array of vertical stripes, one value per 14-px column."""
    cols = np.arange(W) // 14
    arr = np.asarray(values, dtype=dtype)[cols]
    return np.broadcast_to(arr, (H, *arr.shape)).copy()


PALETTE = [(220, 30, 30), (30, 160, 40), (40, 60, 230)]  # index 0 is red, not black


def _palette_image(transparency: bool) -> Image.Image:
    img = Image.fromarray(_stripes([0, 1, 2]), mode="P")
    img.putpalette([c for rgb in PALETTE for c in rgb] + [0] * (768 - 9))
    if transparency:
        img.info["transparency"] = 1
    return img


def _cases():
    """(name, PIL image, file format, save kwargs, expected RGB stripes or None, tolerance)."""
    rgb = _stripes([(200, 10, 10), (10, 200, 10), (10, 10, 200)])
    rgba = np.concatenate([rgb, np.full((H, W, 1), 7, np.uint8)], -1)
    gray = _stripes([30, 128, 250])
    cmyk = _stripes([(0, 200, 200, 0), (200, 0, 200, 0), (0, 0, 0, 100)])
    cmyk_rgb = _stripes([(255, 55, 55), (55, 255, 55), (155, 155, 155)])  # 255 - min(255, c + k)
    sixteen = _stripes([0, 40000, 65535], np.uint16)
    sixteen_rgb = np.repeat(np.rint(sixteen / 257).astype(np.uint8)[..., None], 3, -1)
    return [
        ("P", _palette_image(False), "PNG", {}, _stripes(PALETTE), 0),
        ("P+transparency", _palette_image(True), "PNG", {}, _stripes(PALETTE), 0),
        ("GIF P+transparency", _palette_image(True), "GIF", {"transparency": 1}, _stripes(PALETTE), 0),
        ("1", Image.fromarray(_stripes([0, 255, 0]) > 0), "PNG", {},
         _stripes([(0, 0, 0), (255, 255, 255), (0, 0, 0)]), 0),
        ("L", Image.fromarray(gray), "PNG", {}, np.repeat(gray[..., None], 3, -1), 0),
        ("LA", Image.fromarray(np.stack([gray, np.full_like(gray, 90)], -1), mode="LA"), "PNG", {},
         np.repeat(gray[..., None], 3, -1), 0),
        ("RGBA", Image.fromarray(rgba), "PNG", {}, rgb, 0),
        ("CMYK TIFF", Image.fromarray(cmyk, mode="CMYK"), "TIFF", {}, cmyk_rgb, 0),
        ("CMYK JPEG", Image.fromarray(cmyk, mode="CMYK"), "JPEG", {"quality": 95}, cmyk_rgb, 12),
        ("I;16 PNG", Image.fromarray(sixteen), "PNG", {}, sixteen_rgb, 0),
        ("I TIFF", Image.fromarray(sixteen.astype(np.int32)), "TIFF", {}, sixteen_rgb, 0),
        ("F TIFF", Image.fromarray(_stripes([0.0, 0.5, 1.0], np.float32)), "TIFF", {},
         np.repeat(_stripes([0, 128, 255])[..., None], 3, -1), 0),
        ("RGB JPEG", Image.fromarray(rgb), "JPEG", {"quality": 95, "subsampling": 0}, rgb, 12),
        ("RGB WebP", Image.fromarray(rgb), "WEBP", {"lossless": True}, rgb, 0),
        ("RGBA WebP", Image.fromarray(np.concatenate([rgb, np.full((H, W, 1), 200, np.uint8)], -1)), "WEBP",
         {"lossless": True}, rgb, 0),
        ("RGB TIFF", Image.fromarray(rgb), "TIFF", {}, rgb, 0),
    ]


CASES = _cases()


def _encoded(img: Image.Image, fmt: str, kwargs: dict) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("name, img, fmt, kwargs, expected, tol", CASES, ids=[c[0] for c in CASES])
def test_every_mode_and_format_becomes_rgb_at_load_and_feeds_both_views(processor, name, img, fmt, kwargs,
                                                                        expected, tol):
    from train.batching import encode_prompt

    data = _encoded(img, fmt, kwargs)
    assert Image.open(io.BytesIO(data)).mode != "RGB" or name.startswith("RGB ")  # the mode survives saving
    row = {"problem": "<image>What colour is the middle stripe?", "answer": "green",
           "images": [{"bytes": data, "path": None}]}
    ds = D.VisionRLDataset([row], processor, **SMALL)
    (image,) = ds[0]["images"]
    assert image.mode == "RGB" and image.size == (W, H)
    diff = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert diff.max() <= tol, f"{name}: RGB off by up to {diff.max()}"
    # the trainer's two views: masked with p = 0 the masked view is the original, pixel for pixel
    masked = mask_images(ds[0]["images"], prob=0.0, generator=0)
    enc = encode_prompt(processor, ds[0]["prompt"], ds[0]["images"], masked_images=masked, **SMALL)
    assert torch.equal(enc.masked_pixel_values, enc.pixel_values)
    # and masked with p = 1 it is black where the original is not
    black = encode_prompt(processor, ds[0]["prompt"], ds[0]["images"],
                          masked_images=mask_images(ds[0]["images"], prob=1.0, generator=0), **SMALL)
    assert not torch.equal(black.masked_pixel_values, black.pixel_values)
    assert ds.stats.skipped_at_access == 0


def test_palette_image_masked_with_p0_keeps_its_colours():
    """The official `np.array(pil)` of a palette image holds palette indices: masking them and
    rebuilding the image gives gray levels 0, 1, 2. Converted first, the colours stay."""
    for transparency in (False, True):
        img = _palette_image(transparency)
        out = mask_image(img, prob=0.0, generator=0)
        assert out.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(out), _stripes(PALETTE))
        # a masked tile is black, not palette entry 0 (red)
        full = np.asarray(mask_image(img, prob=1.0, generator=0))
        assert full.max() == 0


def test_high_bit_depth_and_float_images_scale_to_8_bits():
    assert np.asarray(to_rgb(Image.fromarray(np.full((2, 2), 40000, np.uint16))))[0, 0].tolist() == [156] * 3
    eight_in_i = Image.fromarray(np.full((2, 2), 200, np.int32))  # 8-bit data in a 32-bit container
    assert np.asarray(to_rgb(eight_in_i))[0, 0].tolist() == [200] * 3
    signed = Image.fromarray(np.array([[-5.0, 5.0]], np.float32))  # no convention: stretched
    assert np.asarray(to_rgb(signed))[0].tolist() == [[0] * 3, [255] * 3]
    assert to_rgb(Image.new("La", (2, 2))).mode == "RGB"
    rgb = Image.new("RGB", (2, 2))
    assert to_rgb(rgb) is rgb
    with pytest.raises(TypeError, match="PIL image"):
        to_rgb(np.zeros((2, 2)))


def _truncated(fmt: str) -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = _encoded(Image.fromarray(noise), fmt, {})
    return data[: len(data) // 2]


def test_truncated_and_undecodable_images_are_skipped_and_counted(processor):
    good = _encoded(Image.fromarray(_stripes([(200, 10, 10)] * 3)), "PNG", {})
    rows = [{"problem": "<image>What colour?", "answer": "red", "images": [{"bytes": b, "path": None}]}
            for b in (good, _truncated("JPEG"), _truncated("WEBP"), _truncated("GIF"), b"not an image")]
    ds = D.VisionRLDataset(rows, processor, **SMALL)
    # garbage fails the header read (counted when filtering); truncated files pass it and fail
    # the full decode, counted when an item reaches them
    assert ds.stats.undecodable + len(ds) == 5
    items = [ds.get(i) for i in range(len(ds))]
    assert items[0]["answer"] == "red" and items[0]["images"][0].mode == "RGB"
    assert items[1:] == [None] * (len(ds) - 1)
    assert ds.stats.undecodable + ds.stats.skipped_at_access == 4
    assert all(ds[i]["uid"] == 0 for i in range(len(ds)))  # a bad item is skipped for a good one
