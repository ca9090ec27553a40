"""backend="triton": what only this backend has (the contract it shares with the cpp backend,
against backend="torch" and a dense float64 oracle, runs in tests/test_backend_contract.py; the
dZ ring's own cases are in test_workspace_ring.py).

Here: the retired strategies, which kernels run (no dZ launch without a gradient, one logit GEMM
per chunk of the fused calls, the in-register forward), small launch configurations (many tiles,
splits and chunks), bitwise repeatability, the configuration and environment switches, imports
without a GPU, and the `gpu`-marked bf16 path with the default GPU configs.

On machines without an NVIDIA device the kernels run under the Triton interpreter
(TRITON_INTERPRET=1, set by conftest.py before triton is imported) with small shapes.
Tolerances: tests/_numerics.py (|triton - gt| <= 2 |torch - gt| + atol).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import papo_kernels as pk
from tests._backend_contract import (
    STAT_ATOL,
    TWO_VIEW_OUTPUTS,
    backend_grads,
    dense64,
    leaves,
    loss_fn,
    make_inputs,
    row_coefs,
    weighted,
)
from tests._numerics import assert_close_to_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if "triton" not in pk.available_backends(DEVICE):
    pytest.skip("backend='triton' cannot run here (no triton, or no GPU and no TRITON_INTERPRET=1)",
                allow_module_level=True)

from papo_kernels import kernels as K  # noqa: E402
from papo_kernels import reference  # noqa: E402
from papo_kernels._options import KernelOptions  # noqa: E402
from papo_kernels.kernels import _config  # noqa: E402
from papo_kernels.reference import RowStats  # noqa: E402

# ---------------------------------------------------------------- which kernels run


def test_fused_loss_without_grad_launches_no_dz_kernel(monkeypatch):
    """No input needs a gradient: no gradient sweep (the loss itself is checked against the torch
    backend by test_backend_contract.py's test_fused_loss_without_grad_skips_the_sweep)."""
    from papo_kernels.kernels import workspace

    calls = []  # every launch of the gradient epilogue (dZ), which the gradient GEMMs consume
    real = workspace.workspace_dz
    monkeypatch.setattr(workspace, "workspace_dz", lambda *a, **k: calls.append(1) or real(*a, **k))
    ha, hb, w, t = make_inputs(9, 16, 100, torch.float32, device=DEVICE)
    fn = loss_fn(row_coefs(9, 6), TWO_VIEW_OUTPUTS)
    loss, _ = pk.fused_two_view_loss(ha, hb, w, t, fn, backend="triton", strategy="workspace")
    assert not loss.requires_grad
    assert calls == []
    leaf = ha.clone().requires_grad_(True)  # with a gradient to compute, the same spy sees the sweep
    pk.fused_two_view_loss(leaf, hb, w, t, fn, backend="triton", strategy="workspace")
    assert calls, "the spy does not see the gradient sweep"


# ---------------------------------------------------------------- strategies


def test_unknown_and_retired_strategies_raise():
    ha, hb, w, t = make_inputs(3, 8, 20, torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="strategy must be one of"):
        K.forward_stats(ha, hb, w, t, KernelOptions(strategy="fastest"))
    for call in (lambda: K.forward_stats(ha, hb, w, t, KernelOptions(strategy="fused")),
                 lambda: pk.two_view_stats(ha, hb, w, t, backend="triton", strategy="fused")):
        with pytest.raises(ValueError, match="strategy='fused' was retired: .*104x"):
            call()


# ---------------------------------------------------------------- kernel configurations


_SMALL = dict(
    workspace_stats=_config.LaunchConfig(BLOCK_N=16, BLOCK_V=32, splits=5),
    workspace_dz=_config.LaunchConfig(BLOCK_N=16, BLOCK_V=64),
    stats_combine=_config.LaunchConfig(BLOCK_N=16, BLOCK_V=16),
)


def test_many_tiles_splits_and_chunks():
    """Small tiles: several row and vocabulary tiles; 7 vocabulary tiles in 5 splits of 2 (the
    last one empty) merged by the combine kernel; workspace chunks of 16 rows (the last one
    partial)."""
    ha, hb, w, t = make_inputs(37, 40, 203, torch.float32, ignored=(6,), device=DEVICE)
    with _config.override_configs(**_SMALL):
        s, *g = backend_grads("triton", "workspace", ha, hb, w, t, chunk_tokens=16)
    s_r, *g_r = backend_grads("torch", "workspace", ha, hb, w, t)
    for name, x, x_r in zip(TWO_VIEW_OUTPUTS, s, s_r):
        assert torch.allclose(x, x_r, atol=STAT_ATOL, rtol=0), name
    for name, x, x_r in zip(("dh_a", "dh_b", "dw"), g, g_r):
        assert torch.allclose(x, x_r, atol=1e-5, rtol=1e-5), name


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_inregister_forward(dtype, monkeypatch):
    """The in-register forward (PAPO_INREGISTER_FORWARD=1, kept for the GPU comparison of the
    no-grad statistics): one split, and 7 vocabulary tiles in 5 splits merged by the combine kernel."""
    n, h, v = 37, 40, 203
    ha, hb, w, t = make_inputs(n, h, v, dtype, ignored=(6,), device=DEVICE)
    ref = reference.forward_stats(ha, hb, w, t, KernelOptions(temperature=0.7))
    calls = []
    real = K.inregister_stats
    monkeypatch.setattr(K, "inregister_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    small = _config.LaunchConfig(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16, splits=5)
    for configs in ({}, dict(inregister_stats=small, stats_combine=_SMALL["stats_combine"])):
        with _config.override_workspace(inregister_forward=True), _config.override_configs(**configs):
            got = K.forward_stats(ha, hb, w, t, KernelOptions(temperature=0.7))
        for name, x, x_r in zip(RowStats._fields, got, ref):
            assert torch.allclose(x, x_r, atol=STAT_ATOL, rtol=0), (name, configs)
        assert got.logp_a[6].item() == 0.0
    assert len(calls) == 2
    K.forward_stats(ha, hb, w, t)  # the switch is off again: the workspace forward
    assert len(calls) == 2


def test_workspace_is_bitwise_reproducible():
    ha, hb, w, t = make_inputs(21, 24, 150, torch.float32, device=DEVICE)
    first = backend_grads("triton", "workspace", ha, hb, w, t, chunk_tokens=8)
    second = backend_grads("triton", "workspace", ha, hb, w, t, chunk_tokens=8)
    for x, y in zip(first[1:], second[1:]):
        assert torch.equal(x, y)


def test_config_overrides_and_validation():
    with pytest.raises(ValueError, match="power of two"):
        _config.LaunchConfig(BLOCK_N=24, BLOCK_V=64)
    with pytest.raises(ValueError, match="unknown kernel"):
        with _config.override_configs(not_a_kernel=_config.LaunchConfig(16, 16)):
            pass
    cfg = _config.LaunchConfig(16, 32, 16)
    dev = torch.device(DEVICE)
    with _config.override_configs(workspace_dz=cfg):
        assert _config.get_config("workspace_dz", dev, torch.float32, 10, 10, 10) is cfg
    assert _config.get_config("workspace_dz", dev, torch.float32, 10, 10, 10) is not cfg


def test_environment_switches(monkeypatch):
    monkeypatch.setenv("PAPO_AUTOTUNE", "1")
    assert _config.autotune_enabled() == (not _config.is_interpreting())
    monkeypatch.setenv("PAPO_WORKSPACE_MB", "3")
    assert _config.workspace_bytes() == 3 << 20
    monkeypatch.setenv("PAPO_DW_RING_ROWS", "1000")
    assert _config.ring_rows(torch.bfloat16) == 1000 and _config.ring_rows(torch.float32) == 1000
    monkeypatch.delenv("PAPO_DW_RING_ROWS")
    assert _config.ring_rows(torch.bfloat16) == _config.DEFAULT_RING_ROWS
    assert _config.ring_rows(torch.float32) == 0  # fp32: one chunk
    monkeypatch.setenv("PAPO_WORKSPACE_VARIANT", "v1")
    assert _config.workspace_variant() == "v1"
    with _config.override_workspace(variant="ring2s", ring_rows=7, workspace_mb=5, inregister_forward=True):
        assert _config.workspace_variant() == "ring2s" and _config.ring_rows(torch.float32) == 7
        assert _config.workspace_bytes() == 5 << 20 and _config.inregister_forward_enabled()
    assert _config.workspace_variant() == "v1" and not _config.inregister_forward_enabled()
    monkeypatch.setenv("PAPO_INREGISTER_FORWARD", "1")
    assert _config.inregister_forward_enabled()
    for name, bad in (("PAPO_WORKSPACE_VARIANT", "fast"), ("PAPO_DW_RING_ROWS", "-3"),
                      ("PAPO_WORKSPACE_MB", "lots")):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=name):
            _config.workspace_variant(), _config.ring_rows(torch.bfloat16), _config.workspace_bytes()
        monkeypatch.delenv(name)
    with pytest.raises(ValueError, match="ring_rows must be a positive int"):
        with _config.override_workspace(ring_rows=0):
            pass


def test_workspace_chunk_rows_respect_the_bound(monkeypatch):
    from papo_kernels.kernels.workspace import chunk_rows

    monkeypatch.setenv("PAPO_WORKSPACE_MB", "512")
    # Qwen2.5-VL-7B: two views, fp32 logits, V = 152,064: 384 rows per view.
    c = chunk_rows(16384, 152_064, 2, torch.bfloat16, None)
    assert c == 384 and 2 * c * 152_064 * 4 <= 512 << 20
    # the 2026-11-25 path: logits + bf16 dZ copy within 1 GiB: the 576-row chunks measured then
    assert chunk_rows(16384, 152_064, 2, torch.bfloat16, None, variant="v1") == 576
    assert chunk_rows(10, 152_064, 2, torch.bfloat16, None) == 10
    assert chunk_rows(1000, 50, 2, torch.float32, 128) == 128


def test_cpu_device_queries_are_guarded():
    cpu = torch.device("cpu")
    assert _config.device_props(cpu) is None
    assert _config.sm_count(cpu) > 0
    assert _config.gpu_family(cpu) == "interpreter"


def test_import_without_gpu_or_interpreter_never_fails():
    """A fresh interpreter without TRITON_INTERPRET: importing everything works, and triton is
    simply not offered for CPU tensors."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    code = (
        "import papo_kernels as pk, papo_kernels.kernels as K, torch\n"
        "assert callable(K.forward_stats) and callable(K.backward_grads)\n"
        "assert 'triton' not in pk.available_backends('cpu')\n"
        "print('ok')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# ---------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("variant", _config.WORKSPACE_VARIANTS)
def test_gpu_bf16_default_configs(variant):
    """The compiled bf16 path with the default GPU configs at a shape with a vocabulary tail,
    every workspace variant (the ring's flushes on a second stream included)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    n, h, v = 300, 256, 5003
    ha, hb, w, t = make_inputs(n, h, v, torch.bfloat16, ignored=(0, 99), device="cuda")
    with _config.override_workspace(variant=variant, ring_rows=160):
        s, *g = backend_grads("triton", "workspace", ha, hb, w, t, chunk_tokens=64)
    s_r, *g_r = backend_grads("torch", "workspace", ha, hb, w, t)
    a, b, wl = leaves((ha.double().cpu(), hb.double().cpu(), w.double().cpu()), (True, True, True))
    d = dense64(a, b, wl, t.cpu(), 1.0)
    weighted([d[k] for k in TWO_VIEW_OUTPUTS], row_coefs(n, 6)).backward()
    for i, name in enumerate(TWO_VIEW_OUTPUTS):
        assert_close_to_ref(s[i].cpu(), s_r[i].cpu(), d[name], dtype=torch.bfloat16, name=name,
                            atol=STAT_ATOL)
    # bf16 dZ feeds the GEMMs on the GPU: allow a few bf16 units relative to the largest entry.
    for name, x, x_r, gt in zip(("dh_a", "dh_b", "dw"), g, g_r, (a.grad, b.grad, wl.grad)):
        atol = 4 * 2.0**-8 * float(gt.abs().max())
        assert_close_to_ref(x.cpu(), x_r.cpu(), gt, dtype=torch.bfloat16, name=name, atol=atol)


def test_workspace_fused_loss_computes_each_logit_chunk_once(monkeypatch):
    """The fused calls reuse the workspace logits for dZ: one logit GEMM per chunk, not two."""
    from papo_kernels import _gemm

    calls = []
    real = _gemm.mm_f32

    def counting(a, b, out=None):
        calls.append(b.shape[1])  # output columns: V for a logit GEMM, H for a dh GEMM
        return real(a, b, out=out)

    monkeypatch.setattr(_gemm, "mm_f32", counting)
    ha, hb, w, t = make_inputs(40, 16, 200, torch.float32, ignored=(3,), device=DEVICE)
    a, wl = leaves((ha, w), (True, True))
    fn = loss_fn(row_coefs(40, 6), TWO_VIEW_OUTPUTS)
    loss, _ = pk.fused_two_view_loss(a, hb, wl, t, fn, backend="triton", strategy="workspace",
                                     chunk_tokens=16)
    loss.backward()
    assert calls.count(200) == 3  # ceil(40 / 16) chunks, one logit GEMM each
    a2, wl2 = leaves((ha, w), (True, True))
    ref, _ = pk.fused_two_view_loss(a2, hb, wl2, t, fn, backend="torch")
    ref.backward()
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(wl.grad, wl2.grad, rtol=1e-4, atol=1e-5)
