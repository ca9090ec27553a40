"""papo.masking: the official patch blackening, reproducibility, prompts and rollouts, decoding,
and the processed-pixel variant against the real Qwen2-VL image processor."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from papo.masking import load_image, mask_batch, mask_image, mask_images, mask_pixel_values


def _noise_image(width, height, mode="RGB", seed=0):
    # values >= 1 everywhere: every 0 in a masked copy comes from masking
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 0, "LA": 2}[mode]
    shape = (height, width, channels) if channels else (height, width)
    return Image.fromarray(rng.integers(1, 256, shape, dtype=np.uint8), mode=None)


def _official_random_patch_blackening(pil_img, patch_size=14, black_prob=0.5):
    """The official function (docs/algorithm.md, "Masking"), drawing from NumPy's global state."""
    img = np.array(pil_img).astype(np.float32)
    h, w = img.shape[:2]
    for y in range(0, h, patch_size):
        for x in range(0, w, patch_size):
            if np.random.rand() < black_prob:
                img[y:min(y + patch_size, h), x:min(x + patch_size, w)] = 0
    return Image.fromarray(img.astype(np.uint8))


def _black(img):
    arr = np.array(img)
    return arr == 0 if arr.ndim == 2 else (arr == 0).all(-1)


def test_bit_identical_to_the_official_function():
    img = _noise_image(45, 31)  # edge tiles truncated in both directions
    np.random.seed(123)
    official = _official_random_patch_blackening(img, 14, 0.6)
    ours = mask_image(img, patch_size=14, prob=0.6, generator=np.random.RandomState(123))
    np.testing.assert_array_equal(np.array(ours), np.array(official))


def test_masked_fraction_tiles_and_size():
    img = _noise_image(280, 280)  # 20 x 20 tiles
    fractions = []
    for seed in range(5):
        out = mask_images(img, prob=0.6, generator=seed)
        assert out.size == img.size and out.mode == img.mode
        black = _black(out)
        # every 14 x 14 tile is either all black or untouched
        tiles = black.reshape(20, 14, 20, 14).transpose(0, 2, 1, 3).reshape(400, -1)
        assert np.all(tiles.all(1) | ~tiles.any(1))
        untouched = ~black
        np.testing.assert_array_equal(np.array(out)[untouched], np.array(img)[untouched])
        fractions.append(black.mean())
    # binomial(400, 0.6) per image: std 0.0245; 5 images average: std 0.011
    assert abs(np.mean(fractions) - 0.6) < 0.05
    assert all(abs(f - 0.6) < 0.12 for f in fractions)
    assert np.array(mask_images(img, prob=0.0, generator=0)).min() > 0
    assert np.array(mask_images(img, prob=1.0, generator=0)).max() == 0


