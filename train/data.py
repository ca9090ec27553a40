"""Data: the ViRL39K-format loader, the PAPO prompt template and the synthetic visual task.

ViRL39K format (docs/algorithm.md): one row per question with `problem`
(str, carrying one `<image>` placeholder per image), `answer` (str) and
`images` (a list of images stored as `{"bytes", "path"}` dicts, PIL images,
raw bytes or file paths). `load_records` reads it from local parquet / arrow /
jsonl files, `save_to_disk` directories or directories of such files, first
through `datasets` and, if that trips (the official code's "'List' feature
type" issue), through pandas. `VisionRLDataset` decodes images to 8-bit
RGB PIL images (every mode converted once, at load), drops prompts longer
than `max_prompt_length` tokens (image tokens included) and skips
undecodable images, counting both. `process_image` bounds a raw image to
[min_pixels, max_pixels]; the Qwen processor then runs with its own
defaults (`processor_grid`), as in the official pipeline.

The synthetic task has answers that need the image (shape counts, colours,
relative sizes, tallest bar); with every image blacked out no policy can beat
the split's majority-answer rate. Write it with

    python -m train.data synth --out data/synth --train 2000 --val 256

`--variant misleading` writes a harder variant whose text misleads a policy that
does not look: training answers are skewed towards one answer per question type
and each prompt carries a hint naming an answer that is often right in training,
while validation answers are uniform and its hints are always wrong (see
`MISLEADING_HINT`). The default ("standard") task is unchanged by this option.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from papo.images import load_image, to_rgb

log = logging.getLogger(__name__)

# The instruction of the official `math_perception.jinja` (docs/algorithm.md),
# appended after the trimmed problem and a blank line.
PROMPT_INSTRUCTION = (
    "You first think through the reasoning process as an internal monologue, enclosed within "
    "<think> </think> tags. Then, provide your final answer enclosed within \\boxed{}."
)
IMAGE_PLACEHOLDER = "<image>"


def format_prompt(problem: str) -> str:
    """PAPO's prompt: `{{ problem | trim }}\\n\\n<instruction>` (math_perception.jinja)."""
    if not isinstance(problem, str):
        raise TypeError(f"problem must be a str, got {type(problem).__name__}")
    return f"{problem.strip()}\n\n{PROMPT_INSTRUCTION}"


def build_messages(prompt: str) -> list[dict[str, Any]]:
    """Split a prompt at `<image>` placeholders into Qwen chat content segments.

    Returns a one-message conversation `[{"role": "user", "content": [...]}]`
    where each `<image>` becomes `{"type": "image"}` and the text between them
    `{"type": "text", "text": ...}` (empty pieces dropped), as EasyR1 does.
    No system message: the chat template adds Qwen's default one.
    """
    content: list[dict[str, Any]] = []
    for i, piece in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    return [{"role": "user", "content": content}]


# --------------------------------------------------------------------------- images


def decode_image(item: Any, *, base_dir: str | None = None) -> Image.Image:
    """Decode one stored image to a fully loaded 8-bit RGB PIL image.

    Accepts a PIL image, a `{"bytes", "path"}` dict (the parquet storage of
    `datasets.Image`), raw bytes or a file path (relative paths resolve
    against `base_dir`). Every mode (palette, 1-bit, gray, alpha, CMYK,
    16-bit, float) is converted to RGB here, once (`papo.images.to_rgb`): both
    views of a prompt, the original and the masked one, start from these pixels.
    Raises ValueError for anything undecodable (truncated files included).
    """
    if isinstance(item, dict) and item.get("bytes") is None and item.get("path"):
        return decode_image(item["path"], base_dir=base_dir)
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        item = Path(base_dir) / path if not path.is_absolute() and base_dir is not None else path
    if not isinstance(item, (Image.Image, dict, bytes, bytearray, str, os.PathLike)):
        raise ValueError(f"unsupported image value of type {type(item).__name__}")
    try:
        img = load_image(item)  # loads fully: truncated files fail now, not in the processor
        if img.width <= 0 or img.height <= 0:
            raise ValueError(f"image has zero size {img.size}")
        return to_rgb(img)
    except ValueError as e:
        raise ValueError(f"undecodable image: {e}") from e
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError)
        raise ValueError(f"undecodable image: {type(e).__name__}: {e}") from e


