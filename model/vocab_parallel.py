"""The tensor-parallel `VocabShard`: the reductions of model/diffusion/vocab.py over a process group.

The masked-diffusion math (model/diffusion/) takes a shard and never touches torch.distributed; this is
the one place that turns its three reductions into collectives. The autograd rules are Megatron's
(reduce-from / copy-to tensor-model-parallel region) and are written out here because megatron-core's
own versions reduce over its global TP group only, while tests and evaluation pass any group.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from model.diffusion.vocab import LOCAL, VocabShard


class _SumAcrossRanks(torch.autograd.Function):
    """all_reduce(SUM); backward: the identity (what follows is computed identically on every rank)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _UseOnEveryRank(torch.autograd.Function):
    """The identity; backward: the gradient summed over ranks (each rank holds only its columns' part)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class TensorParallelVocab(VocabShard):
    """Rank `rank` of `group` holds the `rank`-th equal slice of the (padded) logit columns."""

    def __init__(self, group, rank: int):
        self.group, self.rank = group, rank

    def sum(self, x):
        return _SumAcrossRanks.apply(x, self.group)

    def max(self, x):
        x = x.detach().clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def replicated(self, x):
        return _UseOnEveryRank.apply(x, self.group)


def from_parallel_state() -> VocabShard:
    """The shard of megatron's tensor-parallel group when it is up with TP > 1, else LOCAL."""
    from megatron.core import parallel_state as ps
    if not ps.model_parallel_is_initialized() or ps.get_tensor_model_parallel_world_size() == 1:
        return LOCAL
    return TensorParallelVocab(ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank())
