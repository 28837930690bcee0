"""Sampler cache benchmark: network calls and tokens/s with and without the cache, side by side.

MD4 ancestral sampling, T = 1000 steps, 1024 tokens, a small (random-weight, not time-conditioned) torch
transformer denoiser. Both runs use the same seed and must produce identical tokens.
Run: .venv/bin/python tests/benchmarks/bench_sampler_cache.py [--steps 1000 --seq-len 1024 --grid cosine]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from model.diffusion import make_schedule, sample  # noqa: E402


class TinyDenoiser(nn.Module):
    """Bidirectional transformer: ids [B, N] (mask id = V) -> logits [B, N, V]."""

    def __init__(self, vocab_size: int, seq_len: int, dim: int = 64, layers: int = 1, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab_size + 1, dim)
        self.pos = nn.Parameter(torch.randn(seq_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(dim, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(self.embed(ids) + self.pos[: ids.shape[1]]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--grid", default="cosine")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TinyDenoiser(args.vocab, args.seq_len).eval()
    sched = make_schedule("linear")
    print(f"MD4 sampling: T={args.steps} steps ({args.grid} grid), {args.seq_len} tokens, batch 1, "
          f"vocab {args.vocab}, denoiser {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"{args.threads} threads")
    results = {}
    for cache in (False, True):
        g = torch.Generator().manual_seed(1)
        t0 = time.perf_counter()
        with torch.inference_mode():
            tokens, stats = sample(model, 1, args.seq_len, args.vocab, args.vocab, sched, steps=args.steps,
                                   grid=args.grid, generator=g, use_cache=cache)
        dt = time.perf_counter() - t0
        results[cache] = (tokens, stats["network_calls"], dt)
    print(f"{'':14s}{'network calls':>15s}{'seconds':>10s}{'tokens/s':>11s}")
    for cache in (False, True):
        _, calls, dt = results[cache]
        print(f"{'cache ' + ('on' if cache else 'off'):14s}{calls:>15d}{dt:>10.2f}{args.seq_len / dt:>11.1f}")
    same = torch.equal(results[False][0], results[True][0])
    print(f"identical samples: {same}; calls saved: {results[False][1] / max(results[True][1], 1):.2f}x fewer; "
          f"speed-up {results[False][2] / results[True][2]:.2f}x")


if __name__ == "__main__":
    main()
