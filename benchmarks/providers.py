"""Workloads and providers of the loss benchmark: the same inputs, one callable per provider.

Workloads (op, mode):
    two_view    fwd_bwd  the exact PAPO loss of two views sharing W, on-policy:
                         l_t = -A_t exp(logp_a - sg(logp_a)) - gamma KL(pi_b || pi_a)
                               + eta (H_a + H_b),  loss = sum_t l_t / N
                         Both views require grad by default (the "live" masked view), so the
                         useful work is 6HV FLOPs per token and view; --detached-b makes view b a
                         constant (2HV for it; the detached view of docs/design.md).
    token_stats fwd      logp and the full-vocabulary entropy of one view, no grad (2HV).
    token_stats fwd_bwd  l_t = -A_t exp(logp - sg(logp)) + eta H, loss = sum_t l_t / N (6HV).

Providers, each turned into a zero-argument callable by `build()`:
    eager        PyTorch on materialized fp32 logits, as TRL-style code does;
    compile      a torch.compile'd chunked loss with the gradient computed per chunk in the
                 forward (the honest peer: bounded memory, fused elementwise work);
    torch|triton|cpp : stats|fused [: workspace [: variant]]
                 ours: `two_view_stats`/`token_stats` (autograd, backward recomputes) or
                 `fused_two_view_loss`/`fused_token_loss` (gradient in forward), per backend;
                 Triton's workspace strategy also as the variants of WORKSPACE_VARIANTS (the
                 2026-11-25 path, a second stream, other dZ ring sizes), as
                 `triton:*:workspace_cuda` (the same path with the CUDA C++ epilogues of a
                 PAPO_BUILD_CUDA=1 build of the extension), and
                 `triton:stats:inregister`, the in-register forward (no-grad statistics only);
    liger        Liger-Kernel's LigerFusedLinearGRPOLoss, one call per view (logp only);
    cce          Cut-Cross-Entropy's linear_cross_entropy, one call per view (logp only;
                 impl "cce" on CUDA, its "torch_compile" fallback elsewhere);
    verl         verl's fused log-prob + entropy Triton kernel (token_stats' direct peer, CUDA);
    verl_torch   verl's chunked PyTorch FusedLinearForPPO (logp + entropy, any device);
    floor        the same useful GEMMs alone, no softmax: the time no exact kernel beats.

A provider that cannot run here raises `Unavailable` from `build()`; the harness records the
reason as a cell and goes on.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

GAMMA = 0.01  # PAPO's perception-KL weight (papo-g-nref-7b)
ETA = 0.03  # double-entropy weights (both views)
LOGIT_STD = 2.0  # std of the logits of the random inputs: a peaked, realistic softmax
SEQ_LEN = 1024  # tokens per sequence where a peer wants [B, T] (Liger chunks by sequence)
COMPILE_CHUNK = 1024  # rows per chunk of the compile peer (our torch backend's default too)

OPS = {("two_view", "fwd_bwd"), ("token_stats", "fwd"), ("token_stats", "fwd_bwd")}
WORKLOADS = (("two_view", "fwd_bwd"), ("token_stats", "fwd_bwd"), ("token_stats", "fwd"))


class Unavailable(RuntimeError):
    """The provider cannot run here (package missing, needs a GPU, backend not built)."""


# ---------------------------------------------------------------- inputs


@dataclass
class Inputs:
    op: str
    mode: str
    hidden_a: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    advantages: torch.Tensor  # [N] float32, constant per sequence of SEQ_LEN tokens
    hidden_b: torch.Tensor | None = None
    grad_leaves: list[torch.Tensor] = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.hidden_a.shape[0]

    @property
    def device(self) -> str:
        return self.hidden_a.device.type

    def zero_grads(self) -> None:
        for t in self.grad_leaves:
            t.grad = None

    def tensors(self) -> list[torch.Tensor]:
        ts = [self.hidden_a, self.weight, self.targets, self.advantages]
        return ts + ([self.hidden_b] if self.hidden_b is not None else [])


def make_inputs(op: str, mode: str, n: int, hidden: int, vocab: int, dtype: torch.dtype,
                device: str, *, b_requires_grad: bool = True, seed: int = 0) -> Inputs:
    """Random inputs whose logits have std LOGIT_STD; view b is view a plus noise."""
    if (op, mode) not in OPS:
        raise ValueError(f"unknown workload {op}/{mode}; known: {sorted(OPS)}")
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    grad = mode == "fwd_bwd"
    h_a = randn(n, hidden)
    w = randn(vocab, hidden, scale=LOGIT_STD / hidden**0.5)
    targets = torch.randint(0, vocab, (n,), generator=gen, device=device)
    seqs = -(-n // SEQ_LEN)
    adv = torch.randn(seqs, generator=gen, device=device).repeat_interleave(SEQ_LEN)[:n].contiguous()
    h_b = None
    if op == "two_view":
        h_b = (h_a.float() + 0.3 * torch.randn(n, hidden, generator=gen, device=device)).to(dtype)
    leaves = []
    if grad:
        h_a.requires_grad_(True)
        w.requires_grad_(True)
        leaves = [h_a, w]
        if h_b is not None and b_requires_grad:
            h_b.requires_grad_(True)
            leaves.append(h_b)
    return Inputs(op, mode, h_a, w, targets, adv, h_b, leaves)


def useful_flops(op: str, mode: str, n: int, hidden: int, vocab: int, b_requires_grad: bool = True) -> float:
    """2HV per token for the logits of a view, plus 4HV (dh and dW) per view that needs grad."""
    hv = 2.0 * n * hidden * vocab
    if mode == "fwd":
        return hv
    if op == "token_stats":
        return 3 * hv
    return 3 * hv + (3 * hv if b_requires_grad else hv)


def grad_bytes(inp: Inputs) -> int:
    return sum(t.numel() * t.element_size() for t in inp.grad_leaves)


def dw_accumulator_bytes(inp: Inputs) -> int:
    """The fp32 dW accumulator beyond W's own gradient: 0 when W is fp32 (it is the gradient)."""
    if not inp.weight.requires_grad or inp.weight.dtype in (torch.float32, torch.float64):
        return 0
    return inp.weight.numel() * 4