def image_size(item: Any, *, base_dir: str | None = None) -> tuple[int, int]:
    """(width, height) of a stored image from its header only (no full decode)."""
    if isinstance(item, Image.Image):
        return item.size
    try:
        if isinstance(item, dict):
            if item.get("bytes") is not None:
                return Image.open(io.BytesIO(item["bytes"])).size
            return image_size(item.get("path"), base_dir=base_dir)
        if isinstance(item, (bytes, bytearray)):
            return Image.open(io.BytesIO(item)).size
        if isinstance(item, (str, os.PathLike)):
            path = Path(item)
            if not path.is_absolute() and base_dir is not None:
                path = Path(base_dir) / path
            return Image.open(path).size
    except Exception as e:
        raise ValueError(f"undecodable image: {type(e).__name__}: {e}") from e
    raise ValueError(f"unsupported image value of type {type(item).__name__}")


def resized_size(width: int, height: int, *, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Size after `process_image`'s down/up-scaling (EasyR1's integer truncation)."""
    if width * height > max_pixels:
        f = math.sqrt(max_pixels / (width * height))
        width, height = int(width * f), int(height * f)
    if width * height < min_pixels:
        f = math.sqrt(min_pixels / (width * height))
        width, height = int(width * f), int(height * f)
    return max(width, 1), max(height, 1)


def process_image(img: Image.Image, *, min_pixels: int, max_pixels: int) -> Image.Image:
    """EasyR1's `process_image`: downscale to <= max_pixels, upscale to >= min_pixels, RGB.

    The bounds apply to the raw image, before the Qwen processor (which then runs with its
    own defaults, `processor_grid`), as the official pipeline does. Applied after masking
    (the official masking works on the raw image), to the original and the masked copy alike,
    so both get the same grid.
    """
    w, h = resized_size(img.width, img.height, min_pixels=min_pixels, max_pixels=max_pixels)
    if (w, h) != img.size:
        img = img.resize((w, h))
    return to_rgb(img)


def processor_pixel_limits(image_processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) a Qwen2-VL image processor resizes to when called with its
    defaults (a checkpoint's preprocessor_config.json; Qwen2.5-VL's: 3136 and 12,845,056)."""
    size = getattr(image_processor, "size", None)
    get = size.get if isinstance(size, dict) else (lambda k, d=None: getattr(size, k, d))
    lo = get("shortest_edge", None) or getattr(image_processor, "min_pixels", None)
    hi = get("longest_edge", None) or getattr(image_processor, "max_pixels", None)
    if lo is None or hi is None:
        raise ValueError(f"{type(image_processor).__name__} has no min/max pixel limits "
                         "(size.shortest_edge and size.longest_edge, or min_pixels and max_pixels): "
                         "not a Qwen2-VL image processor")
    return int(lo), int(hi)


