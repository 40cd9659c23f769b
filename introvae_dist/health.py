"""Warnings when a run leaves the regime of Theorem 1 for long (Sec. 3.4, Appendix D).

Theorem 1's equilibrium has E push KL(x_r), KL(x_p) up towards m while G pulls them down,
and KL(real) below m. Two ways out show in the logged KL terms after the warm-up:

- ``kl_real_above_m``: KL(real) stays above m. E's hinge [m - KL(.)]^+ then compares fakes
  with a margin that real images do not meet; Appendix D: m should be a little larger than
  the training KL of the VAE (raise loss.margin, or use loss.margin: auto).
- ``fakes_escaped``: KL(x_p) as G sees it stays far above m while E's hinge is inactive
  (KL(x_p) as E sees it >= m, so E gets no adversarial gradient from samples): G no longer
  competes with E. Appendix D: "m should be selected according to the value of beta because
  larger beta needs larger m to balance the adversarial training", and alpha "is better to be
  0.1 ~ 0.5".

A condition must hold for ``window_steps`` consecutive adversarial steps before it is reported,
and each kind is reported at most once every ``repeat_steps`` steps, so a log stays readable.
The thresholds are in docs/TRAINING.md with the runs they were measured on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: KL(x_p) as G sees it above this multiple of m counts as "far above".
FAR_ABOVE_FACTOR = 2.0
WINDOW_STEPS = 200
REPEAT_STEPS = 2000


@dataclass
class TrainingHealth:
    window_steps: int = WINDOW_STEPS
    repeat_steps: int = REPEAT_STEPS
    far_above_factor: float = FAR_ABOVE_FACTOR
    #: Consecutive steps each condition has held.
    _streak: dict[str, int] = field(default_factory=dict)
    #: The step each condition was last reported at.
    _reported: dict[str, int] = field(default_factory=dict)

    def check(self, step: int, record: dict[str, float | int | str], margin: float) -> list[str]:
        """The warnings due at ``step`` for its (rank-reduced) record; empty in the warm-up."""
        if record.get("phase") != "adversarial":
            self._streak.clear()
            return []
        held = {
            "kl_real_above_m": float(record["kl_real"]) > margin,
            "fakes_escaped": (float(record["kl_fake_g"]) > self.far_above_factor * margin
                              and float(record["kl_fake_e"]) >= margin),
        }
        warnings = []
        for kind, now in held.items():
            self._streak[kind] = self._streak.get(kind, 0) + 1 if now else 0
            last = self._reported.get(kind)
            if self._streak[kind] >= self.window_steps and (last is None or step - last >= self.repeat_steps):
                self._reported[kind] = step
                warnings.append(self._message(kind, step, record, margin))
        return warnings

    def _message(self, kind: str, step: int, record: dict[str, float | int | str], m: float) -> str:
        n = self.window_steps
        if kind == "kl_real_above_m":
            return (f"warning: step {step}: KL(real) {float(record['kl_real']):.1f} has been above m = {m:g} for {n} "
                    "steps: the margin is below what real images reach, outside Theorem 1's regime. Appendix D: m a "
                    "little larger than the VAE's training KL (raise loss.margin, or loss.margin: auto)")
        return (f"warning: step {step}: KL(x_p) as G sees it {float(record['kl_fake_g']):.1f} has been above "
                f"{self.far_above_factor:g} x m = {self.far_above_factor * m:g} for {n} steps while E's hinge is "
                f"inactive (KL(x_p) as E sees it {float(record['kl_fake_e']):.1f} >= m): G and E no longer compete. "
                "Appendix D: m should fit beta (a larger loss.beta needs a larger loss.margin), alpha in 0.1-0.5")
