"""Prime: partial masking through sub-tokens (Chao et al. 2025).

A token x in {0..V-1} is written as l base-b digits, b = ceil(V^(1/l)) (the smallest b with b^l >= V),
most significant first: y^j = floor(x / b^(l-1-j)) mod b. The sub-token mask id is b. Every digit is
masked independently with the token schedule alpha(t), so the forward process is MD4 on N*l sub-tokens.

The network sees N positions (sub-embeddings concatenated) and outputs logits over the V real tokens.
`carry_over_filter` turns them into p_theta(x | y_t): tokens whose digits disagree with a revealed digit
get probability 0. The VALID bound is MD4's on sub-tokens, with the digit marginals
    P_theta(y^{n,j} = v | y_t) = sum_{x : digit_j(x) = v} p_theta(x | y_t)
as the sub-token denoiser. Weighting the JOINT token log-prob instead is not a bound
(tests/test_diffusion_prime.py shows it undercounting the entropy of a known distribution).

Vocab-parallel logits: the logits may hold one slice of the columns (model/diffusion/vocab.py); the
filter's log-normaliser and the digit marginals reduce over the `shard` they are given (LOCAL: all
columns here). Padding columns (id >= vocab_size) are excluded.
"""
from __future__ import annotations

import torch
from torch import nn

from .md4 import reconstruction_nats
from .schedules import Schedule
from .vocab import LOCAL, VocabShard, finite_or_zero, log_softmax


def prime_base(vocab_size: int, l: int) -> int:
    """b = ceil(V^(1/l)), computed in integers."""
    b = max(2, round(vocab_size ** (1.0 / l)))
    while b ** l < vocab_size:
        b += 1
    while b > 2 and (b - 1) ** l >= vocab_size:
        b -= 1
    return b


def token_digits(x: torch.Tensor, b: int, l: int) -> torch.Tensor:
    """Encode ids x [...] -> digits [..., l], most significant first."""
    powers = b ** torch.arange(l - 1, -1, -1, device=x.device)
    return torch.div(x.long()[..., None], powers, rounding_mode="floor") % b


def digits_to_tokens(y: torch.Tensor, b: int) -> torch.Tensor:
    """Decode digits [..., l] -> ids [...] (no digit may be the mask id)."""
    l = y.shape[-1]
    powers = b ** torch.arange(l - 1, -1, -1, device=y.device)
    return (y.long() * powers).sum(-1)


def corrupt_subtokens(y0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: Schedule,
                      b: int, maskable: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each digit independently with probability 1 - alpha(t). y0, noise: [B, N, l]; t: [B].
    maskable [B, N] (None = all): the digits of the other positions are never masked (md4.corrupt)."""
    alpha = schedule.alpha(t.to(torch.float64))[:, None, None]
    masked = noise.to(torch.float64) >= alpha
    if maskable is not None:
        masked = masked & maskable.to(masked.device)[..., None]
    return torch.where(masked, torch.full_like(y0, b), y0), masked


class SubTokenEmbedding(nn.Module):
    """One shared (b + 1) x (D / l) table; the l sub-embeddings of a position are concatenated to D."""

    def __init__(self, b: int, l: int, hidden_size: int, init_std: float = 0.02):
        super().__init__()
        if hidden_size % l:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by l={l}")
        self.b, self.l = b, l
        self.table = nn.Embedding(b + 1, hidden_size // l)
        nn.init.normal_(self.table.weight, std=init_std)

    def forward(self, y: torch.Tensor) -> torch.Tensor:      # [B, N, l] -> [B, N, D]
        e = self.table(y)                                     # [B, N, l, D/l]
        return e.flatten(-2)


def carry_over_filter(logits: torch.Tensor, y_t: torch.Tensor, b: int, vocab_size: int,
                      shard: VocabShard = LOCAL) -> torch.Tensor:
    """log p_theta(x | y_t) over this rank's columns: logits [B, N, V_local], y_t [B, N, l] -> [B, N, V_local].

    Tokens that disagree with any revealed digit, and padding ids >= vocab_size, get -inf; the softmax
    normaliser is reduced over the shards.
    """
    shard.check_width(logits, vocab_size)
    l = y_t.shape[-1]
    ids = shard.ids(logits)
    digits = token_digits(ids, b, l)                                          # [V_local, l]
    ok = (ids < vocab_size).expand(*logits.shape[:-1], -1).clone()
    for j in range(l):
        yj = y_t[..., j, None]
        ok &= (yj == b) | (yj == digits[:, j])
    return log_softmax(logits.float().masked_fill(~ok, float("-inf")), shard)


def digit_log_marginals(log_p: torch.Tensor, b: int, l: int, shard: VocabShard = LOCAL) -> torch.Tensor:
    """log P(y^j = v | y_t) = logsumexp_{x: digit_j(x) = v} log p(x | y_t): [B, N, V_local] -> [B, N, l, b].

    Each shard reduces its own columns per digit value, then max / sum-exp are reduced over the shards.
    """
    ids = shard.ids(log_p)
    digits = token_digits(ids, b, l)                                          # [V_local, l]
    out = []
    for j in range(l):
        index = digits[:, j].expand_as(log_p)
        m = torch.full((*log_p.shape[:-1], b), float("-inf"), device=log_p.device, dtype=log_p.dtype)
        m = m.scatter_reduce(-1, index, log_p.detach(), reduce="amax", include_self=True)
        m = finite_or_zero(shard.max(m))
        s = torch.zeros_like(m).scatter_add(-1, index, torch.exp(log_p - m.gather(-1, index)))
        s = shard.sum(s)
        empty = s <= 0                                   # digit values no token has: log 0 without a NaN gradient
        out.append(torch.where(empty, float("-inf"), m + torch.log(torch.where(empty, 1.0, s))))
    return torch.stack(out, dim=-2)


def digit_nll(logits: torch.Tensor, y_t: torch.Tensor, y0: torch.Tensor, b: int, vocab_size: int,
              shard: VocabShard = LOCAL) -> torch.Tensor:
    """-log P_theta(y^{n,j} = y0^{n,j} | y_t) for every digit: [B, N, l] (float32)."""
    l = y_t.shape[-1]
    log_p = carry_over_filter(logits, y_t, b, vocab_size, shard)
    marg = digit_log_marginals(log_p, b, l, shard)              # [B, N, l, b]
    return -marg.gather(-1, y0.long()[..., None]).squeeze(-1)


def prime_reconstruction_nats(num_tokens, l: int, b: int, schedule: Schedule):
    """MD4's reconstruction term for N * l sub-tokens of b values (num_tokens: int or [B])."""
    return reconstruction_nats(num_tokens * l, b, schedule)


def prime_loss_from_digit_nll(digit_nll_: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
                              schedule: Schedule, b: int, maskable: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sequence VALID Prime negative ELBO (nats): w(t) * sum over masked digits of digit NLL + recon
    (over the digits of the maskable positions: all by default)."""
    from .md4 import num_maskable
    w = schedule.weight(t.to(torch.float64)).to(torch.float32)
    masked_sum = (digit_nll_.float() * masked.float()).flatten(1).sum(dim=1)
    l = digit_nll_.shape[2]
    return w * masked_sum + prime_reconstruction_nats(num_maskable(digit_nll_[..., 0], maskable), l, b, schedule)