def processor_grid(image_processor, width: int, height: int) -> tuple[int, int]:
    """(grid_h, grid_w) in vision patches that the processor's defaults give an image of this
    (already bounded) size: Qwen's `smart_resize` to multiples of patch x merge pixels."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    lo, hi = processor_pixel_limits(image_processor)
    patch = int(getattr(image_processor, "patch_size", 14))
    merge = int(getattr(image_processor, "merge_size", 2))
    h, w = smart_resize(height, width, factor=patch * merge, min_pixels=lo, max_pixels=hi)
    return h // patch, w // patch


def num_image_tokens(image_processor, width: int, height: int) -> int:
    """LLM tokens Qwen2.5-VL spends on an image of this (already bounded) size."""
    gh, gw = processor_grid(image_processor, width, height)
    merge = int(getattr(image_processor, "merge_size", 2))
    return gh * gw // (merge * merge)


# --------------------------------------------------------------------------- loading

_TABLE_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json")


def _split_aliases(split: str) -> list[str]:
    aliases = {"val": "validation", "valid": "validation", "dev": "validation", "validation": "val"}
    out = [split]
    if split in aliases:
        out.append(aliases[split])
    return out


def _fallback_files(path: Path, split: str) -> list[str]:
    """The spec's fallback file patterns (`train-*.parquet`, `data/train-*.parquet`, ...)."""
    files: list[str] = []
    for s in _split_aliases(split):
        for pattern in (f"{s}-*.parquet", f"{s}.parquet", f"data/{s}-*.parquet", f"data/{s}.parquet"):
            files += sorted(glob.glob(str(path / pattern)))
        if files:
            break
    return files


def _load_with_datasets(path: Path, split: str):
    import datasets

    datasets.disable_progress_bars()  # one bar per split/cast drowns the trainer's own progress
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            for s in _split_aliases(split):
                if s in ds:
                    return ds[s]
            raise KeyError(f"split {split!r} not in {path} (has {sorted(ds)})")
        return ds
    if path.is_file():
        builder = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json"}[path.suffix]
        return datasets.load_dataset(builder, data_files={"train": str(path)}, split="train")
    last: Exception | None = None
    for s in _split_aliases(split):
        try:
            return datasets.load_dataset(str(path), split=s)
        except ValueError as e:  # unknown split name: try its alias
            last = e
    raise last if last is not None else ValueError(f"cannot load split {split!r} from {path}")


def _load_with_pandas(path: Path, split: str) -> list[dict[str, Any]]:
    import pandas as pd

    files = [str(path)] if path.is_file() else _fallback_files(path, split)
    if not files:
        raise FileNotFoundError(
            f"no parquet files for split {split!r} under {path} (looked for {split}-*.parquet, "
            f"{split}.parquet, data/{split}-*.parquet)"
        )
    frames = []
    for f in files:
        try:
            frames.append(pd.read_parquet(f))
        except Exception as e:  # pyarrow's errors name neither the role of the file nor a remedy
            raise ValueError(f"dataset file {f} is not a readable parquet file "
                             f"({type(e).__name__}: {e})") from e
    frame = pd.concat(frames, ignore_index=True)
    return frame.to_dict(orient="records")


