"""papo: Perception-Aware Policy Optimization (arXiv 2507.06448) as a loss for Qwen2.5-VL.

Public API: `PAPOConfig` (config + presets of the released checkpoints), `papo_loss` (on
per-token statistics), `PAPOLoss` (from hidden states through the fused papo_kernels calls),
`LossOutput`. Submodules: `papo.estimators`, `papo.masking`, `papo.advantages`,
`papo.rewards`.

Attributes are imported lazily (PEP 562) so that light users, such as the reward-grading
worker processes that import `papo.rewards`, do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["Coefficients", "LossOutput", "PAPOConfig", "PAPOLoss", "papo_loss"]

_LAZY = {
    "PAPOConfig": "papo.config",
    "Coefficients": "papo.config",
    "papo_loss": "papo.losses",
    "PAPOLoss": "papo.losses",
    "LossOutput": "papo.losses",
}

if TYPE_CHECKING:
    from papo.config import Coefficients, PAPOConfig
    from papo.losses import LossOutput, PAPOLoss, papo_loss


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'papo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
