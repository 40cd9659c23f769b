"""The whole training step through two DeepSpeed engines against a plain-PyTorch Algorithm 1.

The worker (tests/workers/step_check.py) runs `algorithm.train_step` on the engines the trainer
builds, under ZeRO 0-3 and both step orders, at 1 and at 2 real ranks (deepspeed launcher,
gloo), and saves both networks' weights after step 1 and step 3 with every input it used.
This file runs Algorithm 1 as the paper writes it, in one process on the whole batch with
`torch.optim.Adam`, from the same initial weights and inputs, and compares the weights: the
optimiser steps included, so anything DeepSpeed adds to the arithmetic of a step (clipping,
a different Adam, gradient scaling, a missed or doubled update) shows here, where the
gradient test (test_distributed.py) compares gradients before the step and cannot see it.
tests/test_cuda.py runs the same worker and reference at one rank on a GPU (NCCL).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from conftest import deepspeed_cmd, run, tail
from introvae_dist.models import Encoder, Generator

# The worker's networks, rebuilt here from their saved initial weights.
RES_PX, LATENT, WIDTHS = 16, 8, (8, 16)
CPU = torch.device("cpu")


def kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Eq. 9 per image, written out again (not imported) so the reference shares no loss code."""
    return -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)


def l_ae(x_r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Eq. 10 per image."""
    return 0.5 * (x_r - x).pow(2).flatten(1).sum(1)


class Reference:
    """Algorithm 1 in plain PyTorch: E, G and one `torch.optim.Adam` each (Sec. 4.1), on
    `device` (the worker's, so that a GPU run is compared with the same GPU's arithmetic)."""

    def __init__(self, report: dict[str, Any], device: torch.device = CPU) -> None:
        self.enc = Encoder(RES_PX, LATENT, WIDTHS, norm=report["norm"], checkpointing=False)
        self.gen = Generator(RES_PX, LATENT, WIDTHS, norm=report["norm"], checkpointing=False)
        self.enc.load_state_dict(report["init"]["encoder"])
        self.gen.load_state_dict(report["init"]["generator"])
        self.enc.to(device)  # before the optimisers, so their state is made there too
        self.gen.to(device)
        adam = dict(lr=report["lr"], betas=report["betas"], eps=report["eps"], fused=report["fused_adam"])
        self.opt_e = torch.optim.Adam(self.enc.parameters(), **adam)
        self.opt_g = torch.optim.Adam(self.gen.parameters(), **adam)
        w = report["weights"]
        self.alpha, self.beta, self.m = w["alpha"], w["beta"], w["margin"]
        self.clip = report["grad_clip_norm"]

    def _update(self, opt: torch.optim.Optimizer, net: torch.nn.Module, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), self.clip)
        opt.step()

    def algorithm1(self, x: torch.Tensor, eps: torch.Tensor, z_p: torch.Tensor) -> None:
        """Lines 3-13: E's update with Eq. 11, then G's with Eq. 12 through the updated E."""
        mu, logvar = self.enc(x)
        z = mu + (0.5 * logvar).exp() * eps
        x_r, x_p = self.gen(z), self.gen(z_p)
        hinge = F.relu(self.m - kl(*self.enc(x_r.detach()))) + F.relu(self.m - kl(*self.enc(x_p.detach())))
        loss_e = (kl(mu, logvar) + self.alpha * hinge + self.beta * l_ae(x_r, x)).mean()
        self._update(self.opt_e, self.enc, loss_e)
        self.enc.requires_grad_(False)
        x_r, x_p = self.gen(z.detach()), self.gen(z_p)
        loss_g = (self.alpha * (kl(*self.enc(x_r)) + kl(*self.enc(x_p))) + self.beta * l_ae(x_r, x)).mean()
        self._update(self.opt_g, self.gen, loss_g)
        self.enc.requires_grad_(True)

    def shared_encoder(self, x: torch.Tensor, eps: torch.Tensor, z_p: torch.Tensor) -> None:
        """The fast path (train.step_order=shared_encoder): G's gradient is taken through E as
        it was before E's update; otherwise Algorithm 1."""
        mu, logvar = self.enc(x)
        z = mu + (0.5 * logvar).exp() * eps
        x_r, x_p = self.gen(z), self.gen(z_p)
        kl_rec, kl_fake = kl(*self.enc(x_r.detach())), kl(*self.enc(x_p.detach()))
        hinge = F.relu(self.m - kl_rec) + F.relu(self.m - kl_fake)
        loss_e = (kl(mu, logvar) + self.alpha * hinge + self.beta * l_ae(x_r, x)).mean()
        e_grads = torch.autograd.grad(loss_e, list(self.enc.parameters()), retain_graph=True)
        self.enc.requires_grad_(False)
        loss_g = (self.alpha * (kl(*self.enc(x_r)) + kl(*self.enc(x_p))) + self.beta * l_ae(x_r, x)).mean()
        self._update(self.opt_g, self.gen, loss_g)
        self.enc.requires_grad_(True)
        self.opt_e.zero_grad(set_to_none=True)
        for p, g in zip(self.enc.parameters(), e_grads):
            p.grad = g
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.enc.parameters(), self.clip)
        self.opt_e.step()

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """On the CPU, where the worker's gathered weights are (`engine.full_fp32_params`)."""
        return {"encoder": {k: p.detach().cpu().clone() for k, p in self.enc.named_parameters()},
                "generator": {k: p.detach().cpu().clone() for k, p in self.gen.named_parameters()}}