def _load_json_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file (or a .json array), with the line of the first bad row named.

    The fallback for files `datasets` cannot load: its errors point inside pyarrow, not at the
    line to fix; rows with differing value types (which pyarrow refuses) load here as they are.
    """
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"dataset file {path} is not valid JSON: {e}") from None
        numbered = list(enumerate(rows, start=1))
        what = "element"
    else:
        numbered = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"dataset file {path} line {n} is not valid JSON: {e}") from None
        what = "line"
    for n, row in numbered:
        if not isinstance(row, dict):
            raise ValueError(f"dataset file {path} {what} {n} must be a JSON object (one row with "
                             f"problem/answer/images fields), got {type(row).__name__}")
    return [row for _, row in numbered]


class _ImagesUndecoded:
    """Row access to a `datasets.Dataset` with its image columns left as raw dicts,
    so that decoding (and the skip-and-count of bad images) stays in our hands."""

    def __init__(self, ds):
        import datasets

        features = ds.features
        for name, feat in features.items():
            inner = getattr(feat, "feature", None)
            if isinstance(feat, datasets.Image):
                ds = ds.cast_column(name, datasets.Image(decode=False))
            elif isinstance(inner, datasets.Image):
                ds = ds.cast_column(name, type(feat)(datasets.Image(decode=False)))
        self.ds = ds
        self.column_names = list(ds.column_names)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.ds[int(i)]


def load_records(path: str | os.PathLike, split: str = "train") -> Sequence[dict[str, Any]]:
    """Load ViRL39K-format rows from a local path, never the network.

    `path` is a parquet/arrow/jsonl file, a `save_to_disk` directory, or a
    directory of split files (`train-*.parquet`, `data/validation-*.parquet`,
    ...). `split` "val" also finds "validation" and vice versa. Tries
    `datasets` first and falls back to pandas over the parquet files when
    `datasets` fails (as the official loader does). Returns a sequence of row
    dicts whose image values are undecoded (`{"bytes", "path"}` dicts, bytes
    or paths).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"dataset path does not exist: {p}")
    if p.is_file() and p.suffix not in _TABLE_SUFFIXES:
        raise ValueError(f"dataset file {p} must end in one of {_TABLE_SUFFIXES}")
    # Offline by construction: a local path never needs the hub.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        return _ImagesUndecoded(_load_with_datasets(p, split))
    except Exception as e:  # noqa: BLE001 - any datasets failure takes the spec's fallback path
        if p.is_file() and p.suffix in (".jsonl", ".json"):
            rows = _load_json_rows(p)
            if not rows:
                raise ValueError(f"dataset file {p} has no rows") from None
            return rows
        if p.is_file() and p.suffix != ".parquet":
            raise ValueError(f"dataset file {p} cannot be read ({type(e).__name__}: {e})") from e
        log.warning("datasets could not load %s (%s: %s); falling back to pandas", p, type(e).__name__, e)
        return _load_with_pandas(p, split)


