"""Decoding stored images and converting every PIL mode to 8-bit RGB.

Datasets in the ViRL39K format hold images of any mode PIL decodes: palette ("P", with or
without transparency), 1-bit, "L", "LA", "RGBA", "CMYK", 16-bit ("I;16", "I"), float ("F"),
from PNG, JPEG, GIF, TIFF or WebP files. The Qwen processor and the patch blackening of
`papo.masking` need 8-bit RGB, where a zero is black. `to_rgb` converts once, right after
decoding, so that the original view and the masked view are built from the same RGB pixels.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image

# 16-bit samples map to 8 bits by x / 257 (65535 -> 255, 257 -> 1): exact for 8-bit data
# stored in 16 bits (x * 257) and the nearest level otherwise.
_UINT16_TO_UINT8 = 257.0


def load_image(image: Any) -> Image.Image:
    """Decode an image to a fully loaded PIL image (its mode unchanged).

    Args:
        image: a PIL.Image.Image; raw encoded bytes; a dict {"bytes": ..., "path": ...} as
            stored in the ViRL39K parquet files (bytes win over path); or a str/os.PathLike path.

    Returns:
        A fully loaded PIL.Image.Image (truncated files fail here, not later).
    """
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict):
        data, path = image.get("bytes"), image.get("path")
        if data is not None:
            image = data
        elif path is not None:
            image = path
        else:
            raise ValueError("images: an image dict must have non-empty 'bytes' or 'path'")
    if isinstance(image, (bytes, bytearray, memoryview)):
        pil = Image.open(io.BytesIO(bytes(image)))
    elif isinstance(image, (str, os.PathLike)):
        pil = Image.open(image)
    else:
        raise TypeError(
            "images must be PIL images, encoded bytes, {'bytes', 'path'} dicts or paths, "
            f"got {type(image).__name__}"
        )
    pil.load()
    return pil


def _gray_levels(values: np.ndarray, mode: str) -> np.ndarray:
    """8-bit gray levels of a single-channel integer or float image."""
    v = values.astype(np.float64)
    v[~np.isfinite(v)] = 0.0
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        v = v / _UINT16_TO_UINT8
    elif mode == "F" and lo >= 0.0 and hi <= 1.0:
        v = v * 255.0  # float images in [0, 1] (the usual convention for float data)
    elif lo >= 0.0 and hi <= 255.0:
        pass  # 8-bit data held in a wider container
    elif lo >= 0.0 and hi <= 65535.0:
        v = v / _UINT16_TO_UINT8  # 16-bit data (e.g. a 16-bit PNG opened as "I")
    else:
        # no convention fits (negative or > 16-bit values): stretch the image's own range
        v = (v - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(v)
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as 8-bit RGB, whatever its mode.

    Palette, 1-bit, gray, CMYK, YCbCr and alpha modes use PIL's conversions (alpha is dropped,
    as the official `process_image`'s `convert("RGB")` does; a palette's transparency too).
    16-bit and 32-bit integer and float images are scaled to 8 bits (PIL's own conversion
    clips them at 255, which turns most 16-bit images white): "I;16*" by 1/257; "I" and "F"
    as 8-bit data when all values lie in [0, 255], "F" in [0, 1] times 255, "I" up to 65535
    by 1/257, anything else stretched from its min..max.

    Args:
        image: a PIL image of any mode.

    Returns:
        The input itself if it is RGB, else a new RGB image of the same size.

    Raises:
        ValueError: the mode has no conversion to RGB.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        gray = _gray_levels(np.asarray(image), mode)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "PA" or (mode == "P" and "transparency" in image.info):
        # through RGBA: the palette's colours, with PIL's transparency warning avoided
        return image.convert("RGBA").convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as e:
        error = e
    for via in ("RGBA", "LA"):  # modes PIL converts only through a neighbour (premultiplied "La")
        try:
            return image.convert(via).convert("RGB")
        except ValueError:
            pass
    raise ValueError(f"images: cannot convert image mode {mode!r} to RGB ({error})") from error
