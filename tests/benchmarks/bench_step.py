"""Training-step benchmark: the full stack against plain PyTorch, side by side in one run.

    .venv/bin/python tests/benchmarks/bench_step.py configs/md4_tiny.yaml [key=value ...] [--steps 20 --warmup 3]
    torchrun --nproc-per-node 2 tests/benchmarks/bench_step.py configs/md4_tiny.yaml parallel.tensor_parallel=2

"full stack" is what launcher/train.py runs for one optimizer step (megatron-core denoiser, DeepSpeed ZeRO
engine, the diffusion objective, gradient accumulation, clipping, the data loader); "plain" is the same
math in one process with nothing else: model/plain.PlainDenoiser with the same weights, torch AdamW with
the same parameter groups, the same batches and the same noise, the same autocast. The two alternate
step by step (ABAB...) so that drift in the machine's speed hits both alike; the first step's losses are
printed to show that both compute the same thing.

Prints, for the config and layout: median step time, tokens/s (per device and in all), peak memory,
model FLOPs utilisation (full bidirectional attention counted; GPU with a known peak only), and at world
size 1 the ratio full / plain. Data: random token rows written through data_pipeline.prepare into a temporary
folder (the speed of the step does not depend on what the tokens say).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from launcher.config import load_config, save_config  # noqa: E402
from launcher.distributed import free_port  # noqa: E402


def synthetic_data(cfg, rows: int, out: Path) -> Path:
    from data_pipeline.prepare import prepare_tokens

    rng = np.random.default_rng(0)
    n, v = cfg.model.seq_len, cfg.model.vocab_size
    docs = [rng.integers(0, v, size=n, dtype=np.int64) for _ in range(int(rows * 1.3) + 20)]
    extra = {"image_shape": list(cfg.model.image_shape)} if cfg.model.image_shape else None
    prepare_tokens(docs, out, n, val_fraction=0.1, split_seed=0, tokenizer=cfg.data.tokenizer, vocab_size=v,
                   eos_id=None, source="bench_step random rows", log=lambda *a, **k: None, extra_manifest=extra)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key.sub=value")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-plain", action="store_true", help="time the full stack only")
    args = ap.parse_args()

    if "RANK" not in os.environ:   # one process without torchrun
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    # one folder for all ranks of this run (torchrun gives them the same MASTER_ADDR:MASTER_PORT)
    tmp = Path(tempfile.gettempdir()) / f"bench_step_{os.environ['MASTER_ADDR']}_{os.environ['MASTER_PORT']}"
    if rank == 0:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    cfg = load_config(args.config, [*args.overrides, f"run.output_dir={tmp}", "run.name=bench",
                                    "logging.sample_at_end=false", "optim.ema_decay=0.0"])
    total_steps = args.steps + args.warmup + 1
    data = tmp / "data"
    if rank == 0:
        synthetic_data(cfg, total_steps * cfg.optim.global_batch_size + 4, data)
        save_config(cfg, tmp / "config.yaml")
    cfg.data.path = str(data)
    if world > 1:   # every rank needs the data before setup
        while not (data / "manifest.json").exists():
            time.sleep(0.2)
        time.sleep(0.5)

    from launcher.train import autocast_ctx, build_optimizer, peak_memory_gb, setup, train_step
    from model.diffusion.noise import step_noise

    trainer = setup(cfg, tmp)
    info = trainer.info
    n, gb, mb = cfg.model.seq_len, cfg.optim.global_batch_size, trainer.batch.micro_batch_size
    batches = iter(trainer.train_loader)

    plain = None
    if world == 1 and not args.no_plain:
        from launcher.export import strip_padding
        from model.objectives import make_objective
        from model.plain import PlainDenoiser

        plain = PlainDenoiser.from_config(cfg.model, cfg.diffusion).to(info.device)
        full_sd = {k: v for k, v in trainer.engine.module.state_dict().items() if not k.endswith("_extra_state")}
        plain.load_state_dict(strip_padding(full_sd, cfg.model.vocab_size))
        plain_opt = build_optimizer(plain, cfg)
        plain_obj = make_objective(cfg, plain)

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def full_step(micro):
        sync()
        t0 = time.perf_counter()
        loss = train_step(trainer, iter(micro)).loss
        sync()
        trainer.step += 1
        return time.perf_counter() - t0, loss

    def plain_step(micro, step):
        sync()
        t0 = time.perf_counter()
        total = 0.0
        for m, x0 in enumerate(micro):
            x0 = x0.to(info.device)
            u, noise = step_noise(cfg.run.seed, step, list(range(m * mb, (m + 1) * mb)), gb, n,
                                  cfg.diffusion.antithetic, streams=plain_obj.noise_streams(train=True))

            def forward(**inputs):
                with autocast_ctx(cfg, info.device):
                    return plain(**inputs)

            train_loss, nelbo = plain_obj.loss(forward, x0, u, noise, True)
            (train_loss.mean() / n / len(micro)).backward()
            total += nelbo.mean().item() / n
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.optim.grad_clip)
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0, total / len(micro)

    full_t, plain_t, first = [], [], {}
    for i in range(args.warmup + args.steps):
        micro = [next(batches) for _ in range(trainer.batch.grad_accum)]
        step = trainer.step
        tf, lf = full_step(micro)
        if i >= args.warmup:
            full_t.append(tf)
        if plain is not None:
            tp, lp = plain_step(micro, step)
            if i >= args.warmup:
                plain_t.append(tp)
            if i == 0:
                first = {"full_loss_nats_per_token": lf, "plain_loss_nats_per_token": lp}

    med = statistics.median(full_t)
    tokens = gb * n
    from model.flops import flops_per_token, peak_flops

    fpt = flops_per_token(cfg.model.num_layers, cfg.model.hidden_size, n, cfg.model.vocab_size,
                          cfg.model.ffn_hidden_size)
    peak = peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else peak_memory_gb()
    out = {"config": args.config, "overrides": args.overrides, "device": str(info.device),
           "layout": {"world": world, "tp": info.tp_size, "pp": info.pp_size, "dp": info.dp_size,
                      "zero": cfg.parallel.zero_stage, "precision": cfg.parallel.precision,
                      "micro_batch": mb, "global_batch": gb, "grad_accumulation": trainer.batch.grad_accum},
           "steps_timed": len(full_t), "full_step_s": med, "tokens_per_s": tokens / med,
           "tokens_per_s_per_device": tokens / med / world, "peak_memory_gib": peak_mem,
           "mfu": (tokens / med / world * fpt / peak) if peak else None, **first}
    if plain_t:
        pmed = statistics.median(plain_t)
        out.update(plain_step_s=pmed, plain_tokens_per_s=tokens / pmed, ratio_full_over_plain=med / pmed)
    if rank == 0:
        print(f"{'':28s}{'full stack':>14s}{'plain torch':>14s}")
        print(f"{'step time (median, s)':28s}{med:14.4f}{(out.get('plain_step_s') or float('nan')):14.4f}")
        print(f"{'tokens/s':28s}{out['tokens_per_s']:14.0f}{(out.get('plain_tokens_per_s') or float('nan')):14.0f}")
        if plain_t:
            print(f"ratio full / plain step time: {out['ratio_full_over_plain']:.3f}")
            print(f"first-step loss (nats/token): full {first['full_loss_nats_per_token']:.6f}  "
                  f"plain {first['plain_loss_nats_per_token']:.6f}")
        print(f"peak memory {peak_mem:.2f} GiB; MFU {out['mfu'] if out['mfu'] is not None else 'n/a (no GPU peak known)'}")
        print(json.dumps(out))
    from launcher.distributed import destroy_distributed

    destroy_distributed()
    if rank == 0:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