@dataclass
class DataStats:
    """What the dataset dropped and why (reported in the run's metrics)."""

    total: int = 0
    kept: int = 0
    overlong: int = 0
    undecodable: int = 0
    bad_rows: int = 0
    skipped_at_access: int = 0
    examples: list[str] = field(default_factory=list)

    def note(self, msg: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(msg)


class VisionRLDataset:
    """ViRL39K-format prompts ready for rollouts.

    Each item is a dict: `uid` (row index in the source), `problem`, `answer`,
    `prompt` (the formatted text with `<image>` placeholders), `messages`
    (chat segments) and `images` (decoded RGB PIL images, before masking and
    resizing).

    Args:
        records: rows from `load_records`.
        processor: a Qwen2.5-VL processor (its tokenizer and chat template are used).
        prompt_key, answer_key, image_key: field names (ViRL39K: problem/answer/images).
        min_pixels, max_pixels: bounds on the raw image's pixel count (`process_image`;
            official 200,704 and 1,003,520); the processor's own limits apply after them.
        max_prompt_length: prompts longer than this many tokens, image tokens
            included, are dropped and counted.
        base_dir: directory that relative image paths resolve against.
    """

    def __init__(self, records: Sequence[dict[str, Any]], processor, *, prompt_key: str = "problem",
                 answer_key: str = "answer", image_key: str = "images", min_pixels: int = 256 * 28 * 28,
                 max_pixels: int = 1280 * 28 * 28, max_prompt_length: int = 4096,
                 base_dir: str | None = None):
        if not 0 < min_pixels <= max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels}, "
                             f"max_pixels={max_pixels}")
        self.records = records
        self.processor = processor
        self.prompt_key, self.answer_key, self.image_key = prompt_key, answer_key, image_key
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.max_prompt_length = max_prompt_length
        self.base_dir = base_dir
        self.stats = DataStats(total=len(records))
        self._check_columns()
        self.indices = self._filter()
        self.stats.kept = len(self.indices)
        if not self.indices:
            raise ValueError(f"no usable rows: {self.stats}")

    def _check_columns(self) -> None:
        columns = getattr(self.records, "column_names", None)
        if columns is None and len(self.records):
            columns = list(self.records[0].keys())
        for role, key in (("prompt_key", self.prompt_key), ("answer_key", self.answer_key),
                          ("image_key", self.image_key)):
            if columns is not None and key not in columns:
                raise KeyError(f"dataset has no field {key!r} ({role}); its fields are {sorted(columns)}")

    def _images_of(self, row: dict[str, Any]) -> list[Any]:
        images = row[self.image_key]
        if images is None:
            return []
        if isinstance(images, (dict, str, bytes, Image.Image)):
            return [images]
        if not isinstance(images, (list, tuple, np.ndarray)):  # numpy object array: the pandas path
            raise ValueError(f"{self.image_key!r} must be a list of images, got {type(images).__name__}")
        return list(images)

    def _prompt_tokens(self, prompt: str, sizes: list[tuple[int, int]]) -> int:
        text = self.processor.apply_chat_template(build_messages(prompt), add_generation_prompt=True,
                                                  tokenize=False)
        n_text = len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        n_img = 0
        for w, h in sizes:
            w, h = resized_size(w, h, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
            n_img += num_image_tokens(self.processor.image_processor, w, h)
        # each image's single <|image_pad|> in `text` expands to n image tokens
        return n_text - len(sizes) + n_img

    def _filter(self) -> list[int]:
        keep = []
        for i in range(len(self.records)):
            row = self.records[i]
            problem, answer = row.get(self.prompt_key), row.get(self.answer_key)
            if not isinstance(problem, str) or answer is None:
                self.stats.bad_rows += 1
                self.stats.note(f"row {i}: {self.prompt_key!r} not a string or {self.answer_key!r} missing")
                continue
            try:
                images = self._images_of(row)
            except ValueError as e:
                self.stats.bad_rows += 1
                self.stats.note(f"row {i}: {e}")
                continue
            if problem.count(IMAGE_PLACEHOLDER) != len(images):
                self.stats.bad_rows += 1
                self.stats.note(f"row {i}: {problem.count(IMAGE_PLACEHOLDER)} <image> placeholders "
                                f"but {len(images)} images")
                continue
            try:
                sizes = [image_size(im, base_dir=self.base_dir) for im in images]
            except ValueError as e:
                self.stats.undecodable += 1
                self.stats.note(f"row {i}: {e}")
                continue
            try:
                n_tokens = self._prompt_tokens(format_prompt(problem), sizes)
            except ValueError as e:  # the Qwen processor refuses some sizes (aspect ratio above 200)
                self.stats.bad_rows += 1
                self.stats.note(f"row {i}: image refused by the image processor: {e}")
                continue
            if n_tokens > self.max_prompt_length:
                self.stats.overlong += 1
                continue
            keep.append(i)
        return keep

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, idx: int) -> dict[str, Any] | None:
        """Item `idx`, or None if its images fail to decode (counted in stats)."""
        src = self.indices[idx]
        row = self.records[src]
        try:
            images = [decode_image(im, base_dir=self.base_dir) for im in self._images_of(row)]
        except ValueError as e:
            self.stats.skipped_at_access += 1
            self.stats.note(f"row {src}: {e}")
            return None
        prompt = format_prompt(row[self.prompt_key])
        return {
            "uid": int(src),
            "problem": row[self.prompt_key],
            "answer": str(row[self.answer_key]),
            "prompt": prompt,
            "messages": build_messages(prompt),
            "images": images,
            # optional ViRL39K metadata, used for per-category evaluation
            "category": str(row.get("category") or ""),
        }

    def __getitem__(self, idx: int) -> dict[str, Any]:
        """Item `idx`; an undecodable item is skipped for the next decodable one (and counted)."""
        for k in range(len(self.indices)):
            item = self.get((idx + k) % len(self.indices))
            if item is not None:
                return item
        raise ValueError(f"no decodable image in the whole dataset: {self.stats}")


def load_dataset_for(path: str, split: str, processor, **kwargs) -> VisionRLDataset:
    """`load_records` + `VisionRLDataset`, with relative image paths resolved next to the data."""
    p = Path(path)
    base = str(p if p.is_dir() else p.parent)
    return VisionRLDataset(load_records(path, split), processor, base_dir=base, **kwargs)


