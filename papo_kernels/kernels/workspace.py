"""Workspace strategy (the speed default): cuBLAS GEMMs into a bounded logit chunk + Triton epilogues.

Per chunk of C rows per view (C from `chunk_tokens`, else the largest multiple of 64 whose fp32
logits fit PAPO_WORKSPACE_MB, default 512 MiB: C = 384 at the 7B head with two views):

    Z = [h_a; h_b] W^T        one GEMM for both views (W read once), fp32 output
    statistics epilogue        lse, logp, entropy, KLs from Z / T, split over the vocabulary
    on_chunk (fused calls)     the caller's per-row upstream gradients; the stats ops' backward
                               recomputes Z instead and takes them from autograd
    dZ epilogue                fp32 math, written in the GEMM dtype into the next slot of the ring

and whenever the dZ ring is full (PAPO_DW_RING_ROWS dZ rows of both views, default 4096 for
bf16/fp16), and at the end:

    dh = dZ_ring W             one stacked GEMM for every ring row (W read once for all of
                               them), fp32 output, each dh row rounded once into its view
    dW += dZ_ring^T X_ring     one GEMM with K = ring rows into the fp32 accumulator

Why a ring (issue 17): a dW GEMM per chunk reads and writes the whole fp32 accumulator
(2.18 GB at the 7B head) every few hundred rows, 126 GB per 16k-token call at 576-row chunks;
the ring does it once per R rows. The stacked dh GEMM has R output rows (a full wave of tiles,
where a chunk's 576 rows per view had less than one) and, with fp32 output, no split-K partial
is reduced in bf16 (torch allows that by default for bf16 GEMMs).

Memory beyond the inputs: [views * C, V] fp32 logits, the ring's dZ [R, V] and hidden rows
[R + C, H] in the GEMM dtype, dh [R, H] fp32, the statistics. 7B head, bf16, two views: 467 MB
+ 1.17 GB + 28 MB + 55 MB. `plan_bytes` gives the numbers for any call.

Variants (PAPO_WORKSPACE_VARIANT or _config.override_workspace), kept to be measured side by
side: "ring" (the default above); "ring2s": two rings of half the slots, each flush running on
a second CUDA stream while the next chunks' GEMMs and epilogues fill the other ring (on CPU or
under the interpreter the same bookkeeping runs on one stream); "v1": the 2026-11-25 path (1 GiB
of logits + dZ copy per chunk, dh per view and dW += per chunk, unsplit statistics).

Epilogues (`epilogue`, chosen by epilogue_choice.py): "triton" (stats_workspace.py with
stats_combine.py, grad_workspace.py) or "cuda", the same two epilogues as CUDA C++ kernels of the
compiled extension (cuda_epilogue.py, csrc/cuda/): one block per row for the statistics (no
split partials), an elementwise grid for dZ. Everything else here is shared.

Half inputs use fp32-output cuBLAS GEMMs (papo_kernels/_gemm.py) so no logit is rounded
before the softmax; on CPU (the interpreter) the GEMMs run in fp32 on upcast operands.
"""

from __future__ import annotations

import dataclasses

import torch
import triton

from papo_kernels import _gemm
from papo_kernels.kernels import _config, cuda_epilogue
from papo_kernels.kernels.grad_workspace import workspace_dz
from papo_kernels.kernels.stats_combine import NUM_PARTIALS
from papo_kernels.kernels.stats_workspace import stats_splits, workspace_stats
from papo_kernels.reference import RowStats

_STAT_NAMES = RowStats._fields  # logp_a, entropy_a, lse_a, logp_b, entropy_b, lse_b, kl_ab, kl_ba


def gemm_dtype(hidden: torch.Tensor) -> torch.dtype:
    """Half GEMMs only on a real GPU; CPU and the interpreter (no bf16) compute in fp32."""
    if hidden.dtype in _gemm.HALF and hidden.is_cuda and not _config.is_interpreting():
        return hidden.dtype
    return torch.float32


