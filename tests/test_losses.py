"""Eq. 9-12 as pure tensor functions."""

from __future__ import annotations

import torch
from torch.distributions import Normal, kl_divergence

from introvae_dist.losses import (
    LossWeights,
    encoder_loss,
    generator_loss,
    kl_per_image,
    reconstruction_per_image,
    reparameterize,
)


def test_kl_is_zero_at_the_prior_and_positive_elsewhere() -> None:
    assert torch.equal(kl_per_image(torch.zeros(3, 5), torch.zeros(3, 5)), torch.zeros(3))
    mu, logvar = torch.randn(4, 7), torch.randn(4, 7)
    kl = kl_per_image(mu, logvar)
    assert kl.shape == (4,) and bool((kl > 0).all())


def test_kl_matches_torch_distributions_summed_over_latent_dims() -> None:
    mu, logvar = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    expected = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(dim=1)
    torch.testing.assert_close(kl_per_image(mu, logvar).double(), expected, rtol=1e-5, atol=1e-5)


def test_reconstruction_is_half_the_per_image_sum_of_squares() -> None:
    x, x_r = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    x_r[1] = 2.0
    torch.testing.assert_close(reconstruction_per_image(x_r, x), torch.tensor([24.0, 96.0]))  # 0.5*48, 0.5*192
    torch.testing.assert_close(reconstruction_per_image(x_r, x, factor=1.0), torch.tensor([48.0, 192.0]))


def test_encoder_loss_applies_the_hinge_per_image() -> None:
    w = LossWeights(alpha=0.5, beta=2.0, margin=10.0)
    kl_real, l_ae = torch.tensor([1.0, 3.0]), torch.tensor([4.0, 6.0])
    kl_rec, kl_fake = torch.tensor([4.0, 12.0]), torch.tensor([10.0, 20.0])  # hinge: 6+0, 0+0
    expected = ((1 + 0.5 * 6 + 2 * 4) + (3 + 0 + 2 * 6)) / 2
    torch.testing.assert_close(encoder_loss(kl_real, kl_rec, kl_fake, l_ae, w), torch.tensor(expected))


def test_generator_loss_is_alpha_kl_plus_beta_l_ae() -> None:
    w = LossWeights(alpha=0.25, beta=0.5, margin=99.0)
    loss = generator_loss(torch.tensor([8.0, 4.0]), torch.tensor([4.0, 0.0]), torch.tensor([2.0, 6.0]), w)
    torch.testing.assert_close(loss, torch.tensor(((0.25 * 12 + 1) + (0.25 * 4 + 3)) / 2))


def test_reparameterize_uses_half_logvar() -> None:
    z = reparameterize(torch.tensor([[1.0]]), torch.tensor([[2.0 * torch.log(torch.tensor(3.0))]]), torch.tensor([[2.0]]))
    torch.testing.assert_close(z, torch.tensor([[7.0]]))