# --------------------------------------------------------------------------- synthetic task

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 220),
    "yellow": (230, 200, 30),
}
BACKGROUND = (235, 235, 235)
SYNTH_TASKS = ("count", "colour", "size", "bar")
# Question templates; every answer is a single word the grader compares exactly.
QUESTIONS = {
    "count": "<image>How many shapes are in the image?",
    "colour": "<image>What colour is the shape in the image?",
    "size": "<image>Which shape is larger, the circle or the square?",
    "bar": "<image>Which bar is the tallest: left, middle or right?",
}
ANSWERS = {
    "count": ["1", "2", "3", "4"],
    "colour": list(COLOURS),
    "size": ["circle", "square"],
    "bar": ["left", "middle", "right"],
}


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, colour) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.rectangle(box, fill=colour)


def make_synthetic_item(rng: np.random.Generator, task: str, size: int = 84, *,
                        answer: str | None = None) -> tuple[str, str, Image.Image]:
    """One synthetic question: (problem with `<image>`, answer, RGB image of `size` x `size`).

    Answers are drawn uniformly from `ANSWERS[task]` (unless `answer` imposes one), so
    with the image hidden the best guess scores the task's majority rate.
    """
    if task not in SYNTH_TASKS:
        raise ValueError(f"task must be one of {SYNTH_TASKS}, got {task!r}")
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    if answer is None:
        answer = ANSWERS[task][int(rng.integers(len(ANSWERS[task])))]
    elif answer not in ANSWERS[task]:
        raise ValueError(f"answer {answer!r} is not an answer of task {task!r}: {ANSWERS[task]}")
    cell = size / 3
    if task == "count":
        cells = rng.choice(9, size=int(answer), replace=False)
        for c in cells:
            cx, cy = (c % 3 + 0.5) * cell, (c // 3 + 0.5) * cell
            colour = list(COLOURS.values())[int(rng.integers(len(COLOURS)))]
            _draw_shape(draw, ("circle", "square")[int(rng.integers(2))], cx, cy, cell * 0.35, colour)
    elif task == "colour":
        cx, cy = rng.uniform(0.35, 0.65, size=2) * size
        r = rng.uniform(0.18, 0.3) * size
        _draw_shape(draw, ("circle", "square")[int(rng.integers(2))], cx, cy, r, COLOURS[answer])
    elif task == "size":
        big, small = rng.uniform(0.17, 0.22) * size, rng.uniform(0.07, 0.11) * size
        r_circle, r_square = (big, small) if answer == "circle" else (small, big)
        left_is_circle = bool(rng.integers(2))
        xs = (0.27 * size, 0.73 * size) if left_is_circle else (0.73 * size, 0.27 * size)
        colours = list(COLOURS.values())
        _draw_shape(draw, "circle", xs[0], size / 2, r_circle, colours[int(rng.integers(4))])
        _draw_shape(draw, "square", xs[1], size / 2, r_square, colours[int(rng.integers(4))])
    else:  # bar chart: three bars on a baseline, the answer's one clearly tallest
        tallest = ANSWERS["bar"].index(answer)
        heights = rng.uniform(0.2, 0.55, size=3)
        heights[tallest] = rng.uniform(0.7, 0.9)
        colour = list(COLOURS.values())[int(rng.integers(4))]
        base = 0.92 * size
        for b in range(3):
            x0 = (b + 0.2) * cell
            draw.rectangle([x0, base - heights[b] * size * 0.85, x0 + 0.6 * cell, base], fill=colour)
        draw.line([0, base, size, base], fill=(60, 60, 60), width=1)
    return QUESTIONS[task], answer, img


SYNTH_VARIANTS = ("standard", "misleading")
# The misleading variant's prompt: this sentence, then the standard question, after the image.
MISLEADING_HINT = "Hint: the answer is {hint}. "


def misleading_answer_and_hint(rng: np.random.Generator, task: str, *, train: bool, skew: float,
                               hint_accuracy: float) -> tuple[str, str]:
    """(answer, hint) of one question of the misleading variant.

    Training: the answer is the task's favoured one (`ANSWERS[task][0]`) with probability
    1/m + skew * (1 - 1/m) for m answers (skew 0: uniform, 1: always the favoured one),
    otherwise a uniform other one, and the hint names the answer with probability
    `hint_accuracy`, otherwise a uniform wrong one; a policy that reads only the text can
    score well. Validation: uniform answers and a hint that is always wrong, so those text
    priors score at most chance there while reading the image still pays.
    """
    answers = ANSWERS[task]
    if train:
        if rng.random() < 1 / len(answers) + skew * (1 - 1 / len(answers)):
            answer = answers[0]
        else:
            others = answers[1:]
            answer = others[int(rng.integers(len(others)))]
    else:
        answer = answers[int(rng.integers(len(answers)))]
    wrong = [a for a in answers if a != answer]
    if train and rng.random() < hint_accuracy:
        hint = answer
    else:
        hint = wrong[int(rng.integers(len(wrong)))]
    return answer, hint


def synthetic_corpus() -> list[str]:
    """Every string the synthetic task can produce, for training the tiny tokenizer."""
    lines = [q.replace(IMAGE_PLACEHOLDER, "") for q in QUESTIONS.values()]
    for task, answers in ANSWERS.items():
        for a in answers:
            lines.append(f"<think> The answer is {a}. </think> \\boxed{{{a}}}")
    lines += [" ".join(ANSWERS[t]) for t in SYNTH_TASKS]
    return lines


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def synthetic_rows(n: int, *, seed: int, tasks: Sequence[str] = SYNTH_TASKS, image_size: int = 84,
                   id_prefix: str = "synth", variant: str = "standard", train: bool = True,
                   skew: float = 0.5, hint_accuracy: float = 0.5) -> list[dict[str, Any]]:
    """`n` synthetic ViRL39K-format rows (tasks cycled in order, images as PNG dicts).

    `variant` "misleading" draws answers and a hint per row with `misleading_answer_and_hint`
    (`train` selects its training or validation rule); "standard" ignores `train`, `skew` and
    `hint_accuracy`.
    """
    for t in tasks:
        if t not in SYNTH_TASKS:
            raise ValueError(f"tasks: unknown task {t!r}; choose from {SYNTH_TASKS}")
    if variant not in SYNTH_VARIANTS:
        raise ValueError(f"variant must be one of {SYNTH_VARIANTS}, got {variant!r}")
    for name, p in (("skew", skew), ("hint_accuracy", hint_accuracy)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        if variant == "misleading":
            answer, hint = misleading_answer_and_hint(rng, task, train=train, skew=skew,
                                                      hint_accuracy=hint_accuracy)
            problem, answer, img = make_synthetic_item(rng, task, image_size, answer=answer)
            hinted = IMAGE_PLACEHOLDER + MISLEADING_HINT.format(hint=hint)
            problem = problem.replace(IMAGE_PLACEHOLDER, hinted, 1)
        else:
            problem, answer, img = make_synthetic_item(rng, task, image_size)
        rows.append({"id": f"{id_prefix}-{i}", "problem": problem, "answer": answer,
                     "images": [{"bytes": _png_bytes(img), "path": None}], "category": task})
    return rows


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    """Write rows with the `datasets` feature metadata (images as a List of Image)."""
    import datasets

    features = datasets.Features({
        "id": datasets.Value("string"),
        "problem": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "images": datasets.List(datasets.Image()),
        "category": datasets.Value("string"),
    })
    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_list(rows, features=features)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))


