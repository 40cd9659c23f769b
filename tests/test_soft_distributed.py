"""Soft-IntroVAE's step through two DeepSpeed engines at 2 ranks (ZeRO 1-3) against the authors'
step in one process.

The worker (tests/workers/soft_check.py) runs `soft_train_step` on the engines the trainer
builds, each rank on half of the batch, and saves both networks' weights after step 1 and
step 3, with every input it used and, per phase, how many weight gradients of each network
autograd computed. Here `Authors` (tests/test_soft_introvae.py's transcription of the
authors' loop) runs on the whole batch from the same initial weights with the engines' Adam.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from conftest import deepspeed_cmd, run, tail
from introvae_dist.algorithm import StepNoise
from introvae_dist.models import Encoder, Generator
from introvae_dist.soft_losses import SoftWeights
from test_soft_introvae import Authors

RES_PX, LATENT, WIDTHS = 16, 8, (8, 16)  # the worker's networks, rebuilt from their initial weights
#: Measured at 2 ranks, every stage alike: at most 2.2e-7 (E) and 1.0e-7 (G) after steps 1 and
#: 3, the fp32 rounding of the two ranks' mean gradient through Adam (the worker's eps says
#: why it is 1e-6). One wrong term moves the weights by 4e-4 or more (tests/test_soft_introvae.py prints it).
#: `pytest -rP` prints this table.
TOL = 1e-6


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("soft_check") / "ws2.pt"
    proc = run(deepspeed_cmd(2, "tests/workers/soft_check.py", str(path)))
    assert proc.returncode == 0, tail(proc)
    loaded: dict[str, Any] = torch.load(path, weights_only=True)
    return loaded


def authors_weights(report: dict[str, Any], device: torch.device = torch.device("cpu")
                    ) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """The authors' step on the whole batch, on `device` (the worker's: tests/test_cuda.py
    compares a GPU run with the same GPU's arithmetic); weights returned on the CPU."""
    enc = Encoder(RES_PX, LATENT, WIDTHS, norm="group", checkpointing=False)
    gen = Generator(RES_PX, LATENT, WIDTHS, norm="group", checkpointing=False)
    enc.load_state_dict(report["init"]["encoder"])
    gen.load_state_dict(report["init"]["generator"])
    enc.to(device), gen.to(device)  # before the optimisers, so that their state is made there
    authors = Authors(enc, gen, SoftWeights(**report["weights"]), lr=report["lr"], betas=report["betas"],
                      eps=report["eps"], fused=report["fused_adam"])
    out = {}
    for step, (x, eps, z_prior, eps_reencoded) in enumerate(report["inputs"], start=1):
        authors.step(x.to(device), StepNoise(eps=eps, z_prior=z_prior, eps_reencoded=eps_reencoded).to(device))
        if step in (1, report["steps"]):
            out[step] = {"encoder": {k: p.detach().cpu().clone() for k, p in enc.named_parameters()},
                         "generator": {k: p.detach().cpu().clone() for k, p in gen.named_parameters()}}
    return out


def differences(report: dict[str, Any], device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """'zeroN step S NETWORK' -> the largest weight difference to the authors' step on `device`."""
    want = authors_weights(report, device)
    table = {}
    for case, got in report["cases"].items():
        for step in (1, report["steps"]):
            for net in ("encoder", "generator"):
                g, w = got["weights"][step][net], want[step][net]
                assert g.keys() == w.keys()
                table[f"{case} step {step} {net}"] = max((g[k] - w[k]).abs().max().item() for k in w)
    return table


@pytest.mark.slow
def test_two_ranks_zero_1_to_3_match_the_authors_step_after_1_and_3_steps(report: dict[str, Any]) -> None:
    assert sorted(report["cases"]) == ["zero1", "zero2", "zero3"] and report["world_size"] == 2
    table = differences(report)
    print("largest weight difference to the authors' step:",
          ", ".join(f"{k} {v:.2e}" for k, v in sorted(table.items())))
    assert all(diff <= TOL for diff in table.values()), table


@pytest.mark.slow
def test_under_zero_no_phase_computes_the_other_networks_weight_gradients(report: dict[str, Any]) -> None:
    for case, got in report["cases"].items():
        after_e, after_g, n = got["counts"]["encoder"], got["counts"]["generator"], got["params"]
        assert after_e == {"encoder": n["encoder"], "generator": 0}, case  # G's weights untouched by E's phase
        assert after_g["encoder"] == n["encoder"], case  # and E's by G's
        # one gradient per weight: autograd sums the four G forwards' shares before the hook
        assert after_g["generator"] == n["generator"], case
