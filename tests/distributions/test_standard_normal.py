"""The standard Normal prior and its closed-form KL."""

import torch
from torch.distributions import Normal, kl_divergence

from cellvi.distributions import StandardNormal


def test_standard_normal_kl_equals_the_general_formula():
    gen = torch.Generator().manual_seed(0)
    loc = torch.randn(7, 5, generator=gen, dtype=torch.float64) * 3
    scale = torch.exp(torch.randn(7, 5, generator=gen, dtype=torch.float64))
    q = Normal(loc, scale)
    fast = kl_divergence(q, StandardNormal(loc))
    ref = kl_divergence(q, Normal(torch.zeros_like(loc), torch.ones_like(loc)))
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    x = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(StandardNormal(loc).log_prob(x), Normal(0.0, 1.0).log_prob(x))
