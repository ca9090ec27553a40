"""The CUDA epilogues of the workspace path (csrc/cuda/, strategy="workspace_cuda") against float64
and the torch backend, their argument checks, and when they are chosen.

Each numerical test runs twice: on CPU tensors through the ops' host reference (the kernels' own
math, per-thread column assignment and reduction tree replayed on the host, csrc/cuda/
epilogue_math.h) and, marked `gpu`, on CUDA tensors through the kernels themselves. Cases: one
and two views, logits in fp32 / bf16 / fp16, dZ in fp32 / bf16 / fp16 and in place, temperature
!= 1, vocabulary tails (V = 1001, 37 and 3 < a 16-byte vector), N = 1, ignored rows (exactly 0),
targets outside [0, V) (NaN), int32 targets, and three row layouts: aligned rows (vector loads
and a column tail), unaligned rows (scalar loads) and the workspace's stacked [z_a; z_b]. The
columns beyond V of a padded buffer must stay untouched. Then the whole chunk loop with the CUDA
epilogues against the torch backend and float64 (fused loss and statistics ops, several chunks,
NaN hidden states on ignored rows, view b live and constant).

On a GPU, a build without CUDA kernels skips the `gpu` tests with the rebuild command, except
with PAPO_REQUIRE_CUDA_EPILOGUE=1 (benchmarks/gpu_session.sh sets it), where it fails them.
"""

from __future__ import annotations

import json
import math
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

import papo_kernels as pk

if "cpp" not in pk.available_backends("cpu"):
    if os.environ.get("CI") == "true":
        from papo_kernels._backends import resolve_backend

        resolve_backend("cpp", torch.device("cpu"))  # raises with the reason: fails collection
    pytest.skip("the C++ extension is not built (pip install --no-build-isolation -e .)",
                allow_module_level=True)

