"""Inputs, the dense float64 oracle and the gradient check shared by the compiled backends' tests
(tests/test_backend_contract.py runs the contract every backend keeps; tests/test_cpp_backend.py
and tests/test_triton_kernels.py add each backend's own cases).

Tolerances follow tests/_numerics.py: |backend - gt| <= 2 |torch - gt| + atol, where gt is the
float64 result on materialized logits and torch is the torch backend in the test dtype.
"""

from __future__ import annotations

from typing import Callable

import torch

import papo_kernels as pk
from tests._numerics import assert_close_to_ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TWO_VIEW_OUTPUTS = ("logp_a", "logp_b", "entropy_a", "entropy_b", "kl_ab", "kl_ba")
TOKEN_OUTPUTS = ("logp", "entropy")
# (N, H, V): odd sizes, V not a multiple of the vector width, a block or the tile (a vocabulary
# tail), and a single row.
SHAPES = [(37, 40, 300), (1, 17, 257)]
# Statistics are fp32 math on the same (rounded) inputs in every backend.
STAT_ATOL = 2e-5
# Gradients are accumulated in fp32 and rounded once to the input dtype: one unit of rounding
# relative to the largest gradient entry, on top of 2 x the torch backend's own error.
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}
# The cpp backend's small tiles and chunks: every loop of its kernels runs several times with a tail.
SMALL_CHUNKS = dict(chunk_tokens=16, chunk_vocab=64)

# (dtype, largest |gradient| of the float64 oracle) -> (atol, rtol) of assert_close_to_ref
GradTolerance = Callable[[torch.dtype, float], tuple[float, float]]


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


def make_inputs(n, h, v, dtype, *, ignored=(), seed=0, device="cpu"):
    """(hidden_a, hidden_b, weight, targets): view b a perturbed view a; rows in `ignored` get
    ignore_index -100."""
    g = torch.Generator().manual_seed(seed)
    ha = torch.randn(n, h, generator=g)
    hb = ha + 0.5 * torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * (2.0 / h**0.5)
    w[:3] *= 4.0  # a few dominant tokens: large logits, adversarial for the online max
    t = torch.randint(0, v, (n,), generator=g)
    for i in ignored:
        if i < n:
            t[i] = -100
    return tuple(x.to(device=device, dtype=dtype) for x in (ha, hb, w)) + (t.to(device),)


def dense64(ha, hb, w, t, temperature, *, b_live=True, ignore_index=-100):
    """Materialized-logit float64 outputs; a constant view b sees a detached weight."""
    la = (ha @ w.T / temperature).log_softmax(-1)
    valid = t != ignore_index
    idx = torch.where(valid, t, 0)[:, None]
    out = dict(logp_a=la.gather(1, idx).squeeze(1), entropy_a=-(la.exp() * la).sum(-1))
    if hb is not None:
        lb = (hb @ (w if b_live else w.detach()).T / temperature).log_softmax(-1)
        pa, pb = la.exp(), lb.exp()
        out.update(logp_b=lb.gather(1, idx).squeeze(1), entropy_b=-(pb * lb).sum(-1),
                   kl_ab=(pa * (la - lb)).sum(-1), kl_ba=(pb * (lb - la)).sum(-1))
    return {k: torch.where(valid, x, torch.zeros_like(x)) for k, x in out.items()}


def leaves(tensors, grads):
    return [x.detach().clone().requires_grad_(g) for x, g in zip(tensors, grads)]


def row_coefs(n, k, seed=1):
    """[k, n] float64 weights of the k outputs of each row in a test's scalar loss."""
    return torch.randn(k, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def weighted(outs, coefs):
    return sum((coefs[i].to(device=outs[0].device, dtype=outs[0].dtype) * outs[i]).sum()
               for i in range(len(outs)))


def loss_fn(coefs, names):
    """A fused call's loss_fn: the `coefs`-weighted sum of the outputs `names`, and two metrics."""
    def fn(stats, index):
        c = coefs[:, index.cpu()].to(device=stats[0].device, dtype=stats[0].dtype)
        loss = sum((c[i] * getattr(stats, nm)).sum() for i, nm in enumerate(names))
        return loss, {"sum/first": stats[0].detach().sum(), "count": torch.tensor(float(index.numel()))}
    return fn


def backend_grads(backend, strategy, ha, hb, w, t, b_live=True, **kw):
    """(statistics, dh_a, dh_b, dW) of a weighted sum of every two_view_stats output, inputs
    unchecked (out-of-range targets reach the backend)."""
    a, b, wl = leaves((ha, hb, w), (True, b_live, True))
    s = pk.two_view_stats(a, b, wl, t, backend=backend, strategy=strategy, check_inputs=False, **kw)
    weighted(list(s), row_coefs(ha.shape[0], 6)).backward()
    return s, a.grad, b.grad, wl.grad


def max_relative_grad_tolerance(dtype, g_max):
    return 1e-6 + GRAD_RTOL[dtype] * g_max, 0.0


def check_grads(got, ref, gt, dtype, names, tolerance: GradTolerance = max_relative_grad_tolerance):
    """got: the backend's gradients, ref: the torch backend's, gt: float64 (None where no gradient
    flows, e.g. into a constant view b: then the backend must return None too)."""
    for name, k, r, g in zip(names, got, ref, gt):
        if g is None:
            assert k is None, name
            continue
        assert k is not None and r is not None, name
        atol, rtol = tolerance(dtype, float(g.detach().double().abs().max()))
        assert_close_to_ref(k.cpu(), r.cpu(), g.cpu(), dtype=dtype, name=name, atol=atol, rtol=rtol)