# ---------------------------------------------------------------- the shared loss math


def _policy_term(logp: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """On-policy clipped surrogate: ratio = exp(logp - sg(logp)) = 1, gradient -A d logp."""
    return -adv * torch.exp(logp - logp.detach())


def two_view_token_loss(logp_a, entropy_a, entropy_b, kl_ba, adv) -> torch.Tensor:
    return _policy_term(logp_a, adv) - GAMMA * kl_ba + ETA * (entropy_a + entropy_b)


def token_loss(logp, entropy, adv) -> torch.Tensor:
    return _policy_term(logp, adv) + ETA * entropy


def dense_stats(z: torch.Tensor, targets: torch.Tensor):
    """(log_softmax, logp of targets, entropy) of logits z [C, V], upcast to fp32 (fp64 stays)."""
    lp = z.to(torch.promote_types(z.dtype, torch.float32)).log_softmax(-1)
    logp = lp.gather(1, targets[:, None]).squeeze(1)
    entropy = -(lp.exp() * lp).sum(-1)
    return lp, logp, entropy


def dense_two_view_loss(h_a, h_b, w, targets, adv, inv_n):
    za = h_a @ w.T
    # a view whose hidden states need no grad is a constant distribution (docs/design.md contract)
    zb = h_b @ (w if h_b.requires_grad else w.detach()).T
    lpa, logp_a, ent_a = dense_stats(za, targets)
    lpb, _, ent_b = dense_stats(zb, targets)
    kl_ba = (lpb.exp() * (lpb - lpa)).sum(-1)
    return two_view_token_loss(logp_a, ent_a, ent_b, kl_ba, adv).sum() * inv_n


def dense_token_loss(h, w, targets, adv, inv_n):
    _, logp, ent = dense_stats(h @ w.T, targets)
    return token_loss(logp, ent, adv).sum() * inv_n


def dense_token_stats(h, w, targets):
    _, logp, ent = dense_stats(h @ w.T, targets)
    return logp, ent


# ---------------------------------------------------------------- gradient in forward (compile)


class _GradInForward(torch.autograd.Function):
    """loss = sum of chunk_fn over row chunks, each chunk's gradient taken in the forward."""

    @staticmethod
    def forward(ctx, chunk_fn, chunk, extra, h_a, h_b, w):
        need = [t is not None and t.requires_grad for t in (h_a, h_b, w)]
        dh_a = torch.zeros_like(h_a) if need[0] else None
        dh_b = torch.zeros_like(h_b) if need[1] else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need[2] else None
        total = None
        n = h_a.shape[0]
        for r0 in range(0, n, chunk):
            r1 = min(r0 + chunk, n)
            with torch.enable_grad():
                ca = h_a[r0:r1].detach().requires_grad_(need[0])
                cb = None if h_b is None else h_b[r0:r1].detach().requires_grad_(need[1])
                wl = w.detach().requires_grad_(need[2])
                loss = chunk_fn(ca, cb, wl, *(e[r0:r1] for e in extra))
                leaves = [t for t, k in zip((ca, cb, wl), need) if k]
                grads = iter(torch.autograd.grad(loss, leaves)) if leaves else iter(())
            if need[0]:
                dh_a[r0:r1] = next(grads)
            if need[1]:
                dh_b[r0:r1] = next(grads)
            if need[2]:
                dw += next(grads)
            total = loss.detach() if total is None else total + loss.detach()
        ctx.save_for_backward(dh_a, dh_b, None if dw is None else dw.to(w.dtype))
        return total if total is not None else h_a.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, g):
        dh_a, dh_b, dw = ctx.saved_tensors
        out = [None if t is None else t * g.to(t.dtype) for t in (dh_a, dh_b, dw)]
        return (None, None, None, *out)