from papo_kernels import extension as E  # noqa: E402
from papo_kernels._backends import BackendUnavailableError  # noqa: E402
from papo_kernels.kernels import _config, cuda_epilogue, epilogue_choice  # noqa: E402
from papo_kernels.kernels.epilogue_choice import Evidence, auto_epilogue, choose_epilogue  # noqa: E402
from tests._numerics import assert_close_to_ref  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OPS = torch.ops.papo_kernels_C
IGNORE = -100
DEVICES = [pytest.param("cpu", id="host-reference"), pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# "aligned": rows of a padded buffer (16-byte aligned: vector loads, then the column tail);
# "unaligned": columns 1..V of a buffer (scalar loads); "stacked": z_a = ws[:C], z_b = ws[C:] of
# one contiguous [2C, V] workspace, as the chunk loop hands them over.
LAYOUTS = ("aligned", "unaligned", "stacked")
SHAPES = [pytest.param(7, 1001, id="7x1001"), pytest.param(1, 37, id="1x37"), pytest.param(5, 3, id="5x3")]
SENTINEL = 7.0


def _device(device: str) -> torch.device:
    dev = torch.device(device)
    ok, reason = E.epilogue_support(dev)
    if not ok:
        if os.environ.get("PAPO_REQUIRE_CUDA_EPILOGUE") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return dev


def _buffers(c: int, v: int, dtype, layout: str, device, *, fill=None, seed=0):
    """(z_a, z_b) [c, v] views in `layout`; random logits (std 3, a few dominant columns) or `fill`,
    with SENTINEL in every column of the buffers outside the views."""
    g = torch.Generator().manual_seed(seed)
    width = {"aligned": -(-v // 8) * 8 + 8, "unaligned": v + 1, "stacked": v}[layout]
    rows = 2 * c if layout == "stacked" else c
    bufs = []
    for _ in range(1 if layout == "stacked" else 2):
        x = torch.full((rows, width), SENTINEL)
        if fill is None:
            vals = 3.0 * torch.randn(rows, v, generator=g)
            vals[:, : min(2, v)] += 8.0  # large logits first: the running max must move later too
            vals[:, -1] += 5.0
        else:
            vals = torch.full((rows, v), float(fill))
        x[:, (1 if layout == "unaligned" else 0):][:, :v] = vals
        bufs.append(x.to(dtype).to(device))
    if layout == "stacked":
        ws = bufs[0]
        return ws[:c], ws[c:], bufs
    col0 = 1 if layout == "unaligned" else 0
    return bufs[0][:, col0:col0 + v], bufs[1][:, col0:col0 + v], bufs


def _outside(buf: torch.Tensor, v: int, layout: str) -> torch.Tensor:
    """The columns of a buffer from _buffers that lie outside its [C, V] views."""
    buf = buf.float().cpu()
    return buf[:, :1] if layout == "unaligned" else buf[:, v:]


def _targets(c: int, v: int, device, *, int32=False, seed=1):
    t = torch.randint(0, v, (c,), generator=torch.Generator().manual_seed(seed))
    specials = [IGNORE, v + 5, -7]  # ignored, past V, negative (not ignore_index)
    for row, value in enumerate(specials[: max(0, c - 2)], start=1):
        t[row] = value
    return t.to(torch.int32 if int32 else torch.int64).to(device)


def _stats64(z_a, z_b, t, temperature):
    """float64 statistics of [C, V] logits (computed on their device), masked as the kernels mask
    them; returned on the CPU."""
    t = t.long()
    v = z_a.shape[1]
    valid, bad = t != IGNORE, (t != IGNORE) & ((t < 0) | (t >= v))
    idx = t.clamp(0, v - 1)[:, None]
    out = {}
    views = {"a": z_a} if z_b is None else {"a": z_a, "b": z_b}
    lp = {}
    for name, z in views.items():
        x = z.double() / temperature
        lp[name] = x.log_softmax(-1)
        out[f"logp_{name}"] = lp[name].gather(1, idx)[:, 0]
        out[f"entropy_{name}"] = -(lp[name].exp() * lp[name]).sum(-1)
        out[f"lse_{name}"] = x.logsumexp(-1)
    if z_b is not None:
        out["kl_ab"] = (lp["a"].exp() * (lp["a"] - lp["b"])).sum(-1)
        out["kl_ba"] = (lp["b"].exp() * (lp["b"] - lp["a"])).sum(-1)
    return {k: torch.where(bad, math.nan, torch.where(valid, x, 0.0)).cpu() for k, x in out.items()}


def _run_stats(z_a, z_b, t, temperature):
    names = ["logp_a", "entropy_a", "lse_a"]
    if z_b is not None:
        names += ["logp_b", "entropy_b", "lse_b", "kl_ab", "kl_ba"]
    outs = {k: torch.full((z_a.shape[0],), SENTINEL, device=z_a.device) for k in names}
    OPS.epilogue_stats(z_a, z_b, t, outs["logp_a"], outs["entropy_a"], outs["lse_a"], outs.get("logp_b"),
                       outs.get("entropy_b"), outs.get("lse_b"), outs.get("kl_ab"), outs.get("kl_ba"),
                       temperature, IGNORE)
    return outs


def _assert_rows(got: dict, ref: dict, t, *, atol, rtol, what):
    t = t.cpu().long()
    for k, r in ref.items():
        x = got[k].double().cpu()
        torch.testing.assert_close(x, r, rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m: f"{what} {k}: {m}")
        ignored = t == IGNORE
        assert bool((x[ignored] == 0).all()), f"{what} {k}: ignored rows must be exactly 0"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c,v", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_stats_match_float64(device, dtype, layout, c, v):
    dev = _device(device)
    z_a, z_b, bufs = _buffers(c, v, DTYPES[dtype], layout, dev)
    t = _targets(c, v, dev, int32=layout == "unaligned")
    for temperature in (1.0, 0.7):
        ref = _stats64(z_a, z_b, t, temperature)
        _assert_rows(_run_stats(z_a, z_b, t, temperature), ref, t, atol=5e-5, rtol=1e-5,
                     what=f"two views T={temperature}")
        ref1 = {k: x for k, x in ref.items() if k.endswith("_a")}
        _assert_rows(_run_stats(z_a, None, t, temperature), ref1, t, atol=5e-5, rtol=1e-5,
                     what=f"one view T={temperature}")
    for buf in bufs:  # the logits are read only
        assert bool((_outside(buf, v, layout) == SENTINEL).all())


@pytest.mark.parametrize("device", DEVICES)
def test_stats_of_equal_logits_and_a_nan_logit(device):
    """All-equal logits (every thread's max ties the block's): lse = log V, H = log V, KLs 0; a NaN
    logit in a row makes that row's statistics NaN and no other row's."""
    dev = _device(device)
    c, v = 3, 1000
    z_a, z_b, _ = _buffers(c, v, torch.float32, "aligned", dev, fill=2.0)
    z_b[2, 517] = math.nan
    t = torch.tensor([4, 999, 0], device=dev)
    out = {k: x.cpu() for k, x in _run_stats(z_a, z_b, t, 1.0).items()}
    for k in ("lse_a", "lse_b"):
        torch.testing.assert_close(out[k][:2], torch.full((2,), 2.0 + math.log(v)), rtol=1e-6, atol=1e-6)
    for k in ("entropy_a", "entropy_b"):
        torch.testing.assert_close(out[k][:2], torch.full((2,), math.log(v)), rtol=1e-5, atol=1e-5)
    for k in ("kl_ab", "kl_ba"):
        assert bool((out[k][:2].abs() < 1e-6).all())
    for k in ("logp_b", "entropy_b", "lse_b", "kl_ab", "kl_ba"):
        assert math.isnan(out[k][2]), k
    assert math.isfinite(out["lse_a"][2])


# (logit dtype, dZ dtype): what the chunk loop hands over (fp32 logits; dZ in the GEMM dtype) and
# half logits both ways
DZ_DTYPES = [("f32", "f32"), ("f32", "bf16"), ("f32", "f16"), ("bf16", "bf16"), ("f16", "f32")]
# fp32 math, then one rounding: a value near a rounding boundary may land one ulp away
DZ_RTOL = {"f32": 1e-5, "bf16": 2.0**-7, "f16": 2.0**-10}
# which upstream gradients are present (the others None: their terms compiled out on the device)
TERMS = {
    "all": ("logp_a", "entropy_a", "logp_b", "entropy_b", "kl_ab", "kl_ba"),
    "logp": ("logp_a", "logp_b"),
    "kl_entropy": ("entropy_a", "kl_ab", "kl_ba"),
}


def _dz64(z_a, z_b, t, stats, grads, temperature):
    """float64 dZ_a, dZ_b (docs/design.md "Kernel math") from the saved fp32 statistics."""
    t = t.cpu().long()
    v = z_a.shape[1]
    valid, bad = t != IGNORE, (t != IGNORE) & ((t < 0) | (t >= v))
    onehot = torch.zeros(t.shape[0], v, dtype=torch.float64)
    onehot[torch.arange(t.shape[0])[valid & ~bad], t[valid & ~bad]] = 1.0

    def col(name):
        x = grads.get(name)
        return torch.zeros(t.shape[0], 1, dtype=torch.float64) if x is None else x.double().cpu()[:, None]

    def stat(name):
        return stats[name].double().cpu()[:, None]

    lp_a = z_a.double().cpu() / temperature - stat("lse_a")
    lp_b = z_b.double().cpu() / temperature - stat("lse_b")
    p_a, p_b = lp_a.exp(), lp_b.exp()
    dza = (col("logp_a") * (onehot - p_a) - col("entropy_a") * p_a * (lp_a + stat("entropy_a"))
           + col("kl_ab") * p_a * (lp_a - lp_b - stat("kl_ab")) + col("kl_ba") * (p_a - p_b))
    dzb = (col("logp_b") * (onehot - p_b) - col("entropy_b") * p_b * (lp_b + stat("entropy_b"))
           + col("kl_ab") * (p_b - p_a) + col("kl_ba") * p_b * (lp_b - lp_a - stat("kl_ba")))
    rows = lambda x: torch.where(bad[:, None], math.nan, torch.where(valid[:, None], x / temperature, 0.0))  # noqa: E731
    return rows(dza), rows(dzb)


def _fp32_error(z_a, z_b, grads, temperature):
    z_max = max(float(z.float().abs().max()) for z in (z_a, z_b)) / temperature
    g_max = max([float(g.abs().max()) for g in grads.values()] or [1.0])
    return 8 * 2.0**-24 * (2 * z_max + 10) * g_max + 1e-7


def _run_dz(z_a, z_b, dz_a, dz_b, t, stats, grads, temperature):
    b = z_b is not None
    OPS.epilogue_dz(z_a, z_b, dz_a, dz_b, t, stats["lse_a"], stats["entropy_a"],
                    stats["lse_b"] if b else None, stats["entropy_b"] if b else None,
                    stats["kl_ab"] if b else None, stats["kl_ba"] if b else None,
                    grads.get("logp_a"), grads.get("entropy_a"), grads.get("logp_b"), grads.get("entropy_b"),
                    grads.get("kl_ab"), grads.get("kl_ba"), temperature, IGNORE)


def _check_dz(got, ref, t, out_dtype, what, *, fp32_error):
    """`fp32_error`: the absolute error fp32 math itself has here (log p = z/T - lse loses
    eps * |z/T| before the terms multiply it by up to |g|), on top of the output's rounding."""
    t = t.cpu().long()
    x = got.double().cpu()
    torch.testing.assert_close(x, ref, rtol=DZ_RTOL[out_dtype], atol=fp32_error, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")
    assert bool((x[t == IGNORE] == 0).all()), f"{what}: ignored rows must be exactly 0"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c,v", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("z_dtype,dz_dtype", DZ_DTYPES, ids=[f"{a}-to-{b}" for a, b in DZ_DTYPES])
def test_dz_matches_float64(device, z_dtype, dz_dtype, layout, c, v):
    dev = _device(device)
    z_a, z_b, _ = _buffers(c, v, DTYPES[z_dtype], layout, dev)
    t = _targets(c, v, dev, int32=layout == "stacked")
    temperature = 0.7
    stats = {k: x.float().to(dev) for k, x in _stats64(z_a, z_b, t, temperature).items()}
    g = torch.Generator().manual_seed(5)
    all_grads = {k: torch.randn(c, generator=g).to(dev) for k in TERMS["all"]}
    for terms, names in TERMS.items():
        grads = {k: all_grads[k] for k in names}
        ref_a, ref_b = _dz64(z_a, z_b, t, stats, grads, temperature)
        dz_a, dz_b, dz_bufs = _buffers(c, v, DTYPES[dz_dtype], layout, dev, fill=0.0, seed=9)
        _run_dz(z_a, z_b, dz_a, dz_b, t, stats, grads, temperature)
        err = _fp32_error(z_a, z_b, grads, temperature)
        _check_dz(dz_a, ref_a, t, dz_dtype, f"dz_a ({terms})", fp32_error=err)
        _check_dz(dz_b, ref_b, t, dz_dtype, f"dz_b ({terms})", fp32_error=err)
        for buf in dz_bufs:  # the columns beyond V (and before, unaligned) were not written
            assert bool((_outside(buf, v, layout) == SENTINEL).all()), f"{terms}: wrote outside [0, V)"
        # view a alone, view b's logits still read by the KL terms
        if terms == "logp":
            dz_a1 = torch.zeros_like(dz_a)
            _run_dz(z_a, None, dz_a1, None, t, {k: stats[k] for k in ("lse_a", "entropy_a")},
                    {"logp_a": grads["logp_a"]}, temperature)
            _check_dz(dz_a1, ref_a, t, dz_dtype, "dz_a (one view)", fp32_error=err)


@pytest.mark.parametrize("device", DEVICES)
def test_dz_in_place_over_the_workspace(device):
    """fp32 dZ written over the logits it is computed from (z_a, z_b of one workspace)."""
    dev = _device(device)
    c, v = 6, 1001
    z_a, z_b, _ = _buffers(c, v, torch.float32, "stacked", dev)
    t = _targets(c, v, dev)
    stats = {k: x.float().to(dev) for k, x in _stats64(z_a, z_b, t, 1.0).items()}
    g = torch.Generator().manual_seed(2)
    grads = {k: torch.randn(c, generator=g).to(dev) for k in TERMS["all"]}
    ref_a, ref_b = _dz64(z_a, z_b, t, stats, grads, 1.0)
    err = _fp32_error(z_a, z_b, grads, 1.0)
    _run_dz(z_a, z_b, z_a, z_b, t, stats, grads, 1.0)
    _check_dz(z_a, ref_a, t, "f32", "dz_a in place", fp32_error=err)
    _check_dz(z_b, ref_b, t, "f32", "dz_b in place", fp32_error=err)


def test_argument_checks_name_the_argument():
    z = torch.randn(4, 10)
    t = torch.tensor([1, 2, 3, 4])
    rows = [torch.zeros(4) for _ in range(8)]

    def stats(*args, **kw):
        base = dict(z_a=z, z_b=z.clone(), targets=t, outs=rows, temperature=1.0)
        base.update(kw)
        OPS.epilogue_stats(base["z_a"], base["z_b"], base["targets"], *base["outs"], base["temperature"],
                           IGNORE)

    with pytest.raises(RuntimeError, match="targets must be int64 or int32"):
        stats(targets=t.float())
    with pytest.raises(RuntimeError, match=r"z_b must have shape \[4, 10\]"):
        stats(z_b=torch.randn(4, 11))
    with pytest.raises(RuntimeError, match="z_a must have unit column stride"):
        stats(z_a=torch.randn(10, 4).T)
    with pytest.raises(RuntimeError, match="z_a must be float32, float16 or bfloat16"):
        stats(z_a=z.double(), z_b=None, outs=rows[:3] + [None] * 5)
    with pytest.raises(RuntimeError, match="kl_ab is required with two views"):
        stats(outs=rows[:6] + [None, rows[7]])
    with pytest.raises(RuntimeError, match="logp_b must be None with one view"):
        stats(z_b=None)
    with pytest.raises(RuntimeError, match=r"lse_a must have shape \[4\]"):
        stats(outs=rows[:2] + [torch.zeros(5)] + rows[3:])
    with pytest.raises(RuntimeError, match="temperature must be finite and > 0"):
        stats(temperature=0.0)
    s = torch.zeros(4)
    with pytest.raises(RuntimeError, match="dz_b needs z_b"):
        OPS.epilogue_dz(z, None, None, torch.zeros(4, 10), t, s, s, None, None, None, None,
                        s, None, None, None, None, None, 1.0, IGNORE)
    with pytest.raises(RuntimeError, match="grad_kl_ab / grad_kl_ba need z_b"):
        OPS.epilogue_dz(z, None, torch.zeros(4, 10), None, t, s, s, None, None, None, None,
                        None, None, None, None, s, None, 1.0, IGNORE)
    ws = torch.randn(8, 10)
    with pytest.raises(RuntimeError, match="dz_a overlaps z_b"):  # dZ_a written over view b's logits
        OPS.epilogue_dz(ws[:4], ws[4:], ws[4:], None, t, s, s, s, s, s, s, s, None, None, None, None, None,
                        1.0, IGNORE)
    with pytest.raises(RuntimeError, match="dz_a has dtype BFloat16 but dz_b has dtype Float"):
        OPS.epilogue_dz(z, z.clone(), torch.zeros(4, 10, dtype=torch.bfloat16), torch.zeros(4, 10), t, s, s,
                        s, s, s, s, s, None, None, None, None, None, 1.0, IGNORE)


# ---------------------------------------------------------------- the chunk loop


NAMES = ("logp_a", "logp_b", "entropy_a", "entropy_b", "kl_ab", "kl_ba")


def _inputs(n, h, v, dtype, device, *, ignored=()):
    g = torch.Generator().manual_seed(0)
    ha = torch.randn(n, h, generator=g)
    hb = ha + 0.5 * torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * (2.0 / h**0.5)
    t = torch.randint(0, v, (n,), generator=g)
    for i in ignored:  # an ignored row may hold anything: NaN must not reach dW
        t[i] = IGNORE
        ha[i], hb[i] = math.nan, math.inf
    return tuple(x.to(device=device, dtype=dtype) for x in (ha, hb, w)) + (t.to(device),)


def _fused(backend, strategy, ha, hb, w, t, coefs, *, b_live, temperature, **kw):
    a, b, wl = (x.detach().clone().requires_grad_(g) for x, g in zip((ha, hb, w), (True, b_live, True)))

    def loss_fn(stats, index):
        c = coefs[:, index.cpu()].to(device=stats.logp_a.device, dtype=stats.logp_a.dtype)
        return sum((c[i] * getattr(stats, k)).sum() for i, k in enumerate(NAMES)), {}

    loss, _ = pk.fused_two_view_loss(a, b, wl, t, loss_fn, backend=backend, strategy=strategy,
                                     temperature=temperature, **kw)
    loss.backward()
    return loss.detach(), a.grad, b.grad, wl.grad


def _stats_op(backend, strategy, ha, hb, w, t, coefs, *, temperature, **kw):
    a, b, wl = (x.detach().clone().requires_grad_() for x in (ha, hb, w))
    s = pk.two_view_stats(a, b, wl, t, backend=backend, strategy=strategy, temperature=temperature, **kw)
    valid = (t != IGNORE).to(s.logp_a.device)
    c = coefs.to(device=s.logp_a.device, dtype=s.logp_a.dtype)
    loss = sum((c[i] * torch.where(valid, getattr(s, k), 0.0)).sum() for i, k in enumerate(NAMES))
    loss.backward()
    return loss.detach(), a.grad, b.grad, wl.grad


def _dense64(ha, hb, w, t, coefs, *, b_live, temperature):
    a, b, wl = (x.detach().double().cpu().requires_grad_(g)
                for x, g in zip((ha, hb, w), (True, b_live, True)))
    ignored = (t.cpu() == IGNORE)[:, None]
    za = torch.where(ignored, 0.0, a) @ wl.T / temperature
    zb = torch.where(ignored, 0.0, b) @ (wl if b_live else wl.detach()).T / temperature
    la, lb = za.log_softmax(-1), zb.log_softmax(-1)
    valid = ~ignored[:, 0]
    idx = torch.where(valid, t.cpu(), 0)[:, None]
    pa, pb = la.exp(), lb.exp()
    stats = dict(logp_a=la.gather(1, idx)[:, 0], logp_b=lb.gather(1, idx)[:, 0], entropy_a=-(pa * la).sum(-1),
                 entropy_b=-(pb * lb).sum(-1), kl_ab=(pa * (la - lb)).sum(-1), kl_ba=(pb * (lb - la)).sum(-1))
    loss = sum((coefs[i] * torch.where(valid, stats[k], 0.0)).sum() for i, k in enumerate(NAMES))
    loss.backward()
    return loss.detach(), a.grad, b.grad if b_live else None, wl.grad


def _chunk_loop_case(device, dtype, b_live, api, monkeypatch):
    dev = _device(device)
    calls = {"stats": 0, "dz": 0}
    for name in calls:  # the chunk loop must run the CUDA epilogues, not fall back to Triton's
        def counted(*args, _name=name, _fn=getattr(cuda_epilogue, name), **kw):
            calls[_name] += 1
            return _fn(*args, **kw)

        monkeypatch.setattr(cuda_epilogue, name, counted)
    n, h, v = 45, 24, 203
    ha, hb, w, t = _inputs(n, h, v, dtype, dev, ignored=(3, 44))
    coefs = torch.randn(6, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    temperature = 0.8
    if api == "fused":
        run = lambda backend, strategy, **kw: _fused(backend, strategy, ha, hb, w, t, coefs, b_live=b_live,  # noqa: E731
                                                     temperature=temperature, **kw)
    else:
        run = lambda backend, strategy, **kw: _stats_op(backend, strategy, ha, hb, w, t, coefs,  # noqa: E731
                                                        temperature=temperature, **kw)
    got = run("triton", "workspace_cuda", chunk_tokens=16)  # chunks of 16, 16, 13 rows
    assert calls["stats"] >= 3 and calls["dz"] >= 3, calls
    ref = run("torch", "auto")
    gt = _dense64(ha, hb, w, t, coefs, b_live=b_live or api == "stats", temperature=temperature)
    for name, x, r, g in zip(("loss", "dh_a", "dh_b", "dW"), got, ref, gt):
        if g is None:
            continue
        # |got - gt| <= 2 |torch - gt| + one rounding of the result's dtype (gradients are cast once)
        scale = float(g.abs().max()) or 1.0
        tol = {torch.float32: 2e-5, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}[dtype] * scale + 1e-6
        assert_close_to_ref(x, r, g, dtype=dtype, name=name, atol=tol)
    assert bool(torch.isfinite(got[3]).all()) and bool((got[1][3] == 0).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b_live", [True, False], ids=["b_live", "b_const"])
def test_fused_loss_with_cuda_epilogues_matches_torch_backend(device, b_live, monkeypatch):
    _chunk_loop_case(device, torch.float32, b_live, "fused", monkeypatch)


@pytest.mark.parametrize("device", DEVICES)
def test_stats_ops_with_cuda_epilogues_match_torch_backend(device, monkeypatch):
    _chunk_loop_case(device, torch.float32, True, "stats", monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_loss_half_inputs_on_the_gpu(dtype, monkeypatch):
    """Half inputs: fp32-output GEMMs into the workspace, dZ in the half dtype of the ring."""
    _chunk_loop_case("cuda", dtype, True, "fused", monkeypatch)


@pytest.mark.gpu
def test_cuda_epilogues_at_the_7b_vocabulary():
    """V = 152,064 (the 7B head), a 384-row chunk of two views: the shape the kernels are laid out
    for, against float64 and the Triton epilogues on the same logits."""
    from papo_kernels.kernels import grad_workspace, stats_workspace

    dev = _device("cuda")
    c, v = 384, 152_064
    g = torch.Generator(device=dev).manual_seed(0)
    ws = 3.0 * torch.randn(2 * c, v, device=dev, generator=g)
    z_a, z_b = ws[:c], ws[c:]
    t = torch.randint(0, v, (c,), device=dev, generator=g)
    t[5] = IGNORE
    got = _run_stats(z_a, z_b, t, 1.0)
    ref = _stats64(z_a, z_b, t, 1.0)
    _assert_rows(got, ref, t, atol=1e-4, rtol=1e-5, what="7B stats")
    tri = {k: torch.empty(c, device=dev) for k in got}
    def config(name):
        return _config.get_config(name, dev, torch.bfloat16, c, v, 3584)

    stats_workspace.workspace_stats(z_a, z_b, t, tri, temperature=1.0, ignore_index=IGNORE,
                                    config=config("workspace_stats"), combine_config=config("stats_combine"))
    for k in got:
        torch.testing.assert_close(got[k], tri[k], rtol=1e-5, atol=5e-5, msg=k)
    grads = {k: torch.randn(c, device=dev, generator=g) for k in TERMS["all"]}
    dz = torch.empty(2 * c, v, device=dev, dtype=torch.bfloat16)
    _run_dz(z_a, z_b, dz[:c], dz[c:], t, got, grads, 1.0)
    dz_tri = torch.empty_like(dz)
    grad_workspace.workspace_dz(z_a, z_b, dz_tri[:c], dz_tri[c:], t, got, grads, temperature=1.0,
                                ignore_index=IGNORE,
                                config=config("workspace_dz"))
    # both round the same fp32 math to bf16: at most one bf16 ulp apart
    torch.testing.assert_close(dz.float(), dz_tri.float(), rtol=2.0**-7, atol=1e-7)
    ref_a, ref_b = _dz64(z_a[:16], z_b[:16], t[:16], {k: x[:16] for k, x in got.items()},
                         {k: x[:16] for k, x in grads.items()}, 1.0)
    err = _fp32_error(z_a, z_b, grads, 1.0)
    _check_dz(dz[:16], ref_a, t[:16], "bf16", "7B dz_a", fp32_error=err)
    _check_dz(dz[c:c + 16], ref_b, t[:16], "bf16", "7B dz_b", fp32_error=err)


# ---------------------------------------------------------------- which epilogue runs


CUDA = torch.device("cuda")


@pytest.fixture
def cuda_ops_present(monkeypatch):
    """Pretend the extension has CUDA kernels for this (absent) sm_90 GPU."""
    monkeypatch.setattr(epilogue_choice, "cuda_epilogue_support", lambda device: (True, ""))
    monkeypatch.setattr(_config, "gpu_family", lambda device: "sm90")


def _evidence(cuda_s: float) -> Evidence:
    return Evidence(gpu="NVIDIA H200", junit="junit.xml", results="results.json", triton_s=0.2, cuda_s=cuda_s)


def test_auto_keeps_the_triton_epilogues_without_committed_evidence(cuda_ops_present, monkeypatch):
    monkeypatch.setattr(epilogue_choice, "CUDA_EPILOGUE_EVIDENCE", {})
    assert auto_epilogue(CUDA) == "triton"
    assert choose_epilogue("auto", CUDA) == "triton"
    assert choose_epilogue("workspace_cuda", CUDA) == "cuda"  # explicit: runs
    assert choose_epilogue("workspace", CUDA) == "triton"


def test_auto_picks_the_faster_epilogue_by_the_committed_measurement(cuda_ops_present, monkeypatch):
    monkeypatch.setattr(epilogue_choice, "CUDA_EPILOGUE_EVIDENCE", {"sm90": _evidence(cuda_s=0.15)})
    assert auto_epilogue(CUDA) == "cuda"
    assert auto_epilogue(torch.device("cpu")) == "triton"  # CPU tensors: the interpreter's Triton path
    monkeypatch.setattr(epilogue_choice, "CUDA_EPILOGUE_EVIDENCE", {"sm90": _evidence(cuda_s=0.25)})
    assert auto_epilogue(CUDA) == "triton"  # measured slower
    monkeypatch.setattr(epilogue_choice, "CUDA_EPILOGUE_EVIDENCE", {"sm80": _evidence(cuda_s=0.15)})
    assert auto_epilogue(CUDA) == "triton"  # evidence for another GPU family only
    monkeypatch.setattr(epilogue_choice, "CUDA_EPILOGUE_EVIDENCE", {"sm90": _evidence(cuda_s=0.15)})
    monkeypatch.setattr(epilogue_choice, "cuda_epilogue_support", lambda device: (False, "no CUDA kernels"))
    assert auto_epilogue(CUDA) == "triton"  # faster, but this build cannot run it


def test_explicit_cuda_epilogues_without_cuda_kernels_say_how_to_rebuild(monkeypatch):
    if E.cuda_archs():  # a CUDA build: pretend it is not one
        monkeypatch.setattr(E, "cuda_archs", lambda: [])
    with pytest.raises(BackendUnavailableError, match=r"workspace_cuda.*PAPO_BUILD_CUDA=1 pip install"):
        choose_epilogue("workspace_cuda", CUDA)
    monkeypatch.setattr(E, "cuda_archs", lambda: [80, 90])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    with pytest.raises(BackendUnavailableError, match=r"sm_80, sm_90, not for this GPU \(sm_100\).*"
                                                      r"TORCH_CUDA_ARCH_LIST=10.0"):
        choose_epilogue("workspace_cuda", CUDA)
    for capability in ((8, 9), (9, 0), (8, 0)):  # sm_80 code runs on sm_89; sm_90 on sm_90
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert choose_epilogue("workspace_cuda", CUDA) == "cuda"


def test_explicit_cuda_epilogues_without_the_extension(monkeypatch):
    monkeypatch.setitem(sys.modules, "papo_kernels.extension", None)  # import fails
    monkeypatch.delattr(pk, "extension", raising=False)
    ok, reason = epilogue_choice.cuda_epilogue_support(CUDA)
    assert not ok and "PAPO_BUILD_CUDA=1" in reason
    with pytest.raises(BackendUnavailableError, match="not available"):
        choose_epilogue("workspace_cuda", CUDA)


def test_strategy_names_reach_the_right_backends():
    h, w, t = torch.randn(3, 8), torch.randn(11, 8), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="workspace_cuda' is the Triton backend's"):
        pk.token_stats(h, w, t, backend="cpp", strategy="workspace_cuda")
    with pytest.raises(ValueError, match="'tiles' is the cpp backend's"):
        choose_epilogue("tiles", CUDA)
    with pytest.raises(ValueError, match="strategy must be one of"):
        choose_epilogue("cuda", CUDA)
    ref = pk.token_stats(h, w, t, backend="torch")
    got = pk.token_stats(h, w, t, backend="torch", strategy="workspace_cuda")  # one strategy: ignored
    torch.testing.assert_close(got, ref)


# ---------------------------------------------------------------- committed evidence


def check_evidence(ev: Evidence, root: Path) -> None:
    """Raise AssertionError unless `ev` names committed files that back it: a junit log in which
    the CUDA epilogue tests ran and passed (none failed or skipped), and a results file whose
    loss-16k section has both providers' medians equal to `ev`'s."""
    junit, results = root / ev.junit, root / ev.results
    assert junit.is_file(), f"{ev.junit} is not committed"
    assert results.is_file(), f"{ev.results} is not committed"
    cases = [c for c in ET.parse(junit).iter("testcase") if "test_cuda_epilogue" in c.get("classname", "")]
    gpu_cases = [c for c in cases if "cuda" in c.get("name", "") or "gpu" in c.get("name", "")
                 or "7b" in c.get("name", "")]
    assert gpu_cases, f"{ev.junit} has no CUDA epilogue test"
    bad = [c.get("name") for c in cases if any(x.tag in ("failure", "error", "skipped") for x in c)]
    assert not bad, f"{ev.junit}: CUDA epilogue tests failed or skipped: {bad[:5]}"
    doc = json.loads(results.read_text())
    medians = {}
    for key, section in doc.items():
        if not (key.startswith("loss-16k") and isinstance(section, dict)):
            continue
        for cell in section.get("cells", []):
            if cell.get("op") == "two_view" and cell.get("mode") == "fwd_bwd" and cell.get("status") == "ok":
                medians[cell["provider"]] = cell["time"]["median"]
    for provider, value in (("triton:fused:workspace", ev.triton_s),
                            ("triton:fused:workspace_cuda", ev.cuda_s)):
        assert provider in medians, f"{ev.results} has no timed {provider} cell in a loss-16k section"
        assert abs(medians[provider] - value) <= 1e-4 * value, f"{provider}: {medians[provider]} != {value}"


@pytest.mark.parametrize("family", sorted(epilogue_choice.CUDA_EPILOGUE_EVIDENCE) or ["none"])
def test_committed_evidence_is_backed_by_committed_files(family):
    """Every entry that lets `auto` pick the CUDA epilogues names a committed GPU run (none yet)."""
    if family == "none":
        assert epilogue_choice.CUDA_EPILOGUE_EVIDENCE == {}
        return
    check_evidence(epilogue_choice.CUDA_EPILOGUE_EVIDENCE[family], ROOT)


def _write_run(tmp_path, *, outcome="", cuda_s=0.19):
    cases = "".join(
        f'<testcase classname="tests.test_cuda_epilogue" name="{name}">{outcome if i == 0 else ""}</testcase>'
        for i, name in enumerate(["test_stats_match_float64[cuda-f32]",
                                  "test_dz_in_place_over_the_workspace[cuda]"]))
    (tmp_path / "junit.xml").write_text(f"<testsuites><testsuite>{cases}</testsuite></testsuites>")
    cells = [dict(op="two_view", mode="fwd_bwd", status="ok", provider=p, time=dict(median=m))
             for p, m in (("triton:fused:workspace", 0.2), ("triton:fused:workspace_cuda", cuda_s))]
    (tmp_path / "results.json").write_text(json.dumps({"env": {}, "loss-16k": {"cells": cells}}))


def test_evidence_check_accepts_a_backed_entry_and_rejects_the_rest(tmp_path):
    _write_run(tmp_path)
    check_evidence(_evidence(cuda_s=0.19), tmp_path)
    with pytest.raises(AssertionError, match="cuda_s|workspace_cuda"):
        check_evidence(_evidence(cuda_s=0.15), tmp_path)  # not the committed number
    _write_run(tmp_path, outcome='<skipped message="no CUDA kernels"/>')
    with pytest.raises(AssertionError, match="failed or skipped"):
        check_evidence(_evidence(cuda_s=0.19), tmp_path)
    _write_run(tmp_path, outcome='<failure message="mismatch"/>')
    with pytest.raises(AssertionError, match="failed or skipped"):
        check_evidence(_evidence(cuda_s=0.19), tmp_path)
    (tmp_path / "junit.xml").unlink()
    with pytest.raises(AssertionError, match="not committed"):
        check_evidence(_evidence(cuda_s=0.19), tmp_path)


# ---------------------------------------------------------------- the CUDA binary check


def _load_binary_check():
    import runpy

    return runpy.run_path(str(ROOT / "scripts" / "check_cuda_binary.py"), run_name="check_cuda_binary_test")


def _res_usage(archs, *, drop=None, local=0):
    out = []
    for arch in archs:
        out += ["Fatbin elf code:", "================", f"arch = sm_{arch}", "code version = [1,8]", "",
                "Resource usage:", " Common:", "  GLOBAL:0"]
        symbols = [f"_ZN12papo_kernels8epilogue12stats_kernelI{t}EEvNS0_11StatsLaunchE" for t in "abc"]
        symbols += [f"_ZN12papo_kernels8epilogue9dz_kernelI{t}{u}EEvNS0_8DzLaunchE"
                    for t in "abc" for u in "abc"]
        for s in symbols:
            if s == drop:
                continue
            out += [f" Function {s}:", f"  REG:48 STACK:0 SHARED:0 LOCAL:{local} CONSTANT[0]:576 TEXTURE:0"]
    return "\n".join(out)


def test_binary_check_finds_missing_architectures_and_spills():
    check = _load_binary_check()
    rows = check["resource_usage"](_res_usage([80, 90]))
    assert len(rows) == 24 and check["problems"](rows, [80, 90]) == []
    assert check["problems"](check["resource_usage"](_res_usage([80])), [80, 90]) == [
        "sm_90: 0 of 3 stats_kernel instantiations", "sm_90: 0 of 9 dz_kernel instantiations"]
    dropped = "_ZN12papo_kernels8epilogue9dz_kernelIabEEvNS0_8DzLaunchE"
    assert check["problems"](check["resource_usage"](_res_usage([80, 90], drop=dropped)), [80, 90]) == [
        "sm_80: 8 of 9 dz_kernel instantiations", "sm_90: 8 of 9 dz_kernel instantiations"]
    spills = check["problems"](check["resource_usage"](_res_usage([90], local=16)), [90])
    assert len(spills) == 12 and all("LOCAL 16" in s for s in spills)
