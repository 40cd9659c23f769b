"""`algorithm.Engine` in plain PyTorch: a bare module and its own Adam, no DeepSpeed.

The reference the step is checked against (tests/test_algorithm.py runs Algorithm 1 on it
against the paper's equations) and what the benchmarks count FLOPs on. The DeepSpeed engines
of training are built by :mod:`introvae_dist.engine`; the two modules sit side by side and
each names the output hook that its engines need (``adopt_outputs``).
"""

from __future__ import annotations

import torch
from torch import nn


class PlainEngine:
    """A module and `torch.optim.Adam` with Sec. 4.1's settings (lr 2e-4, betas 0.9/0.999)."""

    def __init__(self, module: nn.Module, lr: float = 2e-4) -> None:
        self.module = module
        self._optimizer = torch.optim.Adam(module.parameters(), lr=lr)

    def __call__(self, x: torch.Tensor) -> object:
        return self.module(x)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)  # each phase's backward starts from none


def adopt_outputs(engine: PlainEngine, *outputs: torch.Tensor) -> None:
    """`algorithm.AdoptOutputs` for `PlainEngine`s: nothing to attach, a plain module's
    backward needs no hooks. Any other engine is refused: one that hooks its backward in
    `__call__` would run without its hooks and fail later, far from the cause."""
    if not isinstance(engine, PlainEngine):
        raise TypeError(f"plain_engine.adopt_outputs is for PlainEngine, got a {type(engine).__name__!r}: "
                        f"pass its own hook (DeepSpeed engines: adopt=introvae_dist.engine.adopt_outputs)")