def reference_weights(report: dict[str, Any], order: str,
                      device: torch.device = CPU) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    ref = Reference(report, device)
    step_fn: Callable[..., None] = getattr(ref, order)
    out = {}
    for step, (x, eps, z_p) in enumerate(report["inputs"], start=1):
        step_fn(x.to(device), eps.to(device), z_p.to(device))
        if step in (1, report["steps"]):
            out[step] = ref.weights()
    return out


def max_abs_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert got.keys() == want.keys()
    return max(((got[k] - want[k]).abs().max().item(), k) for k in want)


#: Each worker run: ranks and arguments. At one rank with BatchNorm and NCHW the engines must do
#: exactly Algorithm 1's arithmetic; at two ranks GroupNorm keeps the forward independent of the
#: split, and only the order of the cross-rank gradient sum differs.
RUNS = {
    "ws1": (1, ["--norm", "batch"]),
    "ws2": (2, ["--norm", "group"]),
    "ws1_clip": (1, ["--norm", "batch", "--grad-clip-norm", "1.0"]),
}
#: Largest weight difference allowed at two ranks: measured up to 1.2e-7 after 3 steps (fp32
#: rounding of (a + b) / 2 against the mean over the whole batch, passed through Adam); 1e-6 is
#: lr / 200. Gradient clipping at 1.0, the defect this test was written for, moves the weights
#: by 2.7e-6 to 7.5e-5 after step 1 and by 2.6e-4 after step 3 (measured with this worker).
ROUNDING_TOL = 1e-6


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, (ranks, args) in RUNS.items():
        path = tmp_path_factory.mktemp("step_check") / f"{name}.pt"
        proc = run(deepspeed_cmd(ranks, "tests/workers/step_check.py", *args, str(path)))
        assert proc.returncode == 0, tail(proc)
        out[name] = torch.load(path, weights_only=True)
    return out


def differences(report: dict[str, Any], device: torch.device = CPU) -> dict[str, float]:
    """'CASE step N NETWORK' -> the largest absolute weight difference to the reference run on
    `device`."""
    table: dict[str, float] = {}
    for case, got in report["cases"].items():
        want = reference_weights(report, case.split("_", 1)[1], device)
        for step in want:
            for net in ("encoder", "generator"):
                diff, _name = max_abs_diff(got[step][net], want[step][net])
                table[f"{case} step {step} {net}"] = diff
    return table


EXPECTED_CASES = sorted(f"zero{s}_{o}" for s in (0, 1, 2, 3) for o in ("algorithm1", "shared_encoder"))


@pytest.mark.slow
def test_one_rank_every_zero_stage_is_algorithm1_bit_for_bit(reports: dict[str, dict[str, Any]]) -> None:
    report = reports["ws1"]
    assert sorted(report["cases"]) == EXPECTED_CASES
    table = differences(report)
    assert all(diff == 0.0 for diff in table.values()), table


@pytest.mark.slow
def test_two_ranks_every_zero_stage_matches_algorithm1_up_to_rounding(reports: dict[str, dict[str, Any]]) -> None:
    report = reports["ws2"]
    assert report["world_size"] == 2 and sorted(report["cases"]) == EXPECTED_CASES
    table = differences(report)
    assert max(table.values()) < ROUNDING_TOL, table


@pytest.mark.slow
def test_grad_clip_norm_clips_as_torch_does_and_the_comparison_sees_it(reports: dict[str, dict[str, Any]]) -> None:
    clipped = reports["ws1_clip"]
    assert clipped["grad_clip_norm"] == 1.0
    table = differences(clipped)
    assert max(table.values()) < ROUNDING_TOL, table  # DeepSpeed's clip formula differs from torch's by rounding
    # The same engines against the reference without clipping: what a hidden clip looks like.
    unclipped_reference = dict(clipped, grad_clip_norm=0.0)
    table = differences(unclipped_reference)
    assert min(v for k, v in table.items() if "step 3" in k) > 100 * ROUNDING_TOL, table