# ---------------------------------------------------------------- providers


@dataclass(frozen=True)
class Provider:
    name: str
    kind: str  # "ours" | "peer" | "floor"
    outputs: str  # what it computes for the workload
    workloads: frozenset
    builder: Callable[[Inputs, dict], Callable[[], Any]]
    needs_warmup: bool = False  # JIT compilation on the first call
    note: str = ""
    workspace: dict | None = None  # Triton workspace switches (kernels/_config.override_workspace)


def _inv_n(inp: Inputs) -> float:
    return 1.0 / max(inp.n, 1)


def _backward(loss: torch.Tensor) -> torch.Tensor:
    loss.backward()
    return loss.detach()


# eager -----------------------------------------------------------


def _build_eager(inp: Inputs, opts: dict):
    inv_n = _inv_n(inp)
    if inp.op == "two_view":
        return lambda: _backward(dense_two_view_loss(inp.hidden_a, inp.hidden_b, inp.weight,
                                                     inp.targets, inp.advantages, inv_n))
    if inp.mode == "fwd_bwd":
        return lambda: _backward(dense_token_loss(inp.hidden_a, inp.weight, inp.targets,
                                                  inp.advantages, inv_n))

    def fwd():
        with torch.no_grad():
            return dense_token_stats(inp.hidden_a, inp.weight, inp.targets)

    return fwd


# compile ---------------------------------------------------------


def _build_compile(inp: Inputs, opts: dict):
    chunk = opts.get("compile_chunk", COMPILE_CHUNK)
    inv_n = _inv_n(inp)
    if inp.mode == "fwd":
        stats = torch.compile(dense_token_stats, fullgraph=True, dynamic=False)

        def fwd():
            outs = []
            with torch.no_grad():
                for r0 in range(0, inp.n, chunk):
                    outs.append(stats(inp.hidden_a[r0:r0 + chunk], inp.weight, inp.targets[r0:r0 + chunk]))
            return tuple(torch.cat(o) for o in zip(*outs))

        return fwd
    # 1/N enters as a tensor, not a Python float the graph would be specialized (and recompiled)
    # on for every N: the largest-N search calls it at many N.
    if inp.op == "two_view":
        def chunk_fn(ha, hb, w, t, adv, inv):
            return dense_two_view_loss(ha, hb, w, t, adv, 1.0) * inv[0]
    else:
        def chunk_fn(ha, hb, w, t, adv, inv):
            return dense_token_loss(ha, w, t, adv, 1.0) * inv[0]
    compiled = torch.compile(chunk_fn, fullgraph=True, dynamic=False)
    extra = (inp.targets, inp.advantages,
             torch.full((inp.n,), inv_n, dtype=torch.float32, device=inp.hidden_a.device))
    return lambda: _backward(_GradInForward.apply(compiled, chunk, extra, inp.hidden_a,
                                                  inp.hidden_b, inp.weight))


# ours ------------------------------------------------------------


# Variants of the Triton workspace path measured beside the default in one GPU run: provider
# suffix -> kernels/_config.override_workspace arguments.
WORKSPACE_VARIANTS = {
    "v1": dict(variant="v1"),  # the 2026-11-25 path: dh and dW per chunk, 1 GiB chunks
    "ring2s": dict(variant="ring2s"),  # ring flushes on a second CUDA stream
    "ring2k": dict(ring_rows=2048),  # other dZ ring sizes (memory against time)
    "ring8k": dict(ring_rows=8192),
}


