"""MD4: forward masking and the continuous-time negative ELBO (Shi et al. 2024).

The denoiser is any callable; at scale it returns per-token negative log-likelihoods computed
vocab-parallel, so the bound here is written in terms of per-token NLL, not logits.
All losses are per sequence, in nats, so evaluation can aggregate across ranks exactly.
"""
from __future__ import annotations

import math

import torch

from .schedules import Schedule


def antithetic_times(u: torch.Tensor | float, index: torch.Tensor, total: int) -> torch.Tensor:
    """t_i = (u + i / B) mod 1 for global sample indices i of a batch of B (VDM-style)."""
    return torch.remainder(u + index.to(torch.float64) / total, 1.0)


def corrupt(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: Schedule,
            mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each token independently with probability 1 - alpha(t).

    x0: [B, N] ids; t: [B]; noise: [B, N] uniform in [0, 1). Returns (x_t, masked bool [B, N]).
    """
    alpha = schedule.alpha(t.to(torch.float64))[:, None]
    masked = noise.to(torch.float64) >= alpha          # P(masked) = 1 - alpha(t)
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    return xt, masked


def reconstruction_nats(num_tokens: int, vocab_size: int, schedule: Schedule) -> float:
    """MD4's reconstruction term at t=0 (N * eps * log V, tiny); the prior term is 0."""
    return num_tokens * schedule.eps * math.log(vocab_size)


def continuous_loss_from_nll(token_nll: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
                             schedule: Schedule, vocab_size: int) -> torch.Tensor:
    """Per-sequence MD4 negative ELBO estimate in nats.

    token_nll[b, n] = -log mu_theta(x_t, t)[n][x0^n] (any value at unmasked positions).
    L_b = w(t_b) * sum_{n masked} token_nll[b, n] + reconstruction.
    """
    w = schedule.weight(t.to(torch.float64)).to(torch.float32)
    masked_sum = (token_nll.float() * masked.float()).sum(dim=1)
    return w * masked_sum + reconstruction_nats(token_nll.shape[1], vocab_size, schedule)


def bits_per_token(nats_per_sequence: torch.Tensor | float, num_tokens: int) -> float:
    return float(nats_per_sequence) / (num_tokens * math.log(2.0))
