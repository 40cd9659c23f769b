"""The margin m of Eq. 11, fixed by the config or chosen at the end of the VAE warm-up.

Appendix D: "m can be selected to be a little larger than the training kl-divergence value of
VAEs" (hhb072/IntroVAE #3 asks how to pick it). With ``loss.margin: auto`` the trainer measures that KL itself: the mean
KL(real) over the warm-up's last ``loss.margin_window_images`` images, times
``loss.margin_factor``. The per-step KL it averages is already the mean over all ranks' images
(maintenance.reduce_over_ranks), so every rank computes the same m without a collective.

The choice and the window behind it are saved in trainer_state.json: a resume inside the
warm-up goes on filling the same window, one after it keeps the m chosen before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from introvae_dist.config import ConfigError, LossConfig


@dataclass
class Margin:
    """The m of Eq. 11 for each step (see the module docstring)."""

    cfg: LossConfig
    batch_global: int
    #: The m in use: the config's, or the automatic one once chosen (None before).
    chosen: float | None = None
    #: Mean KL(real) of each warm-up step inside the window, oldest first.
    window_kl: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.active and self.cfg.margin != "auto":
            self.chosen = float(self.cfg.margin)  # type: ignore[arg-type]

    @property
    def active(self) -> bool:
        """Whether the objective has a margin: IntroVAE's hinge has; Soft-IntroVAE has none."""
        return self.cfg.objective == "introvae"

    @property
    def value(self) -> float:
        """m for the next step. Before the automatic choice only the warm-up runs, where alpha = 0
        removes the hinge of Eq. 11-12 and m has no effect; 0 is logged then."""
        return self.chosen if self.chosen is not None else 0.0

    def observe(self, images_before: int, kl_real: float) -> str | None:
        """Record one step's mean KL(real) (of the images after ``images_before``); at the last
        warm-up step choose m. Returns the line to log when m was chosen, else None."""
        c = self.cfg
        if not self.active or self.chosen is not None or images_before >= c.warmup_images:
            return None
        if images_before + self.batch_global > c.warmup_images - c.margin_window_images:
            self.window_kl.append(kl_real)
        if images_before + self.batch_global < c.warmup_images:
            return None
        mean_kl = sum(self.window_kl) / len(self.window_kl)
        self.chosen = c.margin_factor * mean_kl  # type: ignore[operator]
        return (f"loss.margin=auto: m = {self.chosen:.3f} = loss.margin_factor {c.margin_factor:g} x the mean KL(real) "
                f"{mean_kl:.3f} of the warm-up's last {len(self.window_kl) * self.batch_global} images "
                f"(Appendix D: a little larger than the training KL of the VAE)")

    def require_chosen_after_warmup(self, images_seen: int) -> None:
        """Raise ConfigError when a resume past the warm-up has no m: a run trained with a fixed
        m resumed with ``auto`` (the window it would average is gone, and is never re-measured)."""
        if self.active and self.chosen is None and images_seen >= self.cfg.warmup_images:
            raise ConfigError(f"loss.margin=auto on a resume at {images_seen} images, after the warm-up of "
                              f"{self.cfg.warmup_images}: this run's checkpoint has no automatic m to keep (it was "
                              "trained with a fixed loss.margin); resume with that value")

    def state_dict(self) -> dict[str, Any]:
        return {"auto": self.cfg.margin == "auto", "chosen": self.chosen, "window_kl": list(self.window_kl)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """From trainer_state.json; a checkpoint written before this existed has none (fixed m)."""
        if state is None or self.cfg.margin != "auto":
            return
        if state.get("auto"):
            self.chosen, self.window_kl = state["chosen"], list(state["window_kl"])