def _with_workspace(fn: Callable[[], Any], workspace: dict | None) -> Callable[[], Any]:
    if not workspace:
        return fn
    from papo_kernels.kernels import _config

    def run():
        with _config.override_workspace(**workspace):
            return fn()

    return run


def describe(name: str, inp: Inputs, opts: dict | None = None) -> dict | None:
    """The workspace plan (chunk rows, ring rows, dW GEMMs per call, buffer bytes) a Triton
    provider uses for these inputs; None for every other provider or workload."""
    p = PROVIDERS[name]
    if not name.startswith("triton:") or inp.mode != "fwd_bwd" or p.workspace is None:
        return None
    try:
        from papo_kernels.kernels import _config, workspace
    except ImportError:
        return None
    two = inp.hidden_b is not None
    with _config.override_workspace(**p.workspace):
        return workspace.describe(inp.hidden_a, inp.weight, two_view=two, need_dh_a=True,
                                  need_dh_b=two and inp.hidden_b.requires_grad, need_dw=True,
                                  b_in_dw=two and inp.hidden_b.requires_grad,
                                  chunk_tokens=(opts or {}).get("chunk_tokens"))


def _ours_builder(backend: str, api: str, strategy: str, workspace: dict | None = None):
    def build(inp: Inputs, opts: dict):
        return _with_workspace(_build_ours(backend, api, strategy, inp, opts), workspace)

    return build


def _build_ours(backend: str, api: str, strategy: str, inp: Inputs, opts: dict):
    import papo_kernels as pk
    from papo_kernels._backends import BackendUnavailableError, resolve_backend

    if backend == "triton" and inp.device != "cuda":
        raise Unavailable("gpu-only: Triton kernels are benchmarked on CUDA (the interpreter "
                          "is not a benchmark)")
    try:
        resolve_backend(backend, inp.hidden_a.device)
    except BackendUnavailableError as exc:
        raise Unavailable(str(exc)) from None
    if strategy == "workspace_cuda":
        from papo_kernels.kernels.epilogue_choice import cuda_epilogue_support

        ok, reason = cuda_epilogue_support(inp.hidden_a.device)
        if not ok:
            raise Unavailable(reason)
    kw = dict(backend=backend, strategy=strategy)
    if opts.get("chunk_tokens"):
        kw["chunk_tokens"] = opts["chunk_tokens"]
    adv, inv_n, t = inp.advantages, _inv_n(inp), inp.targets
    if inp.mode == "fwd":
        def fwd():
            with torch.no_grad():
                return tuple(pk.token_stats(inp.hidden_a, inp.weight, t, **kw))
        return fwd
    if inp.op == "two_view":
        if api == "stats":
            def run():
                s = pk.two_view_stats(inp.hidden_a, inp.hidden_b, inp.weight, t, **kw)
                return _backward(two_view_token_loss(s.logp_a, s.entropy_a, s.entropy_b,
                                                     s.kl_ba, adv).sum() * inv_n)
            return run

        def loss_fn(s, index):
            return two_view_token_loss(s.logp_a, s.entropy_a, s.entropy_b, s.kl_ba,
                                       adv[index]).sum() * inv_n, {}

        return lambda: _backward(pk.fused_two_view_loss(inp.hidden_a, inp.hidden_b, inp.weight,
                                                        t, loss_fn, **kw)[0])
    if api == "stats":
        def run():
            s = pk.token_stats(inp.hidden_a, inp.weight, t, **kw)
            return _backward(token_loss(s.logp, s.entropy, adv).sum() * inv_n)
        return run

    def loss_fn1(s, index):
        return token_loss(s.logp, s.entropy, adv[index]).sum() * inv_n, {}

    return lambda: _backward(pk.fused_token_loss(inp.hidden_a, inp.weight, t, loss_fn1, **kw)[0])



# liger -----------------------------------------------------------