def test_reproducible_from_a_seed():
    img = _noise_image(60, 50)
    a = np.array(mask_images(img, generator=7))
    b = np.array(mask_images(img, generator=np.random.default_rng(7)))
    c = np.array(mask_images(img, generator=8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_modes_are_kept_and_every_channel_blackened(mode):
    img = _noise_image(30, 20, mode)
    assert img.mode == mode
    out = mask_images(img, prob=0.5, generator=1)
    assert out.mode == mode and out.size == img.size
    arr, original = np.array(out), np.array(img)
    black = _black(out)
    # 3 x 2 tiles with p = 0.5 (seed 1): some blackened, some kept; the noise image has no 0
    assert 0 < black.mean() < 1
    np.testing.assert_array_equal(arr[~black], original[~black])
    if arr.ndim == 3:  # alpha included, as the official code does
        assert np.array_equal((arr == 0).all(-1), (arr == 0).any(-1))


def test_multi_image_prompt_and_shared_rollouts():
    prompt_a = [_noise_image(56, 42, seed=1), _noise_image(30, 70, seed=2)]
    prompt_b = _noise_image(40, 40, seed=3)
    out = mask_batch([prompt_a, prompt_b], rollouts_per_prompt=3, prob=0.6, generator=0)
    assert len(out) == 6 and all(len(x) == n for x, n in zip(out, [2, 2, 2, 1, 1, 1]))
    # every image of a multi-image prompt is masked, with its own tiles, keeping its size
    for masked, original in zip(out[0], prompt_a):
        assert masked.size == original.size and 0 < _black(masked).mean() < 1
    # the rollouts of a prompt share the same masked images
    for j in (1, 2):
        assert out[j] is out[0]
        assert out[3 + j] is out[3]
    # a second call with the same seed reproduces the whole batch
    again = mask_batch([prompt_a, prompt_b], rollouts_per_prompt=3, prob=0.6, generator=0)
    for x, y in zip(out[0] + out[3], again[0] + again[3]):
        np.testing.assert_array_equal(np.array(x), np.array(y))


def test_decodes_bytes_dicts_and_paths(tmp_path):
    img = _noise_image(33, 29)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    data = buffer.getvalue()
    path = tmp_path / "img.png"
    path.write_bytes(data)
    expected = np.array(mask_images(img, generator=5))
    for source in (data, {"bytes": data, "path": None}, {"bytes": None, "path": str(path)}, str(path)):
        np.testing.assert_array_equal(np.array(mask_images(source, generator=5)), expected)
    assert load_image(img) is img


@pytest.mark.parametrize(
    "images, kwargs, exc, match",
    [
        (Image.new("RGB", (0, 20)), dict(), ValueError, "zero size"),
        (42, dict(), TypeError, "images"),
        ({"bytes": None, "path": None}, dict(), ValueError, "images"),
        ([], dict(), ValueError, "images"),
        (Image.new("RGB", (20, 20)), dict(prob=1.5), ValueError, "prob"),
        (Image.new("RGB", (20, 20)), dict(patch_size=0), ValueError, "patch_size"),
        (Image.new("RGB", (20, 20)), dict(generator=None), TypeError, "generator"),
    ],
)
def test_bad_input(images, kwargs, exc, match):
    kwargs = {"generator": 0, **kwargs}
    with pytest.raises(exc, match=match):
        mask_images(images, **kwargs)


# ---------------------------------------------------------------------- processed-pixel variant


@pytest.fixture(scope="module")
def qwen_processor():
    transformers = pytest.importorskip("transformers")
    return transformers.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)


def test_pixel_variant_black_equals_the_processed_black_image(qwen_processor):
    grid_image = Image.new("RGB", (56, 84), (255, 255, 255))
    processed = qwen_processor(images=[grid_image], return_tensors="pt")
    pv, thw = processed["pixel_values"].double(), processed["image_grid_thw"]
    assert thw.tolist() == [[1, 6, 4]]
    out = mask_pixel_values(pv, thw, prob=1.0, generator=torch.Generator().manual_seed(0))
    black = qwen_processor(images=[Image.new("RGB", (56, 84))], return_tensors="pt")["pixel_values"].double()
    torch.testing.assert_close(out, black, rtol=0, atol=1e-6)


def test_pixel_variant_masks_whole_patches_and_merged_tokens(qwen_processor):
    # a black 28 x 28 block aligned with one 2 x 2 merge group is exactly 4 consecutive rows
    arr = np.full((84, 56, 3), 255, np.uint8)
    arr[28:56, 28:56] = 0
    processed = qwen_processor(images=[Image.fromarray(arr)], return_tensors="pt")
    pv = processed["pixel_values"]
    black_value = mask_pixel_values(pv[:1], torch.tensor([[1, 1, 1]]), prob=1.0)[0]
    black_rows = torch.nonzero(torch.isclose(pv, black_value, atol=1e-5).all(-1)).squeeze(-1).tolist()
    assert len(black_rows) == 4 and black_rows[0] % 4 == 0
    assert black_rows == list(range(black_rows[0], black_rows[0] + 4))

    two = torch.randn(16 + 12, pv.shape[1], generator=torch.Generator().manual_seed(0))
    thw = torch.tensor([[1, 4, 4], [1, 2, 6]])
    for merge in (None, 2):
        out = mask_pixel_values(two, thw, prob=0.5, spatial_merge_size=merge,
                                generator=torch.Generator().manual_seed(1))
        masked = torch.isclose(out, black_value.to(out.dtype), atol=1e-5).all(-1)
        unchanged = (out == two).all(-1)
        assert bool((masked | unchanged).all()) and 0 < int(masked.sum()) < 28
        if merge:
            assert bool((masked.view(-1, 4) == masked.view(-1, 4)[:, :1]).all())
    assert torch.equal(two, torch.randn(28, pv.shape[1], generator=torch.Generator().manual_seed(0)))


def test_pixel_variant_bad_input():
    pv = torch.zeros(8, 1176)
    with pytest.raises(ValueError, match="image_grid_thw"):
        mask_pixel_values(pv, torch.tensor([[1, 2, 2]]))
    with pytest.raises(ValueError, match="prob"):
        mask_pixel_values(pv, torch.tensor([[1, 2, 4]]), prob=-0.1)
    with pytest.raises(ValueError, match="spatial_merge_size"):
        mask_pixel_values(pv, torch.tensor([[1, 2, 3], [1, 1, 2]]), spatial_merge_size=2)
