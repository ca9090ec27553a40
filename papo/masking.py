"""Image masking for the perception KL: the paper's random patch blackening and a variant.

`mask_images` is the official `random_patch_blackening` exactly (docs/algorithm.md): the raw
image, before the Qwen processor, is tiled row-major into patch_size x patch_size squares from
(0, 0) (edge tiles truncated) and each tile is set to 0 (black) with probability `prob`,
independently. One draw per prompt: all rollouts of a prompt share its masked images
(`mask_batch`). `mask_pixel_values` masks whole vision patches of already-processed
Qwen2.5-VL inputs instead; it is a variant, not the paper's recipe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from papo.images import load_image, to_rgb

__all__ = ["load_image", "mask_batch", "mask_image", "mask_images", "mask_pixel_values"]

# Modes whose channel value 0 is black (or transparent black); they are masked as they are.
# In the others a zero is not black ("P": palette entry 0, "CMYK": white) or the pixels are
# not the 8-bit samples the processor expects ("1", "I;16", "I", "F"): they are converted to
# RGB first (`papo.images.to_rgb`), as the trainer does when it loads an image.
MASKABLE_MODES = ("RGB", "RGBA", "L", "LA")

# CLIP normalization used by the Qwen2.5-VL image processor (OPENAI_CLIP_MEAN / _STD).
QWEN2_5_VL_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
QWEN2_5_VL_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

RandomSource = np.random.Generator | np.random.RandomState


def _as_random_source(generator: Any) -> RandomSource:
    if isinstance(generator, (np.random.Generator, np.random.RandomState)):
        return generator
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return np.random.default_rng(int(generator))
    raise TypeError(
        "generator must be a numpy.random.Generator, a numpy.random.RandomState (the official "
        f"code draws from NumPy's legacy global state) or an int seed, got {type(generator).__name__}"
    )


def _uniform(rng: RandomSource, shape: tuple[int, int]) -> np.ndarray:
    # RandomState.random_sample returns the same stream as successive np.random.rand() calls,
    # so a seeded RandomState reproduces the official row-major per-tile draws exactly
    if isinstance(rng, np.random.RandomState):
        return rng.random_sample(shape)
    return rng.random(shape)


def mask_image(image: Any, *, patch_size: int = 14, prob: float = 0.6, generator: Any) -> Image.Image:
    """Blacken random square tiles of one raw image (official `random_patch_blackening`).

    Args:
        image: PIL image of any mode, bytes, {"bytes", "path"} dict or path.
        patch_size: tile side in pixels (int > 0); the official value is 14.
        prob: probability that a tile is blackened, in [0, 1]; the official value is 0.6.
        generator: numpy Generator, numpy RandomState or int seed; tiles are drawn row-major.

    Returns:
        A new PIL image of the input's size; its mode is the input's for RGB, RGBA, L and LA,
        else RGB (the input converted by `papo.images.to_rgb` before masking, so that a masked
        tile is black and an unmasked one keeps its colours). Every channel of a masked tile
        (alpha included, as the official code does) is 0.
    """
    _check_params(patch_size, prob)
    rng = _as_random_source(generator)
    return _mask_one(load_image(image), patch_size, prob, rng)


def _check_params(patch_size: Any, prob: Any) -> None:
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
        raise ValueError(f"patch_size must be an int >= 1, got {patch_size!r}")
    if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be a float in [0, 1], got {prob!r}")


def _mask_one(pil: Image.Image, patch_size: int, prob: float, rng: RandomSource) -> Image.Image:
    if pil.mode not in MASKABLE_MODES:
        pil = to_rgb(pil)
    width, height = pil.size
    if width == 0 or height == 0:
        raise ValueError(f"images: image has zero size {pil.size}")
    arr = np.array(pil)
    tiles_y, tiles_x = -(-height // patch_size), -(-width // patch_size)
    masked_tiles = _uniform(rng, (tiles_y, tiles_x)) < prob
    # expand the tile grid to pixels and cut the truncated edge tiles
    pixel_mask = np.repeat(np.repeat(masked_tiles, patch_size, 0), patch_size, 1)[:height, :width]
    arr[pixel_mask] = 0
    out = Image.fromarray(arr)
    if out.mode != pil.mode:  # fromarray infers the mode from the array; keep the input's
        out = out.convert(pil.mode)
    return out


def mask_images(images: Any, *, patch_size: int = 14, prob: float = 0.6, generator: Any) -> Any:
    """Mask every image of one prompt (docs/algorithm.md, "Masking").

    Args:
        images: one image or a list/tuple of the prompt's images (multi-image prompts: every
            image is masked, each with its own tiles). Each image: PIL (any mode; see
            `mask_image`), encoded bytes, {"bytes", "path"} dict or path; decoded to PIL first.
        patch_size: tile side in pixels (int > 0, official 14).
        prob: per-tile masking probability in [0, 1] (official 0.6).
        generator: numpy Generator / RandomState or int seed. The same seed gives the same
            masks; a RandomState seeded like NumPy's global state gives the official masks.

    Returns:
        A masked PIL image for a single input, else a list of masked PIL images (same order,
        same sizes; modes as `mask_image` returns them).
    """
    _check_params(patch_size, prob)
    rng = _as_random_source(generator)
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("images must contain at least one image")
        return [_mask_one(load_image(im), patch_size, prob, rng) for im in images]
    return _mask_one(load_image(images), patch_size, prob, rng)


def mask_batch(
    prompt_images: Sequence[Any],
    *,
    rollouts_per_prompt: int = 1,
    patch_size: int = 14,
    prob: float = 0.6,
    generator: Any,
) -> list[list[Image.Image]]:
    """Mask the images of a batch of prompts once per prompt, shared by its rollouts.

    The official trainer masks before `repeat(n, interleave=True)`, so the n rollouts of a
    prompt see the same masked images; this returns that repeated layout.

    Args:
        prompt_images: one entry per prompt: an image or a list of the prompt's images.
        rollouts_per_prompt: n (int >= 1).
        patch_size, prob, generator: as in `mask_images`; prompts are drawn in order.

    Returns:
        A list of len(prompt_images) * n lists of masked PIL images, prompt-major
        (rollout j of prompt i at index i * n + j); the rollouts of a prompt share the same
        image objects.
    """
    if isinstance(rollouts_per_prompt, bool) or not isinstance(rollouts_per_prompt, int) \
            or rollouts_per_prompt < 1:
        raise ValueError(f"rollouts_per_prompt must be an int >= 1, got {rollouts_per_prompt!r}")
    if not isinstance(prompt_images, (list, tuple)):
        raise TypeError("prompt_images must be a list (one entry per prompt), "
                        f"got {type(prompt_images).__name__}")
    rng = _as_random_source(generator)
    out: list[list[Image.Image]] = []
    for images in prompt_images:
        masked = mask_images(images if isinstance(images, (list, tuple)) else [images],
                             patch_size=patch_size, prob=prob, generator=rng)
        out.extend([masked] * rollouts_per_prompt)
    return out


def mask_pixel_values(
    pixel_values: Tensor,
    image_grid_thw: Tensor,
    *,
    prob: float = 0.6,
    generator: torch.Generator | None = None,
    spatial_merge_size: int | None = None,
    temporal_patch_size: int = 2,
    image_mean: Sequence[float] = QWEN2_5_VL_IMAGE_MEAN,
    image_std: Sequence[float] = QWEN2_5_VL_IMAGE_STD,
) -> Tensor:
    """Mask whole vision patches of processed Qwen2.5-VL inputs (a variant, not the paper's).

    Each row of `pixel_values` is one 14 x 14 (x temporal_patch_size) vision patch; a masked
    row is set to black in normalized space, (0 - mean_c) / std_c per channel, which is what
    blackening the pixels would give. Unlike `mask_images`, the tiles follow the resized
    image's ViT patches. The input is not modified.

    Args:
        pixel_values: [P, C * temporal_patch_size * p * p] float, rows of all images
            concatenated (the processor's layout: channel-major columns).
        image_grid_thw: [num_images, 3] integer (t, h, w) patch grid per image;
            sum(t * h * w) must equal P.
        prob: masking probability per patch (or per merged token) in [0, 1].
        generator: torch.Generator on pixel_values' device, or None for the global RNG.
        spatial_merge_size: None masks each 14-px patch independently; 2 (Qwen2.5-VL's merge)
            masks whole LLM image tokens (the m x m consecutive rows the merger fuses).
        temporal_patch_size: frames per patch (2 for Qwen2.5-VL).
        image_mean, image_std: per-channel normalization of the processor.

    Returns:
        [P, D] tensor like pixel_values with the masked rows set to black.
    """
    if (not isinstance(pixel_values, Tensor) or pixel_values.dim() != 2
            or not pixel_values.dtype.is_floating_point):
        raise ValueError("pixel_values must be a floating [P, D] tensor")
    if not isinstance(image_grid_thw, Tensor) or image_grid_thw.dim() != 2 or image_grid_thw.shape[1] != 3:
        raise ValueError("image_grid_thw must be an integer [num_images, 3] tensor")
    if image_grid_thw.dtype.is_floating_point:
        raise TypeError(f"image_grid_thw must be an integer tensor, got {image_grid_thw.dtype}")
    if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be a float in [0, 1], got {prob!r}")
    if len(image_mean) != len(image_std):
        raise ValueError("image_mean and image_std must have the same length (one per channel)")
    counts = image_grid_thw.prod(-1)
    if int(counts.sum()) != pixel_values.shape[0]:
        raise ValueError(
            f"image_grid_thw describes {int(counts.sum())} patches but pixel_values has "
            f"{pixel_values.shape[0]} rows"
        )
    channels = len(image_mean)
    if pixel_values.shape[1] % (channels * temporal_patch_size) != 0:
        raise ValueError(
            f"pixel_values.shape[1] = {pixel_values.shape[1]} is not a multiple of "
            f"channels * temporal_patch_size = {channels * temporal_patch_size}"
        )
    group = 1
    if spatial_merge_size is not None:
        if (isinstance(spatial_merge_size, bool) or not isinstance(spatial_merge_size, int)
                or spatial_merge_size < 1):
            raise ValueError(f"spatial_merge_size must be None or an int >= 1, got {spatial_merge_size!r}")
        group = spatial_merge_size**2
        if bool((counts % group != 0).any()):
            raise ValueError(f"each image's patch count must be a multiple of spatial_merge_size^2 = {group}")
    num_rows = pixel_values.shape[0]
    draws = torch.rand(num_rows // group, generator=generator, device=pixel_values.device)
    row_mask = (draws < prob).repeat_interleave(group)
    mean = torch.tensor(image_mean, dtype=torch.float64)
    std = torch.tensor(image_std, dtype=torch.float64)
    black = ((0.0 - mean) / std).to(device=pixel_values.device, dtype=pixel_values.dtype)
    out = pixel_values.clone().view(num_rows, channels, -1)
    out[row_mask] = black.view(1, channels, 1).expand(int(row_mask.sum()), channels, out.shape[-1])
    return out.view_as(pixel_values)