def _build_liger(inp: Inputs, opts: dict):
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as exc:
        raise Unavailable(f"liger-kernel not installed ({exc})") from None
    seq = min(SEQ_LEN, inp.n)
    if inp.n % seq:
        raise Unavailable(f"N={inp.n} is not a multiple of the sequence length {seq}")
    b = inp.n // seq
    loss_mod = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=0.2,
                                        epsilon_high=0.3, loss_type="dapo", chunk_size=1,
                                        compiled=True)
    mask = torch.ones(b, seq, dtype=torch.long, device=inp.hidden_a.device)
    ids = inp.targets.view(b, seq)
    adv = inp.advantages.view(b, seq)[:, 0].contiguous()
    views = [inp.hidden_a] + ([inp.hidden_b] if inp.hidden_b is not None else [])

    def run():
        total = 0.0
        for h in views:  # one call per view: Liger has no two-view loss, no KL, no entropy
            loss, _ = loss_mod(h.view(b, seq, -1), inp.weight, ids, mask, adv)
            total = total + loss
        return _backward(total)

    return run


# cce -------------------------------------------------------------


def _build_cce(inp: Inputs, opts: dict):
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as exc:
        raise Unavailable(f"cut-cross-entropy not installed ({exc})") from None
    impl = "cce" if inp.device == "cuda" else "torch_compile"
    adv, inv_n = inp.advantages, _inv_n(inp)
    views = [inp.hidden_a] + ([inp.hidden_b] if inp.hidden_b is not None else [])
    if inp.mode == "fwd":
        def fwd():
            with torch.no_grad():
                return -linear_cross_entropy(inp.hidden_a, inp.weight, inp.targets,
                                             reduction="none", impl=impl)
        return fwd

    def run():
        total = 0.0
        for h in views:  # one call per view, log-probs only
            logp = -linear_cross_entropy(h, inp.weight, inp.targets, reduction="none", impl=impl)
            total = total + _policy_term(logp.float(), adv).sum() * inv_n
        return _backward(total)

    return run


# verl ------------------------------------------------------------


def _import_verl(module: str):
    """Import a verl submodule without running verl/__init__.py (which needs Ray and more)."""
    if "verl" not in sys.modules:
        spec = importlib.util.find_spec("verl")
        if spec is None or spec.origin is None:
            raise Unavailable("verl not installed")
        root = os.path.dirname(spec.origin)
        for name, sub in (("verl", ""), ("verl.utils", "utils")):
            mod = types.ModuleType(name)
            mod.__path__ = [os.path.join(root, sub)]
            sys.modules[name] = mod
    try:
        return importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure is an unavailable cell
        raise Unavailable(f"verl import failed: {type(exc).__name__}: {exc}") from None


def _verl_runner(inp: Inputs, fn):
    adv, inv_n = inp.advantages, _inv_n(inp)
    if inp.mode == "fwd":
        def fwd():
            with torch.no_grad():
                return fn(inp.hidden_a, inp.weight, inp.targets)
        return fwd

    def run():
        logp, ent = fn(inp.hidden_a, inp.weight, inp.targets)
        return _backward(token_loss(logp.float(), ent.float(), adv).sum() * inv_n)

    return run


def _build_verl(inp: Inputs, opts: dict):
    if inp.device != "cuda":
        raise Unavailable("gpu-only: verl's fused log-prob+entropy kernel is Triton on CUDA")
    lce = _import_verl("verl.utils.kernel.linear_cross_entropy").linear_cross_entropy
    return _verl_runner(inp, lambda h, w, t: lce(h, w, t, 1.0, "none"))


def _build_verl_torch(inp: Inputs, opts: dict):
    mod = _import_verl("verl.utils.experimental.torch_functional")
    fused = mod.FusedLinearForPPO(chunk_size=512)
    return _verl_runner(inp, lambda h, w, t: fused(h, w, t, 1.0))


# floor -----------------------------------------------------------


