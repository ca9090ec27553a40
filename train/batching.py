"""Prompt encoding and padding-free packed micro-batches for Qwen2.5-VL.

A prompt is encoded once (`encode_prompt`) into its token ids, pixel values
and image grid; the original and masked views of a prompt share token ids and
grid (masking happens on the raw image before the same resize), so only the
pixel values differ. `pack` concatenates whole sequences (prompt + response)
into one row with per-sample Qwen2.5-VL 3-D rope position ids, prefixed by
the per-sample text positions that transformers uses to build a
block-diagonal causal mask (no attention across samples, no padding).
`plan_micro_batches` splits sequences into micro-batches by a token budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from train.data import build_messages, process_image


@dataclass
class EncodedPrompt:
    """One prompt ready for the model.

    input_ids: [L] int64 prompt tokens (image placeholders expanded).
    mm_token_type_ids: [L] int64 (0 text, 1 image) as the processor returns them.
    pixel_values: [P, C*t*p*p] float32 patches of all the prompt's images (None if no image).
    masked_pixel_values: same shape, from the masked images (None until masking).
    image_grid_thw: [num_images, 3] int64 (None if no image).
    raw_images: the prompt's original (unmasked) RGB PIL images after `process_image` (bounded
        to the data's pixel limits), i.e. what the processor patchified with its defaults;
        engines that preprocess images themselves (vLLM) need them.
    prompt_text: the chat-templated prompt text (one `<|vision_start|><|image_pad|><|vision_end|>`
        per image, unexpanded).
    """

    input_ids: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    masked_pixel_values: torch.Tensor | None = None
    raw_images: list | None = None
    prompt_text: str | None = None

    def __len__(self) -> int:
        return int(self.input_ids.numel())


def prompt_text(processor, messages) -> str:
    """Chat-templated prompt text with the generation prompt appended."""
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompt(processor, prompt: str, images, *, min_pixels: int, max_pixels: int,
                  masked_images=None) -> EncodedPrompt:
    """Encode a formatted prompt (with `<image>` placeholders) and its raw PIL images.

    Images (and `masked_images`, if given) are first bounded to [min_pixels, max_pixels]
    with `process_image` (the official `process_image` on the raw image), then the processor
    patchifies them with its own defaults (the checkpoint's preprocessor config), as the
    official pipeline does: both views get identical grids, and vLLM, whose processor reads
    the same config, gets them too from the same bounded images.
    """
    images = [process_image(im, min_pixels=min_pixels, max_pixels=max_pixels) for im in images]
    text = prompt_text(processor, build_messages(prompt))
    enc = processor(images=images or None, text=[text], return_tensors="pt")
    out = EncodedPrompt(
        input_ids=enc["input_ids"][0],
        mm_token_type_ids=enc["mm_token_type_ids"][0] if "mm_token_type_ids" in enc
        else torch.zeros_like(enc["input_ids"][0]),
        pixel_values=enc.get("pixel_values"),
        image_grid_thw=enc.get("image_grid_thw"),
        raw_images=list(images),
        prompt_text=text,
    )
    if masked_images is not None:
        if len(masked_images) != len(images):
            raise ValueError(f"masked_images has {len(masked_images)} images, the prompt has {len(images)}")
        masked = [process_image(im, min_pixels=min_pixels, max_pixels=max_pixels) for im in masked_images]
        for a, b in zip(images, masked):
            if a.size != b.size:
                raise ValueError(f"a masked image changed size: {a.size} -> {b.size}")
        if masked:
            menc = processor.image_processor(images=masked, return_tensors="pt")
            if not torch.equal(menc["image_grid_thw"], out.image_grid_thw):
                raise ValueError("masked images produced a different image grid than the originals")
            out.masked_pixel_values = menc["pixel_values"]
    return out


@dataclass
class Sequence:
    """A prompt and one response (response ids end with EOS if the response finished)."""

    prompt: EncodedPrompt
    response_ids: torch.Tensor  # [R] int64

    def __len__(self) -> int:
        return len(self.prompt) + int(self.response_ids.numel())


@dataclass
class PackedBatch:
    """Model inputs of a packed micro-batch plus where each response's logits live.

    input_ids: [1, S]; position_ids: [4, 1, S] (text positions, then t/h/w rope rows);
    mm_token_type_ids: [1, S]; pixel_values / masked_pixel_values: [P, D] or None;
    image_grid_thw: [I, 3] or None.
    gather_index: [B, T] positions in the packed row whose hidden state predicts
    response token t of sample b (0 where padded); response_ids: [B, T] targets
    (padded with 0); response_mask: [B, T] float 0/1.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    masked_pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    gather_index: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor

    def model_inputs(self, *, masked: bool = False) -> dict:
        """Keyword arguments for `Qwen2_5_VLModel.forward` (original or masked view)."""
        pixels = self.masked_pixel_values if masked else self.pixel_values
        if masked and self.pixel_values is not None and pixels is None:
            raise ValueError("masked view requested but the prompts carry no masked_pixel_values")
        return dict(input_ids=self.input_ids, position_ids=self.position_ids,
                    mm_token_type_ids=self.mm_token_type_ids, pixel_values=pixels,
                    image_grid_thw=self.image_grid_thw, attention_mask=None, use_cache=False)

    def to(self, device) -> PackedBatch:
        """Copy to a device."""
        move = (lambda t: None if t is None else t.to(device))
        return PackedBatch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


def rope_positions(model, prompt: EncodedPrompt, total_len: int) -> torch.Tensor:
    """[3, total_len] Qwen2.5-VL rope positions of a prompt followed by response tokens."""
    ids = torch.zeros(total_len, dtype=torch.long)
    ids[: len(prompt)] = prompt.input_ids
    mm = torch.zeros(total_len, dtype=torch.long)
    mm[: len(prompt)] = prompt.mm_token_type_ids
    if prompt.image_grid_thw is None:
        return torch.arange(total_len).view(1, -1).expand(3, -1).clone()
    pos, _ = model.get_rope_index(ids.view(1, -1), mm.view(1, -1), image_grid_thw=prompt.image_grid_thw)
    return pos[:, 0]


def pack(model, seqs: list[Sequence]) -> PackedBatch:
    """Concatenate whole sequences into one padding-free row.

    `model` is the `Qwen2_5_VLModel` (it owns `get_rope_index`). Position ids
    restart at 0 for every sample, which is how transformers finds the sample
    boundaries for the block-diagonal mask (the forward must run with
    attention_mask=None and use_cache=False).
    """
    if not seqs:
        raise ValueError("pack needs at least one sequence")
    ids, mm, pos, pix, mpix, grids = [], [], [], [], [], []
    T = max(int(s.response_ids.numel()) for s in seqs)
    gather = torch.zeros(len(seqs), T, dtype=torch.long)
    targets = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.float32)
    offset = 0
    for b, s in enumerate(seqs):
        P, R = len(s.prompt), int(s.response_ids.numel())
        L = P + R
        ids.append(torch.cat([s.prompt.input_ids, s.response_ids]))
        mm.append(torch.cat([s.prompt.mm_token_type_ids, torch.zeros(R, dtype=torch.long)]))
        text_pos = torch.arange(L).view(1, L)
        pos.append(torch.cat([text_pos, rope_positions(model, s.prompt, L)], 0))
        if s.prompt.pixel_values is not None:
            pix.append(s.prompt.pixel_values)
            grids.append(s.prompt.image_grid_thw)
            if s.prompt.masked_pixel_values is not None:
                mpix.append(s.prompt.masked_pixel_values)
        # hidden state at position P-1+t predicts response token t
        gather[b, :R] = offset + P - 1 + torch.arange(R)
        targets[b, :R] = s.response_ids
        mask[b, :R] = 1.0
        offset += L
    has_masked = bool(pix) and len(mpix) == len(pix)
    return PackedBatch(
        input_ids=torch.cat(ids).view(1, -1),
        position_ids=torch.cat(pos, dim=1).view(4, 1, -1),
        mm_token_type_ids=torch.cat(mm).view(1, -1),
        pixel_values=torch.cat(pix) if pix else None,
        masked_pixel_values=torch.cat(mpix) if has_masked else None,
        image_grid_thw=torch.cat(grids) if grids else None,
        gather_index=gather,
        response_ids=targets,
        response_mask=mask,
    )


def gather_response_hidden(hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """[1, S, D] packed last hidden states -> [B, T, D] states that predict each response token."""
    return hidden[0][batch.gather_index]


def plan_micro_batches(lengths: list[int], *, max_seqs: int, max_tokens: int = 0) -> list[list[int]]:
    """Split sequence indices (kept in order) into micro-batches.

    Each micro-batch holds at most `max_seqs` sequences and, if `max_tokens`
    > 0, at most `max_tokens` tokens (a longer single sequence gets its own
    micro-batch). Order is preserved so results do not depend on the split.
    """
    if max_seqs < 1:
        raise ValueError(f"max_seqs must be >= 1, got {max_seqs}")
    out: list[list[int]] = []
    cur: list[int] = []
    cur_tokens = 0
    for i, n in enumerate(lengths):
        if cur and (len(cur) >= max_seqs or (max_tokens > 0 and cur_tokens + n > max_tokens)):
            out.append(cur)
            cur, cur_tokens = [], 0
        cur.append(i)
        cur_tokens += n
    if cur:
        out.append(cur)
    return out
