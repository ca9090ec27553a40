"""Input validation, dispatch and the edge cases of docs/design.md's contract."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import papo_kernels as pk
from papo_kernels import reference
from papo_kernels._backends import resolve_backend
from papo_kernels._options import KernelOptions


def _inputs(n=5, h=6, v=40):
    return torch.randn(n, h), torch.randn(n, h), torch.randn(v, h), torch.randint(0, v, (n,))


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a, b, w, t: (a[:, :5], b, w, t), ValueError, "hidden_a has hidden size 5"),
        (lambda a, b, w, t: (a, b[:4], w, t), ValueError, "hidden_b has shape"),
        (lambda a, b, w, t: (a, b, w[0], t), ValueError, "weight must be 2-D"),
        (lambda a, b, w, t: (a.double(), b, w, t), TypeError, "hidden_a has dtype torch.float64"),
        (lambda a, b, w, t: (a, b.half(), w, t), TypeError, "hidden_b has dtype torch.float16"),
        (lambda a, b, w, t: (a, b, w, t.float()), TypeError, "targets must be an integer tensor"),
        (lambda a, b, w, t: (a, b, w, t.bool()), TypeError, "targets must be an integer tensor"),
        (lambda a, b, w, t: (a, b, w, t[:3]), ValueError, r"targets must have shape \(5,\)"),
        (lambda a, b, w, t: (a, b, w.to("meta"), t), ValueError, "hidden_a is on cpu but weight is on meta"),
        (lambda a, b, w, t: (a, b, w, t.numpy()), TypeError, "targets must be a torch.Tensor"),
        (lambda a, b, w, t: (a[0], b[0], w, t[0]), ValueError, r"hidden_a must be \[N, H\]"),
    ],
)
def test_bad_tensors(mutate, exc, match):
    a, b, w, t = mutate(*_inputs())
    with pytest.raises(exc, match=match):
        pk.two_view_stats(a, b, w, t)


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, math.inf])
def test_bad_temperature(temperature):
    a, _, w, t = _inputs()
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        pk.token_stats(a, w, t, temperature=temperature)


def test_bad_options():
    a, b, w, t = _inputs()
    with pytest.raises(ValueError, match="backend must be one of"):
        pk.token_stats(a, w, t, backend="cuda")
    with pytest.raises(ValueError, match="strategy must be one of"):
        pk.two_view_stats(a, b, w, t, strategy="fast")
    with pytest.raises(ValueError, match="chunk_vocab must be a positive int"):
        pk.token_stats(a, w, t, chunk_vocab=0)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        pk.token_stats(a, w, t, ignore_index=-100.0)


OPTIONS = dict(temperature=0.5, ignore_index=-1, backend="torch", strategy="workspace", chunk_tokens=3,
               chunk_vocab=7)


@pytest.mark.parametrize("call", ["token_stats", "two_view_stats", "fused_token_loss", "fused_two_view_loss"])
def test_the_options_reach_the_backend_as_one_value(monkeypatch, call):
    """Each call builds one KernelOptions from its keywords, and the backend's entry point gets it:
    the statistics calls through their custom op's scalars, the fused calls unchanged."""
    seen = []
    entry = "loss_rows" if call.startswith("fused") else "forward_stats"
    real = getattr(reference, entry)
    position = 5 if entry == "loss_rows" else 4  # after the tensors (and on_chunk)
    monkeypatch.setattr(reference, entry, lambda *a, **k: seen.append(a[position]) or real(*a, **k))
    a, b, w, t = _inputs()
    views = (a,) if call in ("token_stats", "fused_token_loss") else (a, b)
    loss_fn = (lambda s, i: (s[0].sum(), {})) if call.startswith("fused") else None
    getattr(pk, call)(*views, w, t, *([loss_fn] if loss_fn else []), **OPTIONS)
    assert seen == [KernelOptions(**OPTIONS)]
    assert isinstance(seen[0].temperature, float)
    plain = KernelOptions(temperature=2)
    assert plain.temperature == 2.0 and isinstance(plain.temperature, float)
    assert KernelOptions.from_op_args(*plain.op_args()) == plain


