#!/usr/bin/env python
"""Held-out bound of a checkpoint or export on a prepared data folder: bits/token (bits/dim for pixels),
the perplexity bound, tokens, K and the standard error, as one final JSON line on stdout.

    python launcher/evaluate.py exports/md4_tiny --data data/linuxdoc_gpt2_128                  # split val
    python launcher/evaluate.py runs/md4_tiny_demo --data data/wikitext2_gpt2_128 --split test --draws 4
    python launcher/evaluate.py exports/md4_tiny --data DIR --steps 1000         # MD4's discrete-time bound, T=1000
    torchrun --nproc-per-node 4 launcher/evaluate.py exports/md4_tiny --data DIR  # rows split over ranks

The number is the training-time evaluation's (launcher/train.py's evaluate, through heldout_bound): model.objectives.heldout_nelbo with K
antithetic draws of t per row ((u + k/K) mod 1) and noise keyed by each row's content and the seed (the
run's seed by default), so it does not depend on batch size or on the number of ranks; per-row sums are
added exactly across ranks (all_reduce of [sum, sum of squares, rows] in float64). The model is the
plain single-process denoiser (model/plain.py), run in float32.

The data folder's manifest must agree with the model (tokenizer, seq_len, vocab_size); otherwise the
command refuses, naming the manifest and both values (exit 2).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402


from launcher.argtypes import POSITIVE, bounded as _bounded  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="export directory, run directory, checkpoints/ folder or step_XXXXXXXX folder")
    p.add_argument("--data", required=True, help="prepared data folder (manifest.json + <split>/ shards)")
    p.add_argument("--split", default="val", help="split to evaluate (default val)")
    p.add_argument("--draws", type=POSITIVE, default=None, help="K draws of t per row (default: the run's logging.eval_draws)")
    p.add_argument("--steps", type=POSITIVE, default=None, help="discrete-time bound with T steps (MD4 only)")
    p.add_argument("--batch-size", type=POSITIVE, default=16)
    p.add_argument("--limit-rows", type=POSITIVE, default=None, help="evaluate only the first N rows of the split")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: the run's run.seed)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--raw", action="store_true", help="checkpoint: the trained weights, not the EMA")
    which.add_argument("--ema", action="store_true", help="checkpoint: the EMA weights (default when present)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _init_distributed() -> tuple[int, int]:
    """(rank, world size); joins torchrun's group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def rank_rows(num_rows: int, rank: int, world: int) -> np.ndarray:
    """Rank r's contiguous chunk of the rows (as the training-time eval loader splits them)."""
    return np.array_split(np.arange(num_rows), world)[rank]


@torch.no_grad()
def bound_sums(forward, objective, batches, draws: int, seed: int, device, on_batch=None) -> torch.Tensor:
    """[sum of per-row negative ELBO in nats, sum of squares, rows] over `batches` (row tensors [B, N]), float64
    on `device`, ready for an all_reduce. on_batch(i, x0) is called before each batch (progress)."""
    from model.objectives import heldout_nelbo

    sums = torch.zeros(3, dtype=torch.float64)
    for i, x0 in enumerate(batches):
        if on_batch is not None:
            on_batch(i, x0)
        if x0.shape[0] == 0:   # a rank with one row fewer; its tensor/pipeline peers skip it too
            continue
        per_row = heldout_nelbo(forward, objective, x0.to(device), draws, seed)
        sums += torch.stack([per_row.sum(), (per_row ** 2).sum(), torch.tensor(float(x0.shape[0]), dtype=torch.float64)])
    return sums.to(device)


