"""What each rank alone knows and an exact resume needs: its random number generators, its data
stream position and its BatchNorm buffers.

DeepSpeed keeps ``client_state`` only in rank 0's model-states file under ZeRO-1/2 and never
syncs buffers across ranks (FIELD-NOTES), so every rank writes this file of its own.

Stored with ``torch.save`` as tensors and plain Python containers only, and read back with
``torch.load(weights_only=True)``: loading a checkpoint never unpickles arbitrary objects.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from introvae_dist.files import write_atomic

RANK_STATE_FORMAT = "introvae-dist-rank-state/1"


def capture_rngs(noise: torch.Generator) -> dict[str, Any]:
    """Python, NumPy and torch (CPU, and CUDA where present) generators plus the step noise's."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    rngs: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "noise": noise.get_state(),
    }
    if torch.cuda.is_available():
        rngs["cuda"] = torch.cuda.get_rng_state()
    return rngs


def restore_rngs(rngs: dict[str, Any], noise: torch.Generator) -> None:
    py = rngs["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = rngs["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(rngs["torch"])
    noise.set_state(rngs["noise"])
    if "cuda" in rngs and torch.cuda.is_available():
        torch.cuda.set_rng_state(rngs["cuda"])


def module_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's buffers (BatchNorm running statistics), which drift apart across ranks."""
    return {name: b.detach().cpu().clone() for name, b in module.named_buffers()}


def restore_buffers(module: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    own = dict(module.named_buffers())
    if set(own) != set(buffers):
        raise ValueError(f"buffer names differ: checkpoint has {sorted(buffers)[:3]}..., model {sorted(own)[:3]}...")
    with torch.no_grad():
        for name, value in buffers.items():
            own[name].copy_(value)


class RankLocal:
    """This rank's RNGs and the buffers of its networks, as one object with ``state_dict`` /
    ``load_state_dict`` (the ``rngs`` and ``buffers`` of the rank file)."""

    def __init__(self, noise: torch.Generator, modules: dict[str, nn.Module]) -> None:
        self.noise, self.modules = noise, modules

    def state_dict(self) -> dict[str, Any]:
        return {"rngs": capture_rngs(self.noise),
                "buffers": {name: module_buffers(module) for name, module in self.modules.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rngs(state["rngs"], self.noise)
        for name, module in self.modules.items():
            restore_buffers(module, state["buffers"][name])

    def reseed(self, seed: int) -> None:
        """Fresh generators for a resume whose saved ones belong to no rank of this world (the
        world size changed); buffers come from the engines' own checkpoint then."""
        random.seed(seed), np.random.seed(seed), torch.manual_seed(seed), self.noise.manual_seed(seed)


def save_rank_state(path: Path, state: dict[str, Any]) -> None:
    """Write one rank's state via a temp file and rename (the manifest lists it afterwards)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda stream: torch.save({"format": RANK_STATE_FORMAT, **state}, stream))


def load_rank_state(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != RANK_STATE_FORMAT:
        raise ValueError(f"{path}: not an introvae-dist rank state (expected format {RANK_STATE_FORMAT!r})")
    return state
