"""Does a state dict fit a network? One check, for exported IntroVAE weights and for the FID
Inception file, naming what is missing, unexpected or of the wrong shape."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch


def state_dict_problems(expected: Mapping[str, tuple[int, ...]], state: Mapping[str, torch.Tensor],
                        may_be_missing: Callable[[str], bool] = lambda name: False) -> list[str]:
    """``["missing: a, b", "unexpected: c", "wrong shape: d (3,) != (4,)"]``, empty when it fits;
    at most four names per kind. ``may_be_missing`` names keys a file may leave out."""
    missing = sorted(k for k in set(expected) - set(state) if not may_be_missing(k))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k} {tuple(state[k].shape)} != {shape}" for k, shape in expected.items()
                   if k in state and tuple(state[k].shape) != shape)
    return [f"{label}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names]