@torch.no_grad()
def heldout_bound(forward, objective, batches, draws: int, seed: int, seq_len: int, device, on_batch=None,
                  all_reduce=None) -> dict:
    """The held-out bound (bits/token, perplexity bound, standard error) of `forward` over `batches`, the same
    for training-time evaluation (launcher/train.py) and this CLI: all_reduce(sums) sums each rank's share
    (the data-parallel group in training, the CLI's world here)."""
    from model.objectives import bound_summary

    sums = bound_sums(forward, objective, batches, draws, seed, device, on_batch)
    if all_reduce is not None:
        all_reduce(sums)
    return bound_summary(sums.cpu(), seq_len, draws)


@torch.no_grad()
def evaluate(model, cfg, data: str | Path, split: str = "val", draws: int = 1, steps: int | None = None,
             batch_size: int = 16, limit_rows: int | None = None, seed: int | None = None, rank: int = 0,
             world: int = 1, progress: bool = False, device: torch.device | str = "cpu") -> dict:
    """The held-out bound of `model` (a plain denoiser) on data/split; sums reduced over `world` ranks."""
    from data_pipeline.loader import open_rows
    from model.objectives import make_objective

    objective = make_objective(cfg, model, steps=steps)
    rows = open_rows(data, split)   # MDS or webdataset, as the manifest says
    n = rows.num_rows if limit_rows is None else min(limit_rows, rows.num_rows)
    mine = rank_rows(n, rank, world)
    seed = cfg.run.seed if seed is None else seed
    batches = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc=f"evaluate {split}", unit="row", file=sys.stderr, dynamic_ncols=True)
    import torch.distributed as dist

    out = heldout_bound(model, objective, (rows.__getitems__(idx) for idx in batches), draws, seed, cfg.model.seq_len,
                        device, on_batch=None if bar is None else (lambda i, x0: bar.update(x0.shape[0] * world)),
                        all_reduce=dist.all_reduce if world > 1 else None)
    if bar is not None:
        bar.close()
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    from data_pipeline.manifest import check_manifest
    from launcher.export import ExportError, load_plain

    rank, world = _init_distributed()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    try:
        model, cfg, meta = load_plain(a.model, "raw" if a.raw else "ema" if a.ema else None)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        manifest = check_manifest(a.data, tokenizer=cfg.data.tokenizer, seq_len=cfg.model.seq_len,
                                  vocab_size=cfg.model.vocab_size, splits=(a.split,))
    except ValueError as e:
        print(f"error: refusing to evaluate {a.model} on {a.data}: {e}", file=sys.stderr)
        return 2
    if a.steps is not None and cfg.diffusion.kind != "md4":
        print(f"error: --steps (discrete-time bound) exists for diffusion.kind md4 only, not "
              f"{cfg.diffusion.kind!r}", file=sys.stderr)
        return 2
    draws = a.draws if a.draws is not None else cfg.logging.eval_draws
    if draws < 1:
        print("error: --draws must be >= 1", file=sys.stderr)
        return 2
    model.to(device)
    res = evaluate(model, cfg, a.data, a.split, draws, a.steps, a.batch_size, a.limit_rows, a.seed, rank, world,
                   progress=rank == 0 and not a.no_progress, device=device)
    res["nats_per_token"] = res["bits_per_token"] * float(np.log(2.0))
    if manifest["tokenizer"] == "pixels":
        res["bits_per_dim"] = res["bits_per_token"]
    res.update({"model": str(a.model), "weights": meta.get("weights"), "step": meta.get("step"),
                "data": str(a.data), "split": a.split, "diffusion": cfg.diffusion.kind,
                "bound": f"discrete T={a.steps}" if a.steps else "continuous", "ranks": world,
                "seed": cfg.run.seed if a.seed is None else a.seed})
    if rank == 0:
        unit = "bits/dim" if manifest["tokenizer"] == "pixels" else "bits/token"
        print(f"{res['bits_per_token']:.4f} {unit} (+- {res['stderr_bits_per_token']:.4f}), perplexity bound "
              f"{res['ppl_bound']:.2f}, {res['tokens']} tokens, K={draws}", file=sys.stderr)
        print(json.dumps(res), flush=True)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
