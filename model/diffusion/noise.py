"""The one source of the randomness a masked-diffusion loss consumes: per row a time variable u in [0, 1)
(the objective maps it to its t) and S streams of [N] uniforms (the masks; model/objectives.py says which
objective reads how many). Both are pure functions of their keys, never of the batch layout:

- training: `step_noise` is keyed by (seed, optimizer step, global sample index), so a step's loss is the
  same function of its data at any data-parallel size, micro-batch split or pipeline layout, and a resumed
  run draws what the uninterrupted one drew;
- held-out bound: `row_noise` is keyed by (seed, the row's content, draw), so a row's bound does not depend
  on batch order, batch size or layout (training-time evaluation, launcher/evaluate.py and the tests).

Both return (u [B] float64, noise [B, S, N] float64).
"""
from __future__ import annotations

import hashlib

import torch

from .md4 import antithetic_times


def _mix(*parts: int) -> int:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(int(p).to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def _uniform(key: int, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(key), dtype=torch.float64)


def step_noise(seed: int, step: int, sample_ids: list[int], global_batch: int, seq_len: int,
               antithetic: bool = True, streams: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise of the given global sample indices of one optimizer step. antithetic: t_i = (u + i/B) mod 1
    with one u per step (VDM); else an independent u per sample."""
    if antithetic:
        u = antithetic_times(_uniform(_mix(seed, step, -1)), torch.tensor(sample_ids), global_batch)
    else:
        u = torch.stack([_uniform(_mix(seed, step, i, -2)) for i in sample_ids])
    noise = torch.stack([torch.stack([_uniform(_mix(seed, step, i) if k == 0 else _mix(seed, step, i, k), seq_len)
                                      for k in range(streams)]) for i in sample_ids])
    return u, noise


def row_noise(rows: torch.Tensor, draw: int, num_draws: int, seed: int, streams: int = 1):
    """The noise of draw `draw` of `num_draws` for each row [B, N]: the K draws of a row use antithetic
    (u + k/K) mod 1."""
    us, noises = [], []
    for row in rows:
        digest = hashlib.blake2b(row.cpu().numpy().tobytes(), digest_size=8, key=seed.to_bytes(8, "little")).digest()
        base = int.from_bytes(digest, "little") & ((1 << 62) - 1)
        us.append(torch.remainder(_uniform(base) + draw / num_draws, 1.0))
        noises.append(_uniform(base + 1 + draw, streams, row.numel()))
    return torch.stack(us), torch.stack(noises)
