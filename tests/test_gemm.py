"""fp32-output GEMMs of half operands (papo_kernels/_gemm.py) and the torch backend's CUDA path.

On CPU torch has no `out_dtype` GEMMs, so the CPU tests check the selection logic (probes,
fallbacks) and run the torch backend's half-operand code path with an emulated `out_dtype`
(bf16 products are exact in fp32, so fp32 math on upcast operands is what cuBLAS computes,
up to summation order). The `gpu` tests run the real thing.
"""

from __future__ import annotations

import pytest
import torch

from papo_kernels import _gemm, reference
from papo_kernels._options import KernelOptions
from papo_kernels.reference import RowGrads

_PROBES = ("_mm_out_dtype_ok", "_addmm_fp32_self_ok", "_baddbmm_fp32_self_ok")


@pytest.fixture
def fresh_probes():
    for name in _PROBES:
        getattr(_gemm, name).cache_clear()
    _gemm.reset_paths()
    yield
    for name in _PROBES:
        getattr(_gemm, name).cache_clear()


def _emulated_out_dtype(monkeypatch, addmm_fp32_self=True, has_baddbmm=True, strided_ok=True):
    """torch.mm / addmm / baddbmm as CUDA builds with `out_dtype` behave (optionally refusing an
    fp32 `self` in addmm, as some builds do, or lacking baddbmm's out_dtype)."""
    real_mm, real_addmm, real_baddbmm = torch.mm, torch.addmm, torch.baddbmm

    def mm(a, b, *, out_dtype=None, out=None):
        if out_dtype is None:
            return real_mm(a, b, out=out) if out is not None else real_mm(a, b)
        r = real_mm(a.float(), b.float())
        return out.copy_(r) if out is not None else r

    def addmm(acc, a, b, *, out_dtype=None, beta=1, alpha=1, out=None):
        if out_dtype is None:
            return real_addmm(acc, a, b, beta=beta, alpha=alpha, out=out) if out is not None \
                else real_addmm(acc, a, b, beta=beta, alpha=alpha)
        if acc.dtype != a.dtype and not addmm_fp32_self:
            raise RuntimeError("self and mat2 must have the same dtype, but got Float and BFloat16")
        if not strided_ok and not a.is_contiguous():
            raise RuntimeError("a layout this build refuses")
        r = real_addmm(acc, a.float(), b.float(), beta=beta, alpha=alpha)
        return out.copy_(r) if out is not None else r

    def baddbmm(acc, a, b, *, out_dtype=None, beta=1, alpha=1, out=None):
        if out_dtype is not None and not has_baddbmm:
            raise TypeError("baddbmm() got an unexpected keyword argument 'out_dtype'")
        if out_dtype is None:
            return real_baddbmm(acc, a, b, beta=beta, alpha=alpha, out=out)
        out.copy_(acc)  # what the CUDA kernel does first (a no-op when out is acc)
        return real_baddbmm(out, a.float(), b.float(), beta=beta, alpha=alpha, out=out)

    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(torch, "addmm", addmm)
    monkeypatch.setattr(torch, "baddbmm", baddbmm)
    # the probes and the device check are what differ on CPU: accept bf16/fp16 on any device
    monkeypatch.setattr(_gemm, "half_gemm_supported",
                        lambda t: t.dtype in _gemm.HALF and _gemm._mm_out_dtype_ok(t.device, t.dtype))


def test_cpu_has_no_half_gemms_and_falls_back(fresh_probes):
    a = torch.randn(6, 5).bfloat16()
    b = torch.randn(5, 4).bfloat16()
    assert not _gemm.half_gemm_supported(a) and not _gemm.half_gemm_supported(a.float())
    out = _gemm.mm_f32(a, b)
    assert out.dtype == torch.float32 and torch.equal(out, a.float() @ b.float())
    acc = torch.ones(6, 4)
    _gemm.addmm_f32_(acc, a, b, alpha=0.5)
    torch.testing.assert_close(acc, 1 + 0.5 * (a.float() @ b.float()))
    assert _gemm.paths() == {"mm_upcast": 2, "addmm_sliced": 1}


