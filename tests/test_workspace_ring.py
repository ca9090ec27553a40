"""The workspace strategy's dZ ring (kernels/workspace.py) against the torch backend and float64.

The ring gathers several chunks' dZ rows before one stacked dh GEMM and one dW GEMM; these tests
put its boundaries where bugs hide: ring sizes that are not a multiple of the chunk, N smaller
and larger than the ring, a partial last chunk, chunks skipped by the loss (non-consecutive ring
entries), ignored rows with NaN hidden states, view b constant or live, the corner cases of
`backward_grads` (dh of a view that does not enter dW, dW alone), and the three variants ("ring",
"ring2s" with its two half rings, "v1"). Shapes are tiny: the kernels run under the Triton
interpreter on CPU (fp32 GEMMs there; half inputs are upcast after loading).
"""

from __future__ import annotations

import math

import pytest
import torch

import papo_kernels as pk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if "triton" not in pk.available_backends(DEVICE):
    pytest.skip("backend='triton' cannot run here (no triton, or no GPU and no TRITON_INTERPRET=1)",
                allow_module_level=True)

from papo_kernels import _gemm, reference  # noqa: E402
from papo_kernels import kernels as K  # noqa: E402
from papo_kernels._options import KernelOptions  # noqa: E402
from papo_kernels.kernels import _config, workspace  # noqa: E402
from papo_kernels.reference import RowGrads  # noqa: E402

NAMES = ("logp_a", "logp_b", "entropy_a", "entropy_b", "kl_ab", "kl_ba")


def _inputs(n, h, v, dtype, *, ignored=(), seed=0, nan_ignored=False):
    g = torch.Generator().manual_seed(seed)
    ha = torch.randn(n, h, generator=g)
    hb = ha + 0.5 * torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * (2.0 / h**0.5)
    t = torch.randint(0, v, (n,), generator=g)
    for i in ignored:
        t[i] = -100
        if nan_ignored:
            ha[i], hb[i] = math.nan, math.inf
    return tuple(x.to(device=DEVICE, dtype=dtype) for x in (ha, hb, w)) + (t.to(DEVICE),)