def chunk_rows(n: int, vocab: int, views: int, dtype: torch.dtype, chunk_tokens: int | None,
               variant: str = "ring") -> int:
    """Rows per view per chunk: `chunk_tokens`, else the largest multiple of 64 whose fp32 logits
    fit the workspace bound ("v1": logits plus the half dZ copy within 1 GiB)."""
    if chunk_tokens:
        return max(1, min(n, chunk_tokens))
    per_row, budget = views * vocab * 4, _config.workspace_bytes()
    if variant == "v1":
        per_row += views * vocab * (torch.finfo(dtype).bits // 8 if dtype in _gemm.HALF else 0)
        budget = _config.V1_WORKSPACE_BYTES
    rows = max(64, (budget // per_row) // 64 * 64)
    return max(1, min(n, rows))


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one call runs: C rows per view per chunk; the ring holds `ring_chunks` chunks of
    `dz_views` dZ row blocks; `rings` = 2 puts each flush on a second stream."""

    variant: str
    chunk: int
    views: int
    dz_views: int
    ring_chunks: int
    rings: int
    stacked_dh: bool
    keep_x: bool  # the ring keeps the chunks' hidden rows for the dW GEMM

    @property
    def ring_rows(self) -> int:
        return self.ring_chunks * self.dz_views * self.chunk

    @property
    def x_rows(self) -> int:
        """Hidden rows of one ring: its slots, plus room for the last slot's logit views."""
        if not self.keep_x:
            return self.views * self.chunk
        return (self.ring_chunks - 1) * self.dz_views * self.chunk + self.views * self.chunk


def make_plan(n: int, vocab: int, views: int, dz_views: int, need_dw: bool, dtype: torch.dtype,
              chunk_tokens: int | None) -> Plan:
    variant = _config.workspace_variant()
    c = chunk_rows(n, vocab, views, dtype, chunk_tokens, variant)
    n_chunks = triton.cdiv(max(n, 1), c)
    ring_chunks, rings = 1, 1
    if variant != "v1" and dz_views:
        rows = _config.ring_rows(dtype)
        ring_chunks = max(1, rows // (dz_views * c)) if rows else 1
        if variant == "ring2s":
            rings, ring_chunks = 2, max(1, ring_chunks // 2)
        ring_chunks = min(ring_chunks, n_chunks)  # never more than the call needs
    return Plan(variant, c, views, dz_views, ring_chunks, rings, stacked_dh=variant != "v1",
                keep_x=need_dw and dz_views > 0)


def plan_bytes(plan: Plan, vocab: int, hidden: int, dtype: torch.dtype, need_dh: bool) -> dict[str, int]:
    """Bytes of the buffers a call allocates (the ring counted once per ring buffer)."""
    item = torch.finfo(dtype).bits // 8
    ring = plan.rings * plan.ring_rows * vocab * item
    x = plan.rings * plan.x_rows * hidden * item
    dh = plan.ring_rows * hidden * 4 if (need_dh and plan.stacked_dh) else 0
    logits = plan.views * plan.chunk * vocab * 4
    return {"logits": logits, "dz_ring": ring, "x_rows": x, "dh_fp32": dh,
            "total": logits + ring + x + dh}


def _stack_rows(dst: torch.Tensor, views: list[torch.Tensor], valid_rows: torch.Tensor) -> None:
    """dst = [h_a; h_b] rows in dst's dtype, ignored rows zeroed (an ignored row may hold
    anything, even NaN, and 0 * NaN must never reach dW)."""
    c = valid_rows.shape[0]
    zero = torch.zeros((), dtype=dst.dtype, device=dst.device)
    for i, h in enumerate(views):
        part = dst[i * c:(i + 1) * c]
        if h.dtype == dst.dtype:
            torch.where(valid_rows, h, zero, out=part)
        else:
            part.copy_(torch.where(valid_rows, h.to(dst.dtype), zero))


class _Ring:
    def __init__(self, plan: Plan, vocab: int, hidden: int, dtype: torch.dtype, device: torch.device):
        self.dz = torch.empty((plan.ring_rows, vocab), dtype=dtype, device=device)
        self.x = torch.empty((plan.x_rows, hidden), dtype=dtype, device=device)
        self.fill = 0
        self.entries: list[tuple[int, int, int]] = []  # (ring offset, r0, r1) per chunk
        self.done: torch.cuda.Event | None = None  # its last flush, on the side stream


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """A second stream for ring flushes: CUDA tensors only, never under the interpreter."""
    if device.type != "cuda" or _config.is_interpreting():
        return None
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device]


class _GradSweep:
    """The dZ ring of one call: each chunk's dZ rows (and hidden rows) go into a slot; a full
    ring is flushed into dh (one stacked GEMM) and dW (one GEMM). Use as a context manager: on
    an exception the second stream is still joined before the buffers are released."""

    def __init__(self, plan: Plan, weight: torch.Tensor, dz_views: list[str],
                 dh: dict[str, torch.Tensor | None], acc: torch.Tensor | None, b_in_dw: bool):
        self.plan, self.w = plan, weight
        self.vocab, self.hidden = weight.shape
        self.dtype, self.device = weight.dtype, weight.device
        self.dz_views = dz_views
        self.dh = [dh[v] for v in dz_views]
        self.in_dw = [v == "a" or b_in_dw for v in dz_views]
        self.acc = acc
        self.rings: list[_Ring | None] = [None] * plan.rings
        self.cur = 0
        self.stream = _side_stream(self.device) if plan.rings == 2 else None
        self.dh_tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return False

    def _ring(self) -> _Ring:
        ring = self.rings[self.cur]
        if ring is None:
            ring = self.rings[self.cur] = _Ring(self.plan, self.vocab, self.hidden, self.dtype, self.device)
        if ring.done is not None:  # its previous flush must end before it is refilled
            torch.cuda.current_stream(self.device).wait_event(ring.done)
            ring.done = None
        return ring

    def slot(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [views * c, H], dz [dz_views * c, V]) for the next chunk of c rows; flushes a full ring."""
        ring = self._ring()
        need = len(self.dz_views) * c
        if ring.fill + need > ring.dz.shape[0]:
            self._flush()
            ring = self._ring()
        x0 = ring.fill if self.plan.keep_x else 0
        return ring.x[x0:x0 + self.plan.views * c], ring.dz[ring.fill:ring.fill + need]

    def commit(self, r0: int, r1: int) -> None:
        """The slot handed out last now holds dZ of rows r0:r1."""
        ring = self.rings[self.cur]
        c = r1 - r0
        off = ring.fill
        if self.plan.keep_x:
            for j, in_dw in enumerate(self.in_dw):
                if not in_dw:  # dZ_b feeds dh_b but not dW: its hidden rows must add nothing
                    ring.x[off + j * c:off + (j + 1) * c].zero_()
        if not self.plan.stacked_dh:  # "v1": dh per view per chunk, in the hidden dtype
            for j, dh in enumerate(self.dh):
                if dh is None:
                    continue
                dz = ring.dz[off + j * c:off + (j + 1) * c]
                if dh.dtype == dz.dtype:
                    torch.mm(dz, self.w, out=dh[r0:r1])
                else:
                    dh[r0:r1] = torch.mm(dz, self.w)
        ring.entries.append((off, r0, r1))
        ring.fill += len(self.dz_views) * c

    def finish(self) -> None:
        self._flush()

    def _flush(self) -> None:
        ring = self.rings[self.cur]
        if ring is None or ring.fill == 0:
            return
        if self.stream is None:
            self._flush_gemms(ring)
        else:
            main = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(main)
            with torch.cuda.stream(self.stream):
                self._flush_gemms(ring)
                ring.done = torch.cuda.Event()
                ring.done.record(self.stream)
        ring.fill, ring.entries = 0, []
        self.cur = (self.cur + 1) % self.plan.rings

    def _flush_gemms(self, ring: _Ring) -> None:
        rows = ring.fill
        dz = ring.dz[:rows]
        if self.plan.stacked_dh and any(dh is not None for dh in self.dh):
            if self.dh_tmp is None:
                self.dh_tmp = torch.empty((self.plan.ring_rows, self.hidden), dtype=torch.float32,
                                          device=self.device)
            tmp = self.dh_tmp[:rows]
            _gemm.mm_f32(dz, self.w, out=tmp)
            self._scatter_dh(tmp, ring.entries)
        if self.acc is not None:
            _gemm.addmm_f32_(self.acc, dz.T, ring.x[:rows])

    def _scatter_dh(self, tmp: torch.Tensor, entries: list[tuple[int, int, int]]) -> None:
        """Copy each view's rows of the stacked dh into dh_a / dh_b (one rounding each)."""
        k = len(self.dz_views)
        c = self.plan.chunk
        uniform = all(r1 - r0 == c for _, r0, r1 in entries) and all(
            entries[i + 1][1] == entries[i][2] for i in range(len(entries) - 1))
        if uniform:  # consecutive full chunks: one copy per view
            m, r_first = len(entries), entries[0][1]
            blocks = tmp.unflatten(0, (m, k, c))
            for j, dh in enumerate(self.dh):
                if dh is not None:
                    dh[r_first:r_first + m * c].unflatten(0, (m, c)).copy_(blocks[:, j])
            return
        for off, r0, r1 in entries:
            rows = r1 - r0
            for j, dh in enumerate(self.dh):
                if dh is not None:
                    dh[r0:r1].copy_(tmp[off + j * rows:off + (j + 1) * rows])


def _stats_configs(device, dtype, c, vocab, hid, variant):
    name = "workspace_stats_v1" if variant == "v1" else "workspace_stats"
    return (_config.get_config(name, device, dtype, c, vocab, hid),
            _config.get_config("stats_combine", device, dtype, c, vocab, hid))


def _partials(config, c, vocab, device, epilogue) -> torch.Tensor | None:
    if epilogue == "cuda":  # one block per row: no split partials
        return None
    splits = stats_splits(c, vocab, config, device)
    return torch.empty(NUM_PARTIALS * splits * c, dtype=torch.float32, device=device) if splits > 1 else None


def _stats_epilogue(epilogue, z_a, z_b, targets, outs, *, temperature, ignore_index, config, combine, part,
                    lane_sums):
    """The statistics epilogue of one chunk: Triton's (workspace_stats) or the CUDA one."""
    if epilogue == "cuda":
        cuda_epilogue.stats(z_a, z_b, targets, outs, temperature=temperature, ignore_index=ignore_index)
    else:
        workspace_stats(z_a, z_b, targets, outs, temperature=temperature, ignore_index=ignore_index,
                        config=config, combine_config=combine, part=part, lane_sums=lane_sums)


def _dz_epilogue(epilogue, z_a, z_b, dz_a, dz_b, targets, stats, grads, *, temperature, ignore_index, config):
    """The dZ epilogue of one chunk: Triton's (workspace_dz) or the CUDA one."""
    if epilogue == "cuda":
        cuda_epilogue.dz(z_a, z_b, dz_a, dz_b, targets, stats, grads, temperature=temperature,
                         ignore_index=ignore_index)
    else:
        workspace_dz(z_a, z_b, dz_a, dz_b, targets, stats, grads, temperature=temperature,
                     ignore_index=ignore_index, config=config)


def forward_stats(hidden_a, hidden_b, weight, targets, outs, *, temperature, ignore_index, chunk_tokens,
                  epilogue="triton"):
    """Phase 1 for all rows into `outs` ([N] float32 each, see stats_workspace.workspace_stats).
    `epilogue`: "triton" or "cuda" (epilogue_choice.py), here and in the two calls below."""
    n, hid = hidden_a.shape
    vocab = weight.shape[0]
    if n == 0:
        return
    two = hidden_b is not None
    views = 2 if two else 1
    dtype = gemm_dtype(hidden_a)
    w_t = weight.to(dtype).T  # [H, V] view (a copy only for CPU half inputs)
    device = hidden_a.device
    variant = _config.workspace_variant()
    c_max = chunk_rows(n, vocab, views, dtype, chunk_tokens, variant)
    ws = torch.empty((views * c_max, vocab), dtype=torch.float32, device=device)
    x_buf = None
    if two or dtype != hidden_a.dtype:
        x_buf = torch.empty((views * c_max, hid), dtype=dtype, device=device)
    config, combine = _stats_configs(device, hidden_a.dtype, c_max, vocab, hid, variant)
    part = _partials(config, c_max, vocab, device, epilogue)
    for r0 in range(0, n, c_max):
        r1 = min(r0 + c_max, n)
        c = r1 - r0
        if x_buf is None:
            x = hidden_a[r0:r1]
        else:  # both views stacked: one GEMM, W read once per chunk
            x = x_buf[:views * c]
            for i, h in enumerate((hidden_a, hidden_b)[:views]):
                x[i * c:(i + 1) * c].copy_(h[r0:r1])
        z = ws[:views * c]
        _gemm.mm_f32(x, w_t, out=z)
        _stats_epilogue(
            epilogue, z[:c], z[c:] if two else None, targets[r0:r1], {k: v[r0:r1] for k, v in outs.items()},
            temperature=temperature, ignore_index=ignore_index, config=config, combine=combine,
            part=part, lane_sums=variant != "v1",
        )


def _dz_names(two: bool, need_dh_a: bool, need_dh_b: bool, need_dw: bool, b_in_dw: bool) -> list[str]:
    """The views whose dZ a call needs, in ring order."""
    names = ["a"] if (need_dh_a or need_dw) else []
    if two and (need_dh_b or (need_dw and b_in_dw)):
        names.append("b")
    return names


def describe(hidden_a: torch.Tensor, weight: torch.Tensor, *, two_view: bool, need_dh_a: bool,
             need_dh_b: bool, need_dw: bool, b_in_dw: bool, chunk_tokens: int | None = None) -> dict:
    """The plan of a gradient call with these inputs and its buffers' bytes (for benchmarks)."""
    n, hid = hidden_a.shape
    vocab = weight.shape[0]
    dtype = gemm_dtype(hidden_a)
    names = _dz_names(two_view, need_dh_a, need_dh_b, need_dw, b_in_dw)
    plan = make_plan(n, vocab, 2 if two_view else 1, len(names), need_dw, dtype, chunk_tokens)
    sizes = plan_bytes(plan, vocab, hid, dtype, need_dh_a or need_dh_b)
    return dict(variant=plan.variant, chunk=plan.chunk, ring_rows=plan.ring_rows, rings=plan.rings,
                dw_gemms=triton.cdiv(triton.cdiv(n, plan.chunk), plan.ring_chunks) if need_dw else 0,
                **{f"{k}_bytes": v for k, v in sizes.items()})


def _dz_slices(dz, names, c):
    """(dz_a, dz_b) rows of a slot: the blocks are stacked in `names` order."""
    blocks = {v: dz[j * c:(j + 1) * c] for j, v in enumerate(names)}
    return blocks.get("a"), blocks.get("b")


def backward_grads(hidden_a, hidden_b, weight, targets, stats, grads, dh_a, dh_b, weight_grad_acc, *,
                   b_in_dw, temperature, ignore_index, chunk_tokens, epilogue="triton"):
    """Phase 2 for all rows: writes dh_a / dh_b ([N, H], hidden dtype, or None) and adds dW into
    `weight_grad_acc` ([V, H] float32 or None). `stats` / `grads`: dicts of [N] float32 (None = 0).
    `b_in_dw`: view b is live, so dZ_b^T h_b enters dW."""
    n, hid = hidden_a.shape
    vocab = weight.shape[0]
    if n == 0:
        return
    two = hidden_b is not None
    need_dw = weight_grad_acc is not None
    names = _dz_names(two, dh_a is not None, dh_b is not None, need_dw, b_in_dw)
    if not names:
        return
    load_b = two and (grads.get("kl_ab") is not None or grads.get("kl_ba") is not None or "b" in names)
    views = 2 if load_b else 1
    device = hidden_a.device
    dtype = gemm_dtype(hidden_a)
    w_g = weight.to(dtype)
    plan = make_plan(n, vocab, views, len(names), need_dw, dtype, chunk_tokens)
    c_max = plan.chunk
    ws = torch.empty((views * c_max, vocab), dtype=torch.float32, device=device)
    config = _config.get_config("workspace_dz", device, hidden_a.dtype, c_max, vocab, hid)
    valid = targets != ignore_index
    sources = [hidden_a, hidden_b][:views]
    with _GradSweep(plan, w_g, names, {"a": dh_a, "b": dh_b}, weight_grad_acc, b_in_dw) as sweep:
        for r0 in range(0, n, c_max):
            r1 = min(r0 + c_max, n)
            c = r1 - r0
            x, dz = sweep.slot(c)
            _stack_rows(x, [h[r0:r1] for h in sources], valid[r0:r1, None])
            z = ws[:views * c]
            _gemm.mm_f32(x, w_g.T, out=z)
            dz_a, dz_b = _dz_slices(dz, names, c)
            _dz_epilogue(
                epilogue, z[:c], z[c:] if load_b else None, dz_a, dz_b, targets[r0:r1],
                {k: (None if v is None else v[r0:r1]) for k, v in stats.items()},
                {k: (None if v is None else v[r0:r1]) for k, v in grads.items()},
                temperature=temperature, ignore_index=ignore_index, config=config,
            )
            sweep.commit(r0, r1)
        sweep.finish()


def loss_rows(hidden_a, hidden_b, weight, targets, on_chunk, dh_a, dh_b, weight_grad_acc, *,
              b_in_dw, temperature, ignore_index, chunk_tokens, epilogue="triton"):
    """Gradient in forward with one logit GEMM per chunk: Z is computed once, the statistics
    epilogue reads it, `on_chunk(r0, r1, RowStats)` turns them into upstream gradients, and the
    dZ epilogue reuses the same Z (6HV FLOPs per token and view instead of 8HV).

    Writes dh_a / dh_b ([N, H] or None) and adds dW into `weight_grad_acc` (fp32 or None).
    """
    n, hid = hidden_a.shape
    vocab = weight.shape[0]
    two = hidden_b is not None
    views = 2 if two else 1
    device = hidden_a.device
    need_dw = weight_grad_acc is not None
    names = _dz_names(two, dh_a is not None, dh_b is not None, need_dw, b_in_dw)
    dtype = gemm_dtype(hidden_a)
    w_g = weight.to(dtype)
    plan = make_plan(n, vocab, views, len(names), need_dw, dtype, chunk_tokens)
    c_max = plan.chunk
    ws = torch.empty((views * c_max, vocab), dtype=torch.float32, device=device)
    stats_config, combine = _stats_configs(device, hidden_a.dtype, c_max, vocab, hid, plan.variant)
    part = _partials(stats_config, c_max, vocab, device, epilogue)
    dz_config = _config.get_config("workspace_dz", device, hidden_a.dtype, c_max, vocab, hid)
    stat_names = _STAT_NAMES if two else _STAT_NAMES[:3]
    valid = targets != ignore_index
    sources = [hidden_a, hidden_b][:views]
    x_only = None if names else torch.empty((views * c_max, hid), dtype=dtype, device=device)
    opts = dict(temperature=temperature, ignore_index=ignore_index)
    with _GradSweep(plan, w_g, names, {"a": dh_a, "b": dh_b}, weight_grad_acc, b_in_dw) as sweep:
        for r0 in range(0, n, c_max):
            r1 = min(r0 + c_max, n)
            c = r1 - r0
            x, dz = sweep.slot(c) if names else (x_only[:views * c], None)
            # the statistics of ignored rows are 0 whatever their (zeroed) logits
            _stack_rows(x, [h[r0:r1] for h in sources], valid[r0:r1, None])
            z = ws[:views * c]
            _gemm.mm_f32(x, w_g.T, out=z)  # the only logit GEMM of this chunk
            t = targets[r0:r1]
            # one allocation per chunk: the caller may keep these tensors
            buf = torch.empty((len(stat_names), c), dtype=torch.float32, device=device)
            outs = dict(zip(stat_names, buf))
            _stats_epilogue(epilogue, z[:c], z[c:] if two else None, t, outs, config=stats_config,
                            combine=combine, part=part, lane_sums=plan.variant != "v1", **opts)
            grads = on_chunk(r0, r1, RowStats(**outs))
            if grads is None or not names:
                continue
            grads_d = {k: (None if g is None else g.to(torch.float32).contiguous())
                       for k, g in grads._asdict().items()}
            if not two:
                for k in ("logp_b", "entropy_b", "kl_ab", "kl_ba"):
                    grads_d[k] = None
            load_b = two and (grads_d["kl_ab"] is not None or grads_d["kl_ba"] is not None or "b" in names)
            stats_d = {k: outs[k] for k in ("lse_a", "entropy_a")}
            if two:
                stats_d.update({k: outs[k] for k in ("lse_b", "entropy_b", "kl_ab", "kl_ba")})
            dz_a, dz_b = _dz_slices(dz, names, c)
            _dz_epilogue(epilogue, z[:c], z[c:] if load_b else None, dz_a, dz_b, t, stats_d, grads_d,
                         config=dz_config, **opts)
            sweep.commit(r0, r1)
        sweep.finish()
