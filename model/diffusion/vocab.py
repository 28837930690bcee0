"""Where the logit columns live, and the reductions over them: the only parallel notion the math needs.

Every loss in this package reads logits [..., V_local] holding the columns [start, start + V_local) of
the vocabulary. On one process that is every column and each reduction is the identity (`LOCAL`, the
default everywhere). Under tensor parallelism model/vocab_parallel.py passes a shard whose reductions
run over the tensor-parallel group; no module of this package runs a collective itself.

The three reductions follow Megatron's vocab-parallel cross entropy:
- `sum(x)`: the sum over shards, whose backward is the identity: what follows is computed identically
  on every shard (a replicated result).
- `max(x)`: the max over shards, a stabiliser only (no gradient).
- `replicated(x)`: the identity, whose backward sums the gradient over shards: marks a replicated
  tensor (a normaliser, GenMD4's w) that meets shard-local columns.
"""
from __future__ import annotations

import torch


class VocabShard:
    """All columns on this process (rank 0 of 1): every reduction is the identity."""

    rank = 0

    def start(self, local_width: int) -> int:
        """The first column this process holds, for logits `local_width` columns wide."""
        return self.rank * local_width

    def ids(self, logits: torch.Tensor) -> torch.Tensor:
        """The vocabulary ids of this process's columns [V_local]."""
        start = self.start(logits.shape[-1])
        return torch.arange(start, start + logits.shape[-1], device=logits.device)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def max(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach()

    def replicated(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def check_width(self, logits: torch.Tensor, vocab_size: int) -> None:
        """Refuse vocab-parallel logits given without their shard (a silently partial softmax)."""
        if self.rank == 0 and type(self) is VocabShard and logits.shape[-1] < vocab_size:
            raise ValueError(f"logits hold {logits.shape[-1]} columns but the vocabulary has {vocab_size}: "
                             "vocab-parallel logits need the tensor-parallel shard "
                             "(model.vocab_parallel.from_parallel_state())")


LOCAL = VocabShard()


def finite_or_zero(m: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def logsumexp(z: torch.Tensor, shard: VocabShard = LOCAL) -> torch.Tensor:
    """log sum_j exp z_j over every shard's columns (-inf entries allowed): [..., V_local] -> [..., 1],
    replicated on every shard."""
    m = finite_or_zero(shard.max(z.amax(dim=-1, keepdim=True)))
    return m + torch.log(shard.sum(torch.exp(z - m).sum(dim=-1, keepdim=True)))


def log_softmax(z: torch.Tensor, shard: VocabShard = LOCAL) -> torch.Tensor:
    """log softmax over every shard's columns, for this shard's columns [..., V_local]."""
    return z - shard.replicated(logsumexp(z, shard))


def real_columns(logits: torch.Tensor, vocab_size: int, shard: VocabShard = LOCAL) -> torch.Tensor:
    """float32 logits with padding columns (ids >= vocab_size) at -inf."""
    shard.check_width(logits, vocab_size)
    return logits.float().masked_fill(~(shard.ids(logits) < vocab_size), float("-inf"))


def pick(values: torch.Tensor, labels: torch.Tensor, shard: VocabShard = LOCAL) -> torch.Tensor:
    """values[..., labels] where each label's column lives on one shard: [..., V_local], [...] -> [...],
    replicated."""
    start, width = shard.start(values.shape[-1]), values.shape[-1]
    here = (labels >= start) & (labels < start + width)
    idx = (labels.long() - start).clamp(0, width - 1)
    local = values.gather(-1, idx[..., None]).squeeze(-1)
    return shard.sum(torch.where(here, local, torch.zeros_like(local)))


def token_nll(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
              shard: VocabShard = LOCAL) -> torch.Tensor:
    """-log softmax(logits over the V real classes)[label], float32 [...], replicated."""
    z = real_columns(logits, vocab_size, shard)
    return logsumexp(z, shard)[..., 0] - pick(z, labels, shard)
