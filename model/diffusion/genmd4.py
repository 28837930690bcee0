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


def genmd4_loss_from_logits(logits: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
                            w: torch.Tensor, t1: float, vocab_size: int | None = None) -> torch.Tensor:
    """Per-sequence estimate of the integral over [t1, 1]: (1 - t1) * sum_{masked} loss_n(t) [B]."""
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    logmu = torch.log_softmax(logits.float(), dim=-1)
    w = w.to(logmu.dtype)
    wi = w[x0]
    per_tok = (logmu.exp() * w).sum(-1) - wi - wi * logmu.gather(-1, x0[..., None]).squeeze(-1)
    per_tok = per_tok / t.to(logmu.dtype)[:, None]
    return (1.0 - t1) * (per_tok * masked.to(per_tok.dtype)).sum(dim=1)


def genmd4_reconstruction_from_logits(logits: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor,
                                      vocab_size: int | None = None) -> torch.Tensor:
    """sum over positions masked at t1 of -log mu(x_t1, t1)[n][x0^n], per sequence [B]."""
    from .md4 import token_nll_from_logits
    return (token_nll_from_logits(logits, x0, vocab_size) * masked.float()).sum(dim=1)


def reinforce_loo(loss1: torch.Tensor, loss2: torch.Tensor, log_q1: torch.Tensor, log_q2: torch.Tensor) -> torch.Tensor:
    """(L1 + L2)/2 + 1/2 stopgrad(L1 - L2) (log q1 - log q2): its gradient is unbiased for d E[L] / d w."""
    return 0.5 * (loss1 + loss2) + 0.5 * (loss1 - loss2).detach() * (log_q1 - log_q2)


def genmd4_draw(denoiser, schedule: GenMD4Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                noise_t1: torch.Tensor | None, mask_id: int, vocab_size: int, time_conditioned: bool = True):
    """One draw: (negative ELBO estimate L [B], log q of the sampled masks [B]). noise_t1=None: no reconstruction."""
    call = (lambda ids, tt: denoiser(ids, tt)) if time_conditioned else (lambda ids, tt: denoiser(ids))
    xt, masked = schedule.corrupt(x0, t, noise, mask_id)
    loss = genmd4_loss_from_logits(call(xt, t), x0, masked, t, schedule.w, schedule.t1, vocab_size)
    log_q = schedule.log_q(x0, masked, t)
    if noise_t1 is not None:
        t1 = torch.full_like(t, schedule.t1)
        xr, mr = schedule.corrupt(x0, t1, noise_t1, mask_id)
        loss = loss + genmd4_reconstruction_from_logits(call(xr, t1), x0, mr, vocab_size)
        log_q = log_q + schedule.log_q(x0, mr, t1)
    return loss, log_q


def genmd4_training_loss(denoiser, schedule: GenMD4Schedule, x0: torch.Tensor, u: torch.Tensor,
                         noises: tuple, mask_id: int, vocab_size: int, time_conditioned: bool = True):
    """Two draws per example -> (surrogate [B] to differentiate, negative ELBO estimate [B], detached).

    u [B] in [0, 1) (antithetic over the batch) gives t = t1 + (1 - t1) u. noises = (n1, n2) or
    (n1, n2, r1, r2), uniform [B, N]: the masks of the two draws at t (and at t1 for the reconstruction).
    """
    t = schedule.times(u.to(torch.float64))
    rec = noises[2:] if len(noises) == 4 else (None, None)
    L1, q1 = genmd4_draw(denoiser, schedule, x0, t, noises[0], rec[0], mask_id, vocab_size, time_conditioned)
    L2, q2 = genmd4_draw(denoiser, schedule, x0, t, noises[1], rec[1], mask_id, vocab_size, time_conditioned)
    return reinforce_loo(L1, L2, q1, q2), (0.5 * (L1 + L2)).detach()


@torch.no_grad()
def genmd4_elbo(denoiser, x0: torch.Tensor, schedule: GenMD4Schedule, mask_id: int, vocab_size: int, *,
                draws: int = 1, time_conditioned: bool = True, generator: torch.Generator | None = None):
    """Per-sequence GenMD4 negative ELBO in nats [B], averaged over K = draws (antithetic t)."""
    from .md4 import antithetic_times
    B, N = x0.shape
    gen_device = generator.device if generator is not None else torch.device("cpu")
    total = torch.zeros(B, dtype=torch.float64, device=x0.device)
    for _ in range(draws):
        v = torch.rand((), generator=generator, device=gen_device, dtype=torch.float64)
        u = antithetic_times(v, torch.arange(B, device=gen_device), B).to(x0.device)
        n, r = (torch.rand(B, N, generator=generator, device=gen_device, dtype=torch.float64).to(x0.device)
                for _ in range(2))
        loss, _ = genmd4_draw(denoiser, schedule, x0, schedule.times(u), n, r, mask_id, vocab_size,
                              time_conditioned)
        total += loss.double()
    return total / draws