def majority_rate(answers: Sequence[str]) -> float:
    """Accuracy of always answering the most common answer (the blind baseline)."""
    if not answers:
        return 0.0
    return Counter(answers).most_common(1)[0][1] / len(answers)


def write_synthetic(out: str | os.PathLike, *, n_train: int = 2000, n_val: int = 256, seed: int = 0,
                    tasks: Sequence[str] = SYNTH_TASKS, image_size: int = 84, variant: str = "standard",
                    skew: float = 0.5, hint_accuracy: float = 0.5) -> dict[str, Any]:
    """Write the synthetic task as `out/data/{train,validation}-00000-of-00001.parquet`.

    Train and validation use disjoint seeds. Returns a summary (counts and the
    blind baselines per split: the overall majority-answer rate and the mean
    of per-task majority rates, which a policy that reads the question but not
    the image can reach). The summary is also written to `out/summary.json`.
    `variant`, `skew` and `hint_accuracy` select the misleading variant (`synthetic_rows`).
    """
    if n_train <= 0 or n_val <= 0:
        raise ValueError(f"n_train and n_val must be positive, got {n_train}, {n_val}")
    if image_size < 28:
        raise ValueError(f"image_size must be >= 28 pixels, got {image_size}")
    out = Path(out)
    summary: dict[str, Any] = {"tasks": list(tasks), "image_size": image_size, "seed": seed}
    if variant != "standard":
        summary.update(variant=variant, skew=skew, hint_accuracy=hint_accuracy)
    for split, n, s in (("train", n_train, seed), ("validation", n_val, seed + 1_000_003)):
        rows = synthetic_rows(n, seed=s, tasks=tasks, image_size=image_size, id_prefix=split, variant=variant,
                              train=split == "train", skew=skew, hint_accuracy=hint_accuracy)
        _write_parquet(rows, out / "data" / f"{split}-00000-of-00001.parquet")
        by_task: dict[str, list[str]] = {}
        for r in rows:
            by_task.setdefault(r["category"], []).append(r["answer"])
        summary[split] = {
            "rows": n,
            "majority_rate": majority_rate([r["answer"] for r in rows]),
            "question_aware_majority_rate": sum(majority_rate(a) * len(a) for a in by_task.values()) / n,
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    """CLI: `python -m train.data synth --out DIR ...` and `python -m train.data inspect PATH`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="write the synthetic visual task (ViRL39K format)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--train", type=int, default=2000, help="training rows")
    s.add_argument("--val", type=int, default=256, help="validation rows")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=84, help="square image side in pixels")
    s.add_argument("--tasks", default=",".join(SYNTH_TASKS), help="comma-separated subset of " + ",".join(SYNTH_TASKS))
    s.add_argument("--variant", default="standard", choices=SYNTH_VARIANTS,
                   help="misleading: skewed training answers and hints that mislead a blind policy")
    s.add_argument("--skew", type=float, default=0.5,
                   help="misleading: skew of training answers towards one answer (0 uniform, 1 always it)")
    s.add_argument("--hint-accuracy", type=float, default=0.5, help="misleading: P(hint right) in training")
    i = sub.add_parser("inspect", help="load a ViRL39K-format dataset and print its fields and first row")
    i.add_argument("path")
    i.add_argument("--split", default="train")
    args = parser.parse_args(argv)
    if args.cmd == "synth":
        summary = write_synthetic(args.out, n_train=args.train, n_val=args.val, seed=args.seed,
                                  tasks=[t for t in args.tasks.split(",") if t], image_size=args.image_size,
                                  variant=args.variant, skew=args.skew, hint_accuracy=args.hint_accuracy)
        print(json.dumps(summary, indent=2))
    else:
        rows = load_records(args.path, args.split)
        first = dict(rows[0])
        print(f"{len(rows)} rows; fields: {sorted(first)}")
        print({k: (v if isinstance(v, str) else type(v).__name__) for k, v in first.items()})


if __name__ == "__main__":
    main()
