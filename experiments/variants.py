"""What the sweep compares: the loss variants, the tasks and the training budgets.

Every variant trains `train/configs/tiny.yaml` with the same warm start, steps, prompts,
rollouts and learning rate; only the `papo.*` overrides below differ. A task or a budget is a
list of config overrides applied to every run (and to the shared warm start) of a sweep.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = ROOT / "train" / "configs" / "tiny.yaml"

BASELINE = "grpo"
"""The variant every other one is compared with (paired by seed)."""
SAMPLED, EXACT = "papo-g", "papo-g-exact"
"""The estimator comparison: the released sampled k3 term against our exact one."""


@dataclass(frozen=True)
class Variant:
    """One loss configuration: a name, its `papo.*` overrides and its group ("main" / "grid")."""

    name: str
    overrides: tuple[str, ...]
    group: str
    description: str
    gamma: float
    eta: float


def _grid_name(gamma: float, eta: float) -> str:
    return f"g{gamma:g}-e{eta:g}"


MAIN: tuple[Variant, ...] = (
    Variant(BASELINE, ("papo.preset=grpo", "papo.beta=0.0"), "main",
            "GRPO without reference KL (the `grpo` preset, beta 0)", 0.0, 0.0),
    Variant(SAMPLED, ("papo.preset=papo-g-nref-7b",), "main",
            "PAPO-G as released (`papo-g-nref-7b`: sampled k3, gamma 0.01, eta 0.03/0.03)", 0.01, 0.03),
    Variant(EXACT, ("papo.preset=papo-g-nref-7b", "papo.estimator=exact", "papo.masked_view=current_no_grad"),
            "main", "PAPO-G with the exact full-vocabulary estimator (masked view current_no_grad)",
            0.01, 0.03),
)

GRID_GAMMAS = (0.01, 0.05, 0.2)
GRID_ETAS = (0.0, 0.03)


def _grid() -> tuple[Variant, ...]:
    out = []
    for gamma in GRID_GAMMAS:
        for eta in GRID_ETAS:
            if (gamma, eta) == (0.01, 0.03):
                continue  # the released preset itself: the grid reuses the `papo-g` runs
            out.append(Variant(
                _grid_name(gamma, eta),
                ("papo.preset=papo-g-nref-7b", f"papo.gamma={gamma}", f"papo.eta_full={eta}",
                 f"papo.eta_masked={eta}"),
                "grid", f"KL-hacking grid: sampled estimator, gamma {gamma}, eta {eta}/{eta}", gamma, eta))
    return tuple(out)


GRID: tuple[Variant, ...] = _grid()
VARIANTS: dict[str, Variant] = {v.name: v for v in MAIN + GRID}


def grid_cells() -> list[tuple[float, float, str]]:
    """(gamma, eta, variant name) of every cell of the KL-hacking grid, `papo-g` included."""
    return [(g, e, SAMPLED if (g, e) == (0.01, 0.03) else _grid_name(g, e))
            for g in GRID_GAMMAS for e in GRID_ETAS]


TASKS: dict[str, tuple[str, ...]] = {
    "standard": (),
    # text priors mislead a policy that does not look (train/data.py, `variant: misleading`)
    "misleading": ("data.synthetic.variant=misleading",),
}

BUDGETS: dict[str, tuple[str, ...]] = {
    # the tiny config as it is: 150 warm-start steps, 60 PAPO steps of 32 prompts x 4 rollouts,
    # held-out avg@4 on all 256 validation questions every 20 steps, black images at the end
    "full": (),
    # a few minutes per run: 20 PAPO steps, held-out avg@4 on 64 questions every 10 steps
    "quick": ("trainer.max_steps=20", "eval.every=10", "eval.limit=64", "checkpoint.save_every=10"),
}


def select(spec: str) -> list[Variant]:
    """Variants named by a comma list of names and group names ("main", "grid", "all")."""
    out: list[Variant] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part == "all":
            chosen = list(MAIN + GRID)
        elif part in ("main", "grid"):
            chosen = [v for v in MAIN + GRID if v.group == part]
        elif part in VARIANTS:
            chosen = [VARIANTS[part]]
        else:
            raise ValueError(f"--variants: unknown variant or group {part!r}; choose from "
                             f"{['all', 'main', 'grid', *VARIANTS]}")
        out += [v for v in chosen if v not in out]
    if not out:
        raise ValueError("--variants: no variant selected")
    return out