def test_probes_follow_what_torch_accepts(fresh_probes, monkeypatch):
    cpu = torch.device("cpu")
    assert not _gemm._mm_out_dtype_ok(cpu, torch.bfloat16)  # NotImplementedError on CPU
    _gemm._mm_out_dtype_ok.cache_clear()
    _emulated_out_dtype(monkeypatch, addmm_fp32_self=False)
    assert _gemm._mm_out_dtype_ok(cpu, torch.bfloat16)
    assert not _gemm._addmm_fp32_self_ok(cpu, torch.bfloat16)  # the older CUDA builds
    assert _gemm._baddbmm_fp32_self_ok(cpu, torch.bfloat16)
    _gemm._addmm_fp32_self_ok.cache_clear()
    _gemm._baddbmm_fp32_self_ok.cache_clear()
    _emulated_out_dtype(monkeypatch, addmm_fp32_self=True, has_baddbmm=False)
    assert _gemm._addmm_fp32_self_ok(cpu, torch.bfloat16)
    assert not _gemm._baddbmm_fp32_self_ok(cpu, torch.bfloat16)

    def no_kwarg(a, b, out=None):  # torch before out_dtype existed
        raise TypeError("mm() got an unexpected keyword argument 'out_dtype'")

    monkeypatch.setattr(torch, "mm", no_kwarg)
    assert not _gemm._mm_out_dtype_ok(cpu, torch.float16)


@pytest.mark.parametrize("path,fp32_self,has_baddbmm", [
    ("addmm_out_dtype_inplace", True, True),
    ("baddbmm_out_dtype_inplace", False, True),
    ("addmm_sliced", False, False),
])
def test_addmm_paths_add_into_the_accumulator(fresh_probes, monkeypatch, path, fp32_self, has_baddbmm):
    """In place where torch allows an fp32 `self` (addmm, else baddbmm on a batch of one), else
    row slices of fp32 products (a few rows per slice here, so the slicing runs): each adds
    alpha * a @ b into the accumulator itself."""
    _emulated_out_dtype(monkeypatch, addmm_fp32_self=fp32_self, has_baddbmm=has_baddbmm)
    monkeypatch.setattr(_gemm, "_SLICE_ELEMENTS", 12)  # 3 rows of 4 columns per slice
    g = torch.Generator().manual_seed(0)
    a = torch.randn(10, 7, generator=g).bfloat16()
    b = torch.randn(7, 4, generator=g).bfloat16()
    acc = torch.randn(10, 4, generator=g)
    want = acc + 0.25 * (a.double() @ b.double()).float()
    out = _gemm.addmm_f32_(acc, a, b, alpha=0.25)
    assert out.data_ptr() == acc.data_ptr()
    torch.testing.assert_close(acc, want, rtol=1e-6, atol=1e-6)
    assert _gemm.paths().get(path) == 1


TEMPERATURE = 0.7


def test_a_refused_layout_falls_back_to_slices(fresh_probes, monkeypatch):
    """The probes use contiguous operands; a build that refuses the ring's transposed dZ at run
    time must still add the product (through the slices), not fail the loss."""
    _emulated_out_dtype(monkeypatch, has_baddbmm=False, strided_ok=False)
    g = torch.Generator().manual_seed(0)
    dz = torch.randn(7, 10, generator=g).bfloat16()  # [rows, V]: the dW GEMM takes dz.T
    x = torch.randn(7, 4, generator=g).bfloat16()
    acc = torch.randn(10, 4, generator=g)
    want = acc + (dz.double().T @ x.double()).float()
    _gemm.addmm_f32_(acc, dz.T, x)
    torch.testing.assert_close(acc, want, rtol=1e-6, atol=1e-6)
    assert _gemm.paths().get("addmm_out_dtype_refused") == 1 and _gemm.paths().get("addmm_sliced") == 1


def _dense64(ha, hb, w, t, coefs):
    za, zb = ha @ w.T / TEMPERATURE, hb @ w.T / TEMPERATURE
    la, lb = za.log_softmax(-1), zb.log_softmax(-1)
    valid = t != -100
    idx = torch.where(valid, t, 0)[:, None]
    logp_a = la.gather(1, idx).squeeze(1)
    ent_b = -(lb.exp() * lb).sum(-1)
    kl_ab = (la.exp() * (la - lb)).sum(-1)
    outs = (logp_a, ent_b, kl_ab)
    return sum((c * torch.where(valid, x, torch.zeros_like(x))).sum() for c, x in zip(coefs, outs))


