"""GenMD4: masked diffusion with a learnable, state-dependent schedule (Shi et al. 2024, section 6).

A token of value i is masked at time t with probability (1 - eps) t^{w_i}, i.e.
    alpha_{t,i} = 1 - (1 - eps) t^{w_i},     -alpha'_{t,i} / (1 - alpha_{t,i}) = w_i / t,
with w = softplus(raw) in R^V_+, initialised at w = 1 (MD4's linear schedule). t is sampled in [t1, 1].

Per masked position n with x0^n = i and prediction mu = softmax(logits) (a distribution over V):
    loss_n(t) = (1/t) * [ sum_j w_j mu_j - w_i - w_i log mu_i ]          (w = 1: -(1/t) log mu_i)
Negative ELBO = (1 - t1) E_{t ~ U[t1, 1]} E_{x_t}[ sum_{masked n} loss_n(t) ]  +  reconstruction at t1,
reconstruction = E_{x_t1}[ sum_{masked n} -log mu(x_t1, t1)[n][x0^n] ]. The minimiser of the expected
loss over mu is the exact posterior p(x0^n | x_t), at which the bound equals the entropy up to O(eps, t1^2).

x_t depends on w, so the gradient w.r.t. w also flows through the sampling: REINFORCE with a
leave-one-out baseline over two draws at the same t (and the same t1 for the reconstruction term):
    surrogate = (L1 + L2)/2 + 1/2 * stopgrad(L1 - L2) * (log q(x^(1) | x0) - log q(x^(2) | x0)),
    log q = sum_n [masked: log(1 - eps) + w_{x0^n} log t ; unmasked: log(1 - (1 - eps) t^{w_{x0^n}})].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .vocab import LOCAL, VocabShard, logsumexp, pick, real_columns, token_nll


class GenMD4Schedule(nn.Module):
    """Holds raw (so w is saved with the model). w = softplus(raw), one entry per token value."""

    def __init__(self, vocab_size: int, eps: float = 1e-4, t1: float = 1e-3):
        super().__init__()
        self.vocab_size, self.eps, self.t1 = vocab_size, eps, t1
        self.raw = nn.Parameter(torch.full((vocab_size,), math.log(math.e - 1.0)))   # softplus = 1

    @property
    def w(self) -> torch.Tensor:
        return F.softplus(self.raw)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_{t, v} for every value v: t [B] -> [B, V]."""
        return 1.0 - (1.0 - self.eps) * t.to(self.w.dtype)[:, None] ** self.w

    def mask_prob(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(1 - eps) t^{w_{x0^n}}: x0 [B, N], t [B] -> [B, N]."""
        return (1.0 - self.eps) * t.to(self.w.dtype)[:, None] ** self.w[x0]

    def times(self, u: torch.Tensor) -> torch.Tensor:
        """Map u in [0, 1) (e.g. antithetic) to t in [t1, 1)."""
        return self.t1 + (1.0 - self.t1) * u

    def corrupt(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, mask_id: int,
                maskable: torch.Tensor | None = None):
        """(x_t, masked [B, N]); maskable [B, N] (None = all): the other positions are never masked."""
        masked = noise.to(torch.float64) < self.mask_prob(x0, t).detach().to(torch.float64)
        if maskable is not None:
            masked = masked & maskable.to(masked.device)
        return torch.where(masked, torch.full_like(x0, mask_id), x0), masked

    def log_q(self, x0: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
              maskable: torch.Tensor | None = None) -> torch.Tensor:
        """log q(x_t | x0) per sequence [B], differentiable in w (over the maskable positions: all by default)."""
        wx = self.w[x0]
        logt = torch.log(t.to(wx.dtype))[:, None]
        lm = math.log(1.0 - self.eps) + wx * logt
        lu = torch.log1p(-(1.0 - self.eps) * torch.exp(wx * logt))
        per_pos = torch.where(masked, lm, lu)
        if maskable is not None:
            per_pos = per_pos * maskable.to(per_pos.device).to(per_pos.dtype)
        return per_pos.sum(dim=1)


def genmd4_token_terms(logits: torch.Tensor, x0: torch.Tensor, w: torch.Tensor, vocab_size: int,
                       shard: VocabShard = LOCAL) -> tuple[torch.Tensor, torch.Tensor]:
    """(-log mu_{x0^n}, sum_j w_j mu_j) per position [B, N] each, mu = softmax over the V real classes.
    logits [B, N, V_local] hold this shard's columns (model/diffusion/vocab.py); both results are replicated."""
    z = real_columns(logits, vocab_size, shard)
    lse = logsumexp(z, shard)
    nll = lse[..., 0] - pick(z, x0, shard)
    ids = shard.ids(z)
    w = shard.replicated(w.to(z.dtype))             # replicated; only this shard's columns meet it here
    w_cols = torch.where(ids < vocab_size, w[ids.clamp(max=vocab_size - 1)], torch.zeros((), dtype=z.dtype))
    mean_w = shard.sum((torch.exp(z - shard.replicated(lse)) * w_cols).sum(-1))
    return nll, mean_w


def genmd4_loss(nll: torch.Tensor, mean_w: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
                w: torch.Tensor, t1: float) -> torch.Tensor:
    """Per-sequence estimate of the integral over [t1, 1]: (1 - t1) * sum_{masked n} loss_n(t) [B], from the
    per-position terms of `genmd4_token_terms`."""
    wi = w.to(nll.dtype)[x0]
    per_tok = (mean_w - wi + wi * nll) / t.to(nll.dtype)[:, None]
    return (1.0 - t1) * (per_tok * masked.to(per_tok.dtype)).sum(dim=1)


def genmd4_loss_from_logits(logits: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
                            w: torch.Tensor, t1: float, vocab_size: int | None = None) -> torch.Tensor:
    """`genmd4_loss` straight from full logits [B, N, >= V]."""
    nll, mean_w = genmd4_token_terms(logits, x0, w, vocab_size or logits.shape[-1])
    return genmd4_loss(nll, mean_w, x0, masked, t, w, t1)


def genmd4_reconstruction_from_logits(logits: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor,
                                      vocab_size: int | None = None) -> torch.Tensor:
    """sum over positions masked at t1 of -log mu(x_t1, t1)[n][x0^n], per sequence [B]."""
    return (token_nll(logits, x0, vocab_size or logits.shape[-1]) * masked.float()).sum(dim=1)


def reinforce_loo(loss1: torch.Tensor, loss2: torch.Tensor, log_q1: torch.Tensor, log_q2: torch.Tensor) -> torch.Tensor:
    """(L1 + L2)/2 + 1/2 stopgrad(L1 - L2) (log q1 - log q2): its gradient is unbiased for d E[L] / d w."""
    return 0.5 * (loss1 + loss2) + 0.5 * (loss1 - loss2).detach() * (log_q1 - log_q2)
