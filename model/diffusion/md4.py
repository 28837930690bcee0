"""MD4: forward masking and the continuous-time negative ELBO (Shi et al. 2024).

The denoiser is any callable; at scale it returns per-token negative log-likelihoods computed
vocab-parallel, so the bound here is written in terms of per-token NLL, not logits.
All losses are per sequence, in nats, so evaluation can aggregate across ranks exactly.
"""
from __future__ import annotations

import math

import torch

from .schedules import Schedule
from .vocab import token_nll


def antithetic_times(u: torch.Tensor | float, index: torch.Tensor, total: int) -> torch.Tensor:
    """t_i = (u + i / B) mod 1 for global sample indices i of a batch of B (VDM-style)."""
    return torch.remainder(u + index.to(torch.float64) / total, 1.0)


def corrupt(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: Schedule,
            mask_id: int, maskable: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each token independently with probability 1 - alpha(t).

    x0: [B, N] ids; t: [B]; noise: [B, N] uniform in [0, 1). Returns (x_t, masked bool [B, N]).
    maskable [B, N] bool (None = every position): only these positions are ever masked; the others are
    given. The bound over the maskable positions is then one on -log p(x0[maskable] | x0[~maskable]),
    the conditional likelihood of a continuation given its context (LLaDA's estimator).
    """
    alpha = schedule.alpha(t.to(torch.float64))[:, None]
    masked = noise.to(torch.float64) >= alpha          # P(masked) = 1 - alpha(t)
    if maskable is not None:
        masked = masked & maskable.to(masked.device)
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    return xt, masked


def reconstruction_nats(num_tokens, vocab_size: int, schedule: Schedule):
    """MD4's reconstruction term at t=0 (N * eps * log V, tiny); the prior term is 0. num_tokens: the
    number of maskable tokens (an int, or a [B] tensor when they differ per sequence)."""
    return num_tokens * schedule.eps * math.log(vocab_size)


def num_maskable(token_nll: torch.Tensor, maskable: torch.Tensor | None):
    """N (every position maskable) or the per-sequence count of maskable positions [B] (float32)."""
    if maskable is None:
        return token_nll.shape[1]
    return maskable.to(token_nll.device).float().sum(dim=1)


def continuous_loss_from_nll(token_nll: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
                             schedule: Schedule, vocab_size: int,
                             maskable: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence MD4 negative ELBO estimate in nats.

    token_nll[b, n] = -log mu_theta(x_t, t)[n][x0^n] (any value at unmasked positions).
    L_b = w(t_b) * sum_{n masked} token_nll[b, n] + reconstruction (over the maskable positions: all by
    default; see `corrupt`).
    """
    w = schedule.weight(t.to(torch.float64)).to(torch.float32)
    masked_sum = (token_nll.float() * masked.float()).sum(dim=1)
    return w * masked_sum + reconstruction_nats(num_maskable(token_nll, maskable), vocab_size, schedule)


def bits_per_token(nats_per_sequence: torch.Tensor | float, num_tokens: int) -> float:
    return float(nats_per_sequence) / (num_tokens * math.log(2.0))


# ---------------------------------------------------------------------------------------------
# Logits-based pieces and the discrete-time bound (the ELBO loop itself: model.objectives.heldout_nelbo)
# ---------------------------------------------------------------------------------------------

def token_nll_from_logits(logits: torch.Tensor, x0: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """-log softmax(logits)[x0] per token, float32 [B, N]. Columns >= vocab_size (padding) are dropped."""
    return token_nll(logits, x0, vocab_size or logits.shape[-1])


def discrete_steps(t: torch.Tensor, steps: int) -> torch.Tensor:
    """Map t in [0, 1) to a step index i in {1..T}: uniform t gives uniform i (antithetic t stays antithetic)."""
    return (torch.floor(t.to(torch.float64) * steps).long() + 1).clamp(1, steps)


def discrete_loss_from_nll(token_nll: torch.Tensor, masked: torch.Tensor, i: torch.Tensor, steps: int,
                           schedule: Schedule, vocab_size: int,
                           maskable: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence discrete-time (T = steps) negative ELBO estimate in nats.

    x_t must be drawn at t = i / T. With s = (i - 1) / T:
    L_b = T * (alpha_s - alpha_t) / (1 - alpha_t) * sum_{n masked} token_nll[b, n] + reconstruction.
    (alpha_s - alpha_t)/(1 - alpha_t) * -log mu[x0] is exactly the KL of one masked position's reverse step.
    """
    t = i.to(torch.float64) / steps
    s = (i.to(torch.float64) - 1.0) / steps
    a_t, a_s = schedule.alpha(t), schedule.alpha(s)
    coef = (steps * (a_s - a_t) / (1.0 - a_t)).to(torch.float32)
    masked_sum = (token_nll.float() * masked.float()).sum(dim=1)
    return coef * masked_sum + reconstruction_nats(num_maskable(token_nll, maskable), vocab_size, schedule)


def perplexity(nats_per_sequence: torch.Tensor | float, num_tokens: int) -> float:
    """exp(L / N): an upper bound on perplexity when L is a negative ELBO."""
    return math.exp(float(nats_per_sequence) / num_tokens)