def _build_floor(inp: Inputs, opts: dict):
    """The useful GEMMs of the workload and nothing else: Z = h W^T per view, then with Z
    standing in for dZ, dh = Z W and dW += Z^T h per view that needs grad; Z is kept in the
    input dtype in a bounded chunk."""
    w = inp.weight.detach()
    chunk = opts.get("floor_chunk") or max(256, min(inp.n, int(2**30 // (w.shape[0] * w.element_size()))))
    views = [(inp.hidden_a.detach(), inp.hidden_a.requires_grad)]
    if inp.hidden_b is not None:
        views.append((inp.hidden_b.detach(), inp.hidden_b.requires_grad))

    def run():
        # dW accumulates in the weight's dtype: cuBLAS/BLAS accumulate each product in fp32.
        dw = torch.zeros_like(w) if inp.weight.requires_grad else None
        outs = []
        for h, need in views:
            dh = torch.empty_like(h) if need else None
            for r0 in range(0, inp.n, chunk):
                hc = h[r0:r0 + chunk]
                z = hc @ w.T
                if need:
                    torch.mm(z, w, out=dh[r0:r0 + chunk])
                    if dw is not None:
                        dw.addmm_(z.T, hc)
                else:
                    outs.append(z[:, 0].float())
            outs.append(dh)
        return dw, outs

    return run


_BOTH = frozenset(OPS)
_GRAD = frozenset({("two_view", "fwd_bwd"), ("token_stats", "fwd_bwd")})
_TOKEN = frozenset({("token_stats", "fwd"), ("token_stats", "fwd_bwd")})


def _ours() -> list[Provider]:
    out = []
    for backend in ("torch", "triton", "cpp"):
        for api in ("stats", "fused"):
            wl = _BOTH if api == "stats" else _GRAD
            if backend != "triton":  # one strategy: the names carry none
                out.append(Provider(f"{backend}:{api}", "ours", "all", wl,
                                    _ours_builder(backend, api, "auto"), needs_warmup=backend != "torch"))
                continue
            out.append(Provider(f"triton:{api}:workspace", "ours", "all", wl,
                                _ours_builder(backend, api, "workspace"), needs_warmup=True, workspace={}))
            out.append(Provider(f"triton:{api}:workspace_cuda", "ours", "all", wl,
                                _ours_builder(backend, api, "workspace_cuda"), needs_warmup=True,
                                workspace={},
                                note="workspace path with the CUDA C++ epilogues (csrc/cuda/)"))
            for suffix, ws in WORKSPACE_VARIANTS.items():
                # forward-only statistics differ between variants only for "v1" (unsplit epilogue)
                wl_v = wl if suffix == "v1" else wl & _GRAD
                out.append(Provider(f"triton:{api}:workspace:{suffix}", "ours", "all", wl_v,
                                    _ours_builder(backend, api, "workspace", ws), needs_warmup=True,
                                    workspace=ws, note=f"workspace variant {ws}"))
    out.append(Provider("triton:stats:inregister", "ours", "all", frozenset({("token_stats", "fwd")}),
                        _ours_builder("triton", "stats", "workspace", dict(inregister_forward=True)),
                        needs_warmup=True, note="in-register forward statistics (PAPO_INREGISTER_FORWARD=1)"))
    return out


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("eager", "peer", "all", _BOTH, _build_eager,
                 note="materialized fp32 logits (TRL style)"),
        Provider("compile", "peer", "all", _BOTH, _build_compile, needs_warmup=True,
                 note=f"torch.compile'd chunks of {COMPILE_CHUNK} rows, gradient in forward"),
        *_ours(),
        Provider("liger", "peer", "logp", _GRAD, _build_liger, needs_warmup=True,
                 note="LigerFusedLinearGRPOLoss, one call per view; no KL, no entropy"),
        Provider("cce", "peer", "logp", _BOTH, _build_cce, needs_warmup=True,
                 note="linear_cross_entropy, one call per view; impl cce on CUDA, torch_compile "
                      "(materializes logits) elsewhere"),
        Provider("verl", "peer", "logp+entropy", _TOKEN, _build_verl, needs_warmup=True,
                 note="verl fused log-prob+entropy Triton kernel"),
        Provider("verl_torch", "peer", "logp+entropy", _TOKEN, _build_verl_torch,
                 note="verl FusedLinearForPPO (chunked PyTorch, 512 rows)"),
        Provider("floor", "floor", "gemm", _BOTH, _build_floor,
                 note="the useful GEMMs alone (6HV per token and view with grad)"),
    )
}


def outputs_match(provider: Provider, op: str) -> bool:
    """Whether the provider computes everything the workload's loss needs (a same-outputs peer)."""
    if provider.outputs == "all":
        return True
    return op == "token_stats" and provider.outputs == "logp+entropy"


def build(name: str, inp: Inputs, opts: dict | None = None) -> Callable[[], Any]:
    """The provider's callable for these inputs; raises Unavailable with the reason."""
    p = PROVIDERS[name]
    if (inp.op, inp.mode) not in p.workloads:
        raise Unavailable(f"{name} has no {inp.op}/{inp.mode}")
    return p.builder(inp, opts or {})
