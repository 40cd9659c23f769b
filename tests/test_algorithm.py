"""`algorithm.train_step` on plain-PyTorch engines against Algorithm 1 as the paper writes it.

The reference below is written from Algorithm 1 and Eq. 9-12 (../shared/paper/NOTES.md has
them cleaned up), sharing no code with introvae_dist.losses or introvae_dist.algorithm. It
follows the conventions losses.py documents: per-image KL summed over latent dimensions and
L_AE over pixels (with Eq. 10's factor, `l_ae_factor`), the hinge [m - L_REG]^+ per image, and
every loss averaged over the batch where Eq. 9-10 sum. One process, no DeepSpeed, tiny
networks: milliseconds per step. tests/test_step_equivalence.py compares the DeepSpeed engines
with the same step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from introvae_dist import plain_engine
from introvae_dist.algorithm import StepNoise, train_step
from introvae_dist.losses import LossWeights
from introvae_dist.models import Encoder, Generator
from introvae_dist.plain_engine import PlainEngine

RES_PX, LATENT, WIDTHS, BATCH, STEPS = 16, 4, (8, 16), 4, 3
LR = 2e-4  # Sec. 4.1, PlainEngine's default
#: A margin among the initial KLs of x_r and x_p (0.16 to 1.0 here), so that both sides of the
#: hinge occur; the reference checks that they do.
WEIGHTS = LossWeights(alpha=0.25, beta=0.5, margin=0.5)
#: fp32. Measured: identical bits after 1 and 3 steps in every case here. The step reaches E's
#: L_AE gradient through dL/dz where the reference runs one backward, so another CPU or torch
#: may sum in another order; this allows that, while one wrong term moves weights by about lr
#: (2e-4) at once and a margin of 0.6 for 0.5 by 4e-5 after 3 steps (measured).
TOL = dict(rtol=1e-5, atol=1e-8)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Networks this small gain nothing from threads, and on a loaded machine every op of a
    multi-threaded step waits for its slowest thread (measured: 0.15 s per test on one thread,
    2-10 s on two while other jobs ran)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """L_REG of Eq. 9 per image (with the minus sign the print lost)."""
    return -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)


def l_ae(x_r: torch.Tensor, x: torch.Tensor, factor: float) -> torch.Tensor:
    """L_AE of Eq. 10 per image."""
    return factor * ((x_r - x) ** 2).sum((1, 2, 3))


def hinge(kl_s: torch.Tensor, m: float) -> torch.Tensor:
    """[m - L_REG]^+ per image."""
    return torch.clamp(m - kl_s, min=0)


class Paper:
    """Algorithm 1 (and Appendix C's shared-encoder order) with one Adam per network."""

    def __init__(self, enc: nn.Module, gen: nn.Module, w: LossWeights) -> None:
        self.enc, self.gen, self.w = enc, gen, w
        self.opt_e = torch.optim.Adam(enc.parameters(), lr=LR, betas=(0.9, 0.999))
        self.opt_g = torch.optim.Adam(gen.parameters(), lr=LR, betas=(0.9, 0.999))
        self.hinge_sides: set[bool] = set()  # True: an image inside the margin

    def _apply(self, opt: torch.optim.Optimizer, params: list[nn.Parameter], grads: tuple[torch.Tensor, ...]) -> None:
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)

    def _decode(self, x: torch.Tensor, eps: torch.Tensor, z_p: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Lines 3-6: Z <- Enc(X), X_r <- Dec(Z), X_p <- Dec(Z_p), L_AE(X_r, X)."""
        mu, logvar = self.enc(x)
        z = mu + torch.exp(logvar / 2) * eps
        x_r, x_p = self.gen(z), self.gen(z_p)
        return mu, logvar, x_r, x_p, l_ae(x_r, x, self.w.l_ae_factor)

    def _loss_e(self, mu: torch.Tensor, logvar: torch.Tensor, kl_r: torch.Tensor, kl_pp: torch.Tensor,
                loss_ae: torch.Tensor) -> torch.Tensor:
        """Eq. 11: L_REG(Z) + alpha ([m - L_REG(Z_r)]^+ + [m - L_REG(Z_pp)]^+) + beta L_AE."""
        w = self.w
        self.hinge_sides |= {bool(v) for v in torch.cat([kl_r, kl_pp]) < w.margin}
        return (kl(mu, logvar) + w.alpha * (hinge(kl_r, w.margin) + hinge(kl_pp, w.margin)) + w.beta * loss_ae).mean()

    def _loss_g(self, kl_r: torch.Tensor, kl_pp: torch.Tensor, loss_ae: torch.Tensor) -> torch.Tensor:
        """Eq. 12: alpha (L_REG(Z_r) + L_REG(Z_pp)) + beta L_AE."""
        return (self.w.alpha * (kl_r + kl_pp) + self.w.beta * loss_ae).mean()

    def algorithm1(self, x: torch.Tensor, eps: torch.Tensor, z_p: torch.Tensor) -> None:
        e_params, g_params = list(self.enc.parameters()), list(self.gen.parameters())
        mu, logvar, x_r, x_p, loss_ae = self._decode(x, eps, z_p)
        # Lines 7-10: Z_r <- Enc(ng(X_r)), Z_pp <- Enc(ng(X_p)); E's Adam step on grad_phi_E.
        loss_e = self._loss_e(mu, logvar, kl(*self.enc(x_r.detach())), kl(*self.enc(x_p.detach())), loss_ae)
        self._apply(self.opt_e, e_params, torch.autograd.grad(loss_e, e_params, retain_graph=True))
        # Lines 11-13: Z_r <- Enc(X_r), Z_pp <- Enc(X_p) with the updated E; G's step on grad_theta_G.
        loss_g = self._loss_g(kl(*self.enc(x_r)), kl(*self.enc(x_p)), loss_ae)
        self._apply(self.opt_g, g_params, torch.autograd.grad(loss_g, g_params))

    def shared_encoder(self, x: torch.Tensor, eps: torch.Tensor, z_p: torch.Tensor) -> None:
        """Appendix C's other order: both gradients from one E, the one before E's step."""
        e_params, g_params = list(self.enc.parameters()), list(self.gen.parameters())
        mu, logvar, x_r, x_p, loss_ae = self._decode(x, eps, z_p)
        loss_e = self._loss_e(mu, logvar, kl(*self.enc(x_r.detach())), kl(*self.enc(x_p.detach())), loss_ae)
        grads_e = torch.autograd.grad(loss_e, e_params, retain_graph=True)
        loss_g = self._loss_g(kl(*self.enc(x_r)), kl(*self.enc(x_p)), loss_ae)
        grads_g = torch.autograd.grad(loss_g, g_params)
        self._apply(self.opt_e, e_params, grads_e)
        self._apply(self.opt_g, g_params, grads_g)


def networks(norm: str) -> tuple[Encoder, Generator]:
    torch.manual_seed(7)
    return (Encoder(RES_PX, LATENT, WIDTHS, norm, checkpointing=False),  # type: ignore[arg-type]
            Generator(RES_PX, LATENT, WIDTHS, norm, checkpointing=False))  # type: ignore[arg-type]


def step_inputs() -> list[tuple[torch.Tensor, StepNoise]]:
    rng = torch.Generator().manual_seed(123)
    return [(torch.rand(BATCH, 3, RES_PX, RES_PX, generator=rng), StepNoise.sample(BATCH, LATENT, rng, torch.device("cpu")))
            for _ in range(STEPS)]


def assert_same_weights(got: nn.Module, want: nn.Module, what: str) -> None:
    for (name, p), (_, q) in zip(got.named_parameters(), want.named_parameters(), strict=True):
        assert torch.allclose(p, q, **TOL), f"{what} {name}: max |diff| {(p - q).abs().max().item():.3g}"


@pytest.mark.parametrize("order", ["algorithm1", "shared_encoder"])
@pytest.mark.parametrize("norm, w", [("group", WEIGHTS), ("batch", WEIGHTS),
                                     ("group", LossWeights(0.25, 0.5, 0.5, l_ae_factor=1.0))],  # the authors' L_AE
                         ids=["group", "batch", "group-l_ae_factor-1"])
def test_train_step_is_the_papers_algorithm(order: str, norm: str, w: LossWeights) -> None:
    enc, gen = networks(norm)
    paper = Paper(copy.deepcopy(enc), copy.deepcopy(gen), w)
    paper_step: Callable[..., None] = getattr(paper, order)
    e, g = PlainEngine(enc, lr=LR), PlainEngine(gen, lr=LR)
    moved = {n: p.detach().clone() for n, p in [*enc.named_parameters(), *gen.named_parameters()]}
    for step, (x, noise) in enumerate(step_inputs(), start=1):
        train_step(e, g, x, noise, w, order=order, adopt=plain_engine.adopt_outputs)  # type: ignore[arg-type]
        paper_step(x, noise.eps, noise.z_prior)
        if step in (1, STEPS):
            assert_same_weights(enc, paper.enc, f"{order} step {step} E")
            assert_same_weights(gen, paper.gen, f"{order} step {step} G")
    assert paper.hinge_sides == {True, False}  # the margin separated some images, not all
    # Every weight moved (not a comparison of two runs that both did nothing).
    assert all(not torch.equal(moved[n], p) for n, p in [*enc.named_parameters(), *gen.named_parameters()])


class GradientCalls:
    """How often autograd computed a weight gradient of each network (a hook on every
    parameter fires whenever a backward computes that parameter's gradient)."""

    def __init__(self, **modules: nn.Module) -> None:
        self.calls = dict.fromkeys(modules, 0)
        for name, module in modules.items():
            for param in module.parameters():
                param.register_hook(self._counter(name))

    def _counter(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            self.calls[name] += 1
        return hook


@pytest.mark.parametrize("order", ["algorithm1", "shared_encoder"])
def test_each_phase_computes_only_its_own_networks_gradients(order: str) -> None:
    enc, gen = networks("batch")
    calls = GradientCalls(encoder=enc, generator=gen)
    seen: dict[str, tuple[dict[str, int], bool, bool]] = {}

    def on_gradients(phase: str) -> None:
        """Before the phase's optimiser step: the counts, and whether each network holds gradients."""
        seen[phase] = (dict(calls.calls), any(p.grad is not None for p in enc.parameters()),
                       any(p.grad is not None for p in gen.parameters()))

    x, noise = step_inputs()[0]
    train_step(PlainEngine(enc), PlainEngine(gen), x, noise, WEIGHTS, on_gradients, order,  # type: ignore[arg-type]
               adopt=plain_engine.adopt_outputs)
    (after_e, e_has, g_has), (after_g, e_has_later, g_has_later) = seen["encoder"], seen["generator"]
    assert after_e["encoder"] == len(list(enc.parameters())) and e_has
    assert after_e["generator"] == 0 and not g_has  # G untouched by the encoder phase
    assert after_g["generator"] == len(list(gen.parameters())) and g_has_later
    assert after_g["encoder"] == after_e["encoder"] and not e_has_later  # E untouched by the generator phase


def test_the_plain_hook_refuses_other_engines_and_the_hook_cannot_be_left_out() -> None:
    enc, gen = networks("group")
    x, noise = step_inputs()[0]
    with pytest.raises(TypeError, match="adopt=introvae_dist.engine.adopt_outputs"):
        plain_engine.adopt_outputs(object(), x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="adopt"):
        train_step(PlainEngine(enc), PlainEngine(gen), x, noise, WEIGHTS)  # type: ignore[call-arg]