def test_cpp_backend_reports_not_built():
    """Without the compiled extension: backend="cpp" raises with the reason, "auto" uses torch."""
    code = (
        "import sys, torch\n"
        "sys.modules['papo_kernels._C'] = None  # as if the extension were not built\n"
        "import papo_kernels as pk\n"
        "from papo_kernels._backends import resolve_backend\n"
        "a, w, t = torch.randn(3, 4), torch.randn(7, 4), torch.tensor([0, 1, 2])\n"
        "try:\n"
        "    pk.token_stats(a, w, t, backend='cpp')\n"
        "except pk.BackendUnavailableError as exc:\n"
        "    print('raised:', exc)\n"
        "print('auto:', resolve_backend('auto', torch.device('cpu')).name)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PAPO_KERNELS_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "raised: backend='cpp' is not available: the C++ extension is not built" in out.stdout
    assert "pip install --no-build-isolation -e ." in out.stdout
    assert "auto: torch" in out.stdout


def test_triton_backend_needs_gpu_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(pk.BackendUnavailableError, match="backend='triton' is not available"):
        resolve_backend("triton", torch.device("cpu"))


def test_auto_on_cpu_never_picks_the_interpreter():
    assert resolve_backend("auto", torch.device("cpu")).name in ("torch", "cpp")


def test_out_of_range_targets_raise_on_cpu_by_default():
    a, b, w, t = _inputs()
    t[2] = 40
    with pytest.raises(ValueError, match=r"targets must be in \[0, 40\).*targets\[2\] = 40"):
        pk.two_view_stats(a, b, w, t)
    t[2] = -7
    with pytest.raises(ValueError, match="targets"):
        pk.fused_token_loss(a, w, t, lambda s, i: (s.logp.sum(), {}))


def test_out_of_range_targets_give_nan_rows_without_check():
    a, b, w, t = _inputs()
    t[2] = 99
    t[3] = -100
    a.requires_grad_()
    w.requires_grad_()
    s = pk.two_view_stats(a, b, w, t, check_inputs=False, backend="torch")
    for x in s:
        assert torch.isnan(x[2]) and x[3] == 0
        assert torch.isfinite(x[[0, 1, 4]]).all()
    sum(x.sum() for x in s).backward()
    assert torch.isnan(a.grad[2]).all() and torch.isfinite(a.grad[[0, 1, 3, 4]]).all()
    assert torch.all(a.grad[3] == 0)


def test_check_finite():
    a, b, w, t = _inputs()
    b[1, 2] = math.inf
    with pytest.raises(ValueError, match=r"hidden_b has NaN/Inf values in row \[1\]"):
        pk.two_view_stats(a, b, w, t, check_finite=True)
    # Without the check the row is non-finite and the others are untouched.
    s = pk.two_view_stats(a, b, w, t, backend="torch")
    assert not torch.isfinite(s.kl_ab[1]) and torch.isfinite(s.kl_ab[[0, 2, 3, 4]]).all()


def test_empty_inputs():
    w = torch.randn(30, 4, requires_grad=True)
    h = torch.zeros(0, 4, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    s = pk.two_view_stats(h, h, w, t)
    assert all(x.shape == (0,) and x.dtype == torch.float32 for x in s)
    sum(x.sum() for x in s).backward()
    assert h.grad.shape == (0, 4) and torch.all(w.grad == 0)
    s = pk.token_stats(h.view(0, 3, 4), w, t.view(0, 3))
    assert s.logp.shape == (0, 3)


def test_all_rows_ignored_give_zero_outputs_and_grads():
    a, b, w, t = _inputs()
    t[:] = -100
    a.requires_grad_()
    w.requires_grad_()
    s = pk.two_view_stats(a, b, w, t)
    assert all(torch.all(x == 0) for x in s)
    sum(x.sum() for x in s).backward()
    assert torch.all(a.grad == 0) and torch.all(w.grad == 0)


def test_custom_ignore_index():
    a, b, w, t = _inputs()
    t[0], t[1] = 7, 8
    s = pk.token_stats(a, w, t, ignore_index=7)
    assert s.logp[0] == 0 and s.entropy[0] == 0 and s.logp[1] != 0


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8])
def test_narrow_integer_targets_are_rejected(dtype):
    a, _, w, t = _inputs()
    with pytest.raises(TypeError, match="targets must be int64 or int32"):
        pk.token_stats(a, w, t.to(dtype))


def test_int32_targets_work():
    a, _, w, t = _inputs()
    torch.testing.assert_close(pk.token_stats(a, w, t.int()).logp, pk.token_stats(a, w, t).logp)
