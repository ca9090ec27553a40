"""The kernel calls' options as one value, checked once where it is built.

The public calls (api.py, vocab_parallel.py) keep their explicit keyword arguments; each builds
one `KernelOptions` from them, whose construction checks every option that needs no tensor (the
tensor checks and the value checks of `check_inputs` / `check_finite` stay in api.py). The value
then travels unchanged through autograd.py to a backend's `forward_stats`, `backward_grads` and
`loss_rows` (reference.py defines that interface). Two boundaries take plain scalars instead,
because they cannot take a Python object: torch.library custom ops (`op_args` /
`from_op_args`) and the compiled or Triton kernels themselves, whose launchers unpack the fields.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from papo_kernels._strategies import check_strategy

BACKENDS = ("auto", "torch", "triton", "cpp")


@dataclass(frozen=True)
class KernelOptions:
    """What the four calls' keyword options mean is documented on the calls (api.py)."""

    temperature: float = 1.0
    ignore_index: int = -100
    backend: str = "auto"
    strategy: str = "auto"
    check_inputs: bool | None = None
    check_finite: bool = False
    chunk_tokens: int | None = None  # None: each backend's default
    chunk_vocab: int | None = None

    def __post_init__(self) -> None:
        """Raise TypeError/ValueError naming the offending option and what was expected."""
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        check_strategy(self.strategy)
        temperature = self.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        for name in ("chunk_tokens", "chunk_vocab"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        # An int temperature (e.g. 2) is the same option as 2.0; the ops' schemas take a float.
        object.__setattr__(self, "temperature", float(temperature))

    def op_args(self) -> tuple[float, int, str, str, int, int]:
        """The options a custom op's schema carries (a schema has no Python objects):
        (temperature, ignore_index, backend, strategy, chunk_tokens, chunk_vocab), 0 for a
        default chunk size."""
        return (self.temperature, self.ignore_index, self.backend, self.strategy,
                self.chunk_tokens or 0, self.chunk_vocab or 0)

    @classmethod
    def from_op_args(cls, temperature: float, ignore_index: int, backend: str, strategy: str,
                     chunk_tokens: int, chunk_vocab: int) -> KernelOptions:
        """The inverse of `op_args`, inside a custom op."""
        return cls(temperature=temperature, ignore_index=ignore_index, backend=backend, strategy=strategy,
                   chunk_tokens=chunk_tokens or None, chunk_vocab=chunk_vocab or None)

    def replace(self, **changes) -> KernelOptions:
        """A copy with `changes` (checked like a new value)."""
        return dataclasses.replace(self, **changes)


DEFAULT_OPTIONS = KernelOptions()
