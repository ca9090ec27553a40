"""CI smoke check of an installed wheel: `python wheel_smoke.py VENV_DIR`, run outside the repository.

Checks that papo_kernels is imported from the wheel installed in VENV_DIR (not from a source tree),
that its compiled extension loads and is the "auto" backend on CPU, and that backend="cpp" matches
backend="torch" on a small two-view problem with gradients, through both strategies.
"""

from __future__ import annotations

import os
import sys

import torch

import papo_kernels as pk
from papo_kernels._backends import resolve_backend


def main(venv: str) -> None:
    where = os.path.realpath(pk.__file__)
    if not where.startswith(os.path.realpath(venv)):
        raise SystemExit(f"papo_kernels was imported from {where}, not from the wheel in {venv}")
    from papo_kernels import extension

    print("wheel smoke: papo_kernels from", os.path.dirname(where), "|", extension.build_info())
    if resolve_backend("auto", torch.device("cpu")).name != "cpp":
        raise SystemExit("backend='auto' does not pick the compiled extension on CPU")
    g = torch.Generator().manual_seed(0)
    ha, hb = torch.randn(33, 48, generator=g), torch.randn(33, 48, generator=g)
    w = torch.randn(1001, 48, generator=g) * 0.2
    t = torch.randint(0, 1001, (33,), generator=g)
    t[3] = -100
    results = {}
    for backend, strategy in (("torch", "auto"), ("cpp", "workspace"), ("cpp", "tiles")):
        a, b, wl = (x.clone().requires_grad_() for x in (ha, hb, w))
        s = pk.two_view_stats(a, b, wl, t, temperature=0.8, backend=backend, strategy=strategy)
        loss = s.logp_a.sum() + 0.1 * s.kl_ab.sum() - 0.2 * s.kl_ba.sum()
        (loss + 0.03 * (s.entropy_a + s.entropy_b).sum()).backward()
        results[backend, strategy] = [*s, a.grad, b.grad, wl.grad]
    reference = results["torch", "auto"]
    for key in (("cpp", "workspace"), ("cpp", "tiles")):
        for x, y in zip(results[key], reference):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    print("wheel smoke: backend='cpp' matches backend='torch' (both strategies)")


if __name__ == "__main__":
    main(sys.argv[1])
