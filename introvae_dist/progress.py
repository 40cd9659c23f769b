"""How far a run is: optimiser steps taken and images seen, and so the phase of Sec. 4.1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Phase = Literal["warmup", "adversarial"]


@dataclass
class Progress:
    """Steps and images over all ranks since the run began; saved in trainer_state.json."""

    #: Images trained as a plain VAE before the adversarial phase (loss.warmup_images).
    warmup_images: int
    step: int = 0
    images_seen: int = 0

    @property
    def phase(self) -> Phase:
        """The VAE warm-up (alpha = 0 in Eq. 11-12) until warmup_images are seen, then Algorithm 1."""
        return "warmup" if self.images_seen < self.warmup_images else "adversarial"

    def advance(self, images: int) -> None:
        self.step += 1
        self.images_seen += images

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "images_seen": self.images_seen, "phase": self.phase}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.images_seen = int(state["step"]), int(state["images_seen"])
