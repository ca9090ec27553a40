"""papo-kernels: exact, memory-bounded log-probs, entropies and two-view KLs over the vocabulary.

The four calls (docs/design.md, the contract) compute, from last hidden states and the shared
lm_head weight, what a PAPO/GRPO loss needs without materializing [tokens x vocab] logits.
"""

from papo_kernels._backends import BackendUnavailableError, available_backends
from papo_kernels.api import (
    TokenStats,
    TwoViewStats,
    fused_token_loss,
    fused_two_view_loss,
    token_stats,
    two_view_stats,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "TokenStats",
    "TwoViewStats",
    "available_backends",
    "fused_token_loss",
    "fused_two_view_loss",
    "token_stats",
    "two_view_stats",
]