def _coefs(n, seed=1):
    return torch.randn(6, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _loss(stats, coefs, index=None):
    c = coefs if index is None else coefs[:, index.cpu()]
    c = c.to(device=stats[0].device, dtype=stats[0].dtype)
    return sum((c[i] * getattr(stats, k)).sum() for i, k in enumerate(NAMES))


def _fused(backend, ha, hb, w, t, coefs, *, b_live, temperature, skip=(), **kw):
    """fused_two_view_loss; chunks starting at a row in `skip` return a loss without grad (their
    rows get no gradient and leave a gap in the ring)."""
    a, b, wl = (x.detach().clone().requires_grad_(g) for x, g in zip((ha, hb, w), (True, b_live, True)))

    def loss_fn(stats, index):
        if int(index[0]) in skip:
            return torch.zeros((), device=index.device), {}
        return _loss(stats, coefs, index), {}

    loss, _ = pk.fused_two_view_loss(a, b, wl, t, loss_fn, backend=backend, temperature=temperature, **kw)
    loss.backward()
    return loss.detach(), a.grad, None if b.grad is None else b.grad, wl.grad


def _dense64(ha, hb, w, t, coefs, *, b_live, temperature, rows=None):
    a, b, wl = (x.detach().double().cpu().requires_grad_(g)
                for x, g in zip((ha, hb, w), (True, b_live, True)))
    tc = t.cpu()
    ignored = (tc == -100)[:, None]
    # an ignored row may hold NaN: select it away before the GEMM (0 * NaN would reach dW)
    za = torch.where(ignored, 0.0, a) @ wl.T / temperature
    zb = torch.where(ignored, 0.0, b) @ (wl if b_live else wl.detach()).T / temperature
    la, lb = za.log_softmax(-1), zb.log_softmax(-1)
    valid = tc != -100
    if rows is not None:
        valid = valid & rows
    idx = torch.where(valid, tc, 0)[:, None]
    pa, pb = la.exp(), lb.exp()
    stats = dict(logp_a=la.gather(1, idx).squeeze(1), logp_b=lb.gather(1, idx).squeeze(1),
                 entropy_a=-(pa * la).sum(-1), entropy_b=-(pb * lb).sum(-1),
                 kl_ab=(pa * (la - lb)).sum(-1), kl_ba=(pb * (lb - la)).sum(-1))
    # rows whose hidden state is NaN are ignored: select, never multiply, so NaN stays out
    loss = sum((coefs[i] * torch.where(valid, stats[k], torch.zeros_like(stats[k]))).sum()
               for i, k in enumerate(NAMES))
    loss.backward()
    return loss.detach(), a.grad, b.grad if b_live else None, wl.grad


def _close(got, ref, gt, name, dtype):
    """|got - gt| <= 2 |ref - gt| + tol, the tolerance one rounding of the result's dtype."""
    gt = gt.double()
    scale = float(gt.abs().max()) or 1.0
    tol = {torch.float32: 2e-5, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}[dtype] * scale + 1e-6
    err = (got.double().cpu() - gt).abs()
    bound = 2 * (ref.double().cpu() - gt).abs() + tol
    excess = float((err - bound).max())
    assert bool((err <= bound).all()), f"{name}: max excess {excess:.3g} (scale {scale:.3g})"


# (N, chunk rows, ring rows): the ring in dZ rows of both views (2 per row when b is live)
RING_CASES = [
    pytest.param(37, 8, 40, id="ring-not-a-chunk-multiple"),  # 16 rows per chunk: 2 chunks per ring
    pytest.param(37, 8, 1000, id="N-smaller-than-ring"),  # one flush, at the end
    pytest.param(37, 8, 16, id="N-larger-than-ring"),  # a flush after every chunk
    pytest.param(45, 16, 70, id="partial-last-chunk"),  # chunks 16, 16, 13: ring of 2 chunks
]


@pytest.mark.parametrize("variant", ["ring", "ring2s"])
@pytest.mark.parametrize("n,chunk,ring", RING_CASES)
def test_ring_boundaries(n, chunk, ring, variant):
    ha, hb, w, t = _inputs(n, 24, 203, torch.float32, ignored=(3, n - 1), nan_ignored=True)
    coefs = _coefs(n)
    with _config.override_workspace(variant=variant, ring_rows=ring):
        got = _fused("triton", ha, hb, w, t, coefs, b_live=True, temperature=1.0, chunk_tokens=chunk)
    ref = _fused("torch", ha, hb, w, t, coefs, b_live=True, temperature=1.0)
    gt = _dense64(ha, hb, w, t, coefs, b_live=True, temperature=1.0)
    for name, x, r, g in zip(("loss", "dh_a", "dh_b", "dW"), got, ref, gt):
        _close(x, r, g, name, torch.float32)
    assert torch.isfinite(got[3]).all() and torch.all(got[1][3] == 0) and torch.all(got[2][3] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("b_live", [False, True], ids=["b_const", "b_live"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_ring_views_dtypes_temperatures(dtype, b_live, temperature):
    """View b constant (dZ_b never computed: the ring holds view a only, so it spans twice the
    chunks) or live, fp32 and fp16 inputs, T != 1; a ring of 3 chunks over 5 chunks."""
    n = 40
    ha, hb, w, t = _inputs(n, 24, 203, dtype, ignored=(0, 17))
    coefs = _coefs(n)
    ring = 3 * 8 * (2 if b_live else 1)
    with _config.override_workspace(ring_rows=ring):
        got = _fused("triton", ha, hb, w, t, coefs, b_live=b_live, temperature=temperature, chunk_tokens=8)
    ref = _fused("torch", ha, hb, w, t, coefs, b_live=b_live, temperature=temperature)
    gt = _dense64(ha, hb, w, t, coefs, b_live=b_live, temperature=temperature)
    assert (got[2] is None) == (not b_live)
    for name, x, r, g in zip(("loss", "dh_a", "dh_b", "dW"), got, ref, gt):
        if g is not None:
            _close(x, r, g, name, dtype)


def test_ring_with_skipped_chunks():
    """Chunks whose loss has no gradient leave gaps between ring entries: their dh rows stay 0,
    the others land in the right rows (the per-entry scatter path)."""
    n = 40
    ha, hb, w, t = _inputs(n, 24, 150, torch.float32)
    coefs = _coefs(n)
    skip = (8, 24)  # the 2nd and 4th chunk of 8 rows
    with _config.override_workspace(ring_rows=1000):
        got = _fused("triton", ha, hb, w, t, coefs, b_live=True, temperature=1.0, chunk_tokens=8, skip=skip)
    rows = torch.ones(n, dtype=torch.bool)
    for r0 in skip:
        rows[r0:r0 + 8] = False
    gt = _dense64(ha, hb, w, t, coefs, b_live=True, temperature=1.0, rows=rows)
    for name, x, g in zip(("dh_a", "dh_b", "dW"), got[1:], gt[1:]):
        torch.testing.assert_close(x.double().cpu(), g, rtol=1e-4, atol=1e-5, msg=name)
    assert torch.all(got[1][8:16] == 0) and torch.all(got[2][24:32] == 0)


def _backward(ha, hb, w, t, grads, *, need_a, need_b, b_const, with_dw, backend_fn, **options):
    s = reference.forward_stats(ha, hb, w, t)
    acc = torch.zeros(w.shape, device=w.device) if with_dw else None
    dh_a, dh_b = backend_fn(ha, hb, w, t, s, grads, KernelOptions(**options), need_hidden_a=need_a,
                            need_hidden_b=need_b, weight_grad_acc=acc, hidden_b_is_constant=b_const)
    return dh_a, dh_b, acc


@pytest.mark.parametrize("need_a,need_b,b_const,with_dw", [
    (True, True, True, True),  # dZ_b feeds dh_b but not dW: its ring rows of h are zeroed
    (False, False, True, True),  # dW alone
    (False, True, False, False),  # dh_b alone: the ring holds view b only, no dW
    (True, False, False, True),  # view b live in dW, dh_b not wanted
], ids=["dh_b-not-in-dW", "dW-only", "dh_b-only", "b-in-dW-no-dh_b"])
def test_backward_grads_corner_cases(need_a, need_b, b_const, with_dw):
    n = 29
    ha, hb, w, t = _inputs(n, 24, 150, torch.float32, ignored=(4,))
    g = torch.Generator().manual_seed(3)
    grads = RowGrads(*(torch.randn(n, generator=g).to(DEVICE) for _ in range(6)))
    with _config.override_workspace(ring_rows=30):
        got = _backward(ha, hb, w, t, grads, need_a=need_a, need_b=need_b, b_const=b_const, with_dw=with_dw,
                        backend_fn=K.backward_grads, chunk_tokens=6)
    ref = _backward(ha, hb, w, t, grads, need_a=need_a, need_b=need_b, b_const=b_const, with_dw=with_dw,
                    backend_fn=reference.backward_grads)
    for name, x, r in zip(("dh_a", "dh_b", "dW"), got, ref):
        assert (x is None) == (r is None), name
        if x is not None:
            torch.testing.assert_close(x, r, rtol=1e-4, atol=1e-5, msg=name)


def test_variants_agree_bitwise_where_the_math_is_the_same():
    """A ring of R rows and ring2s given 2R (two rings of R) flush the same chunks in the same
    order (the second stream only changes where a flush runs): bitwise equal. v1 (dh and dW per
    chunk) differs only in summation order."""
    n = 45
    ha, hb, w, t = _inputs(n, 24, 150, torch.float32, ignored=(2,))
    coefs = _coefs(n)
    out = {}
    for variant, ring in (("ring", 32), ("ring2s", 64), ("v1", 32)):
        with _config.override_workspace(variant=variant, ring_rows=ring):
            out[variant] = _fused("triton", ha, hb, w, t, coefs, b_live=True, temperature=1.0, chunk_tokens=8)
    for x, y in zip(out["ring"], out["ring2s"]):
        assert torch.equal(x, y)
    for x, y in zip(out["ring"][1:], out["v1"][1:]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_ring_gemm_count_and_plan_at_the_7b_head(monkeypatch):
    """One dW GEMM per ring, not per chunk; the default plan at Qwen2.5-VL-7B's head gathers
    >= 3.5k dZ rows per dW GEMM within the documented memory."""
    calls = []
    real = _gemm.addmm_f32_
    monkeypatch.setattr(_gemm, "addmm_f32_", lambda acc, a, b, alpha=1.0: calls.append(a.shape[1]) or
                        real(acc, a, b, alpha=alpha))
    n = 45
    ha, hb, w, t = _inputs(n, 16, 100, torch.float32)
    with _config.override_workspace(ring_rows=48):  # 3 chunks of 8 rows x 2 views
        _fused("triton", ha, hb, w, t, _coefs(n), b_live=True, temperature=1.0, chunk_tokens=8)
    assert calls == [48, 42]  # 6 chunks (the last of 5 rows): 3 + 3 per ring
    calls.clear()
    with _config.override_workspace(variant="v1"):
        _fused("triton", ha, hb, w, t, _coefs(n), b_live=True, temperature=1.0, chunk_tokens=8)
    assert calls == [16] * 5 + [10]

    bf16 = torch.bfloat16
    plan = workspace.make_plan(16384, 152_064, 2, 2, True, bf16, None)
    assert (plan.chunk, plan.ring_chunks, plan.ring_rows, plan.rings) == (384, 5, 3840, 1)
    sizes = workspace.plan_bytes(plan, 152_064, 3584, bf16, need_dh=True)
    assert sizes["dz_ring"] == 3840 * 152_064 * 2 and sizes["total"] < 1.8e9
    const = workspace.make_plan(16384, 152_064, 2, 1, True, bf16, None)  # view b constant
    assert const.ring_rows == 3840 and const.ring_chunks == 10
    with _config.override_workspace(variant="v1"):
        v1 = workspace.make_plan(16384, 152_064, 2, 2, True, bf16, None)
    assert (v1.chunk, v1.ring_rows) == (576, 1152)
    with _config.override_workspace(variant="ring2s"):
        two = workspace.make_plan(16384, 152_064, 2, 2, True, bf16, None)
    assert (two.rings, two.ring_chunks) == (2, 2)
    small = workspace.make_plan(1000, 152_064, 2, 2, True, bf16, None)  # the ring never exceeds the call
    assert small.ring_chunks == 3 and small.chunk == 384


def test_statistics_splits_match_one_split():
    """The split-vocabulary statistics (partials merged by the combine kernel), with an empty
    trailing split, equal the unsplit kernel's."""
    n = 21
    ha, hb, w, t = _inputs(n, 16, 203, torch.float32, ignored=(1,))
    one = K.forward_stats(ha, hb, w, t, KernelOptions(temperature=0.7))
    for splits in (2, 5):  # 7 tiles of 32: splits of 4+3, and 2+2+2+1+0
        cfg = _config.LaunchConfig(BLOCK_N=8, BLOCK_V=32, splits=splits)
        with _config.override_configs(workspace_stats=cfg):
            got = K.forward_stats(ha, hb, w, t, KernelOptions(temperature=0.7))
        for name, x, y in zip(one._fields, got, one):
            torch.testing.assert_close(x, y, rtol=0, atol=2e-6, msg=f"{name}, {splits} splits")


@pytest.mark.gpu
def test_gpu_second_stream_is_race_free():
    """ring2s flushes on a second stream: on a GPU any missing wait shows as a difference from
    the single-stream ring (same GEMMs, same order: bitwise equal), at a size where flushes and
    the next chunks' work overlap."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    n, h, v = 4096, 512, 32000
    ha, hb, w, t = _inputs(n, h, v, torch.bfloat16, ignored=(5, 700))
    coefs = _coefs(n)
    out = {}
    for variant, ring in (("ring", 2048), ("ring2s", 4096)):  # the same flushes: 4 chunks each
        with _config.override_workspace(variant=variant, ring_rows=ring):
            out[variant] = _fused("triton", ha, hb, w, t, coefs, b_live=True, temperature=1.0,
                                  chunk_tokens=256)
    for x, y in zip(out["ring"], out["ring2s"]):
        assert torch.equal(x, y)