def _torch_backend_grads(ha, hb, w, t, coefs):
    s = reference.forward_stats(ha, hb, w, t, KernelOptions(temperature=TEMPERATURE))
    g = RowGrads(logp_a=coefs[0].float(), entropy_b=coefs[1].float(), kl_ab=coefs[2].float())
    acc = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    options = KernelOptions(temperature=TEMPERATURE, chunk_tokens=16, chunk_vocab=64)
    dh_a, dh_b = reference.backward_grads(ha, hb, w, t, s, g, options, need_hidden_b=True,
                                          weight_grad_acc=acc, hidden_b_is_constant=False)
    return s, dh_a, dh_b, acc


def _check_against_float64(ha, hb, w, t, coefs, s, dh_a, dh_b, acc):
    leaves = [x.detach().double().cpu().requires_grad_() for x in (ha, hb, w)]
    _dense64(*leaves, t.cpu(), [c.double().cpu() for c in coefs]).backward()
    # bf16 dZ feeds the dh / dW GEMMs: a few bf16 units relative to the largest entry
    for got, ref in zip((dh_a, dh_b, acc), (x.grad for x in leaves)):
        err = float((got.double().cpu() - ref).abs().max())
        assert err <= 4 * 2.0**-8 * float(ref.abs().max()), err


def test_torch_backend_half_operand_path_on_cpu(fresh_probes, monkeypatch):
    """The torch backend's CUDA GEMM path (bf16 operands, fp32 outputs, dZ rounded once),
    exercised on CPU with an emulated out_dtype: statistics as exact as the fp32 path, gradients
    within bf16 rounding of float64."""
    g = torch.Generator().manual_seed(0)
    n, h, v = 37, 24, 203
    ha = torch.randn(n, h, generator=g).bfloat16()
    hb = (ha.float() + 0.5 * torch.randn(n, h, generator=g)).bfloat16()
    w = (torch.randn(v, h, generator=g) * 0.4).bfloat16()
    t = torch.randint(0, v, (n,), generator=g)
    t[5] = -100
    coefs = torch.randn(3, n, generator=g)
    # CPU: upcast, fp32 GEMMs
    s32 = reference.forward_stats(ha, hb, w, t, KernelOptions(temperature=TEMPERATURE))
    assert "mm_out_dtype" not in _gemm.paths()
    _emulated_out_dtype(monkeypatch)
    assert reference._gemm_dtype(ha, torch.float32) == torch.bfloat16
    s, dh_a, dh_b, acc = _torch_backend_grads(ha, hb, w, t, coefs)
    for x, x32 in zip(s, s32):
        torch.testing.assert_close(x, x32, rtol=0, atol=2e-5)
    _check_against_float64(ha, hb, w, t, coefs, s, dh_a, dh_b, acc)
    paths = _gemm.paths()
    assert paths.get("mm_out_dtype", 0) > 0 and paths.get("addmm_out_dtype_inplace", 0) > 0, paths


@pytest.mark.gpu
def test_gpu_torch_backend_uses_half_gemms(fresh_probes):
    """On CUDA the torch backend multiplies bf16 operands with fp32 outputs; which addmm path
    this torch takes (in place or sliced) is reported, both are correct."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    g = torch.Generator().manual_seed(0)
    n, h, v = 300, 256, 5003
    ha = torch.randn(n, h, generator=g).bfloat16().cuda()
    hb = (ha.float().cpu() + 0.5 * torch.randn(n, h, generator=g)).bfloat16().cuda()
    w = (torch.randn(v, h, generator=g) * 0.1).bfloat16().cuda()
    t = torch.randint(0, v, (n,), generator=g).cuda()
    t[0] = -100
    coefs = torch.randn(3, n, generator=g).cuda()
    assert _gemm.half_gemm_supported(ha), f"torch {torch.__version__} has no fp32-output bf16 mm"
    s, dh_a, dh_b, acc = _torch_backend_grads(ha, hb, w, t, coefs)
    _check_against_float64(ha, hb, w, t, coefs, s, dh_a, dh_b, acc)
    paths = _gemm.paths()
    print(f"torch {torch.__version__}: {paths}")
    assert paths.get("mm_out_dtype", 0) > 0 and "mm_upcast" not in paths, paths
