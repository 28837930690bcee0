"""The training task every rank runs: megatron-core denoiser, DeepSpeed ZeRO, MD4 loss, streamed shards.

`TrainJob` is what launcher/submit.py hands to submitit (local executor or SLURM). Each rank:
  1. initialises torch.distributed + megatron parallel state from the launcher's environment,
  2. checks the data manifest against the config (before any training work),
  3. builds the denoiser, AdamW, warmup+cosine LR, and wraps them in a DeepSpeed engine,
  4. resumes from the newest verified checkpoint in the run directory if there is one,
  5. trains, evaluates the held-out bound, logs to TensorBoard, checkpoints, and finally samples.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from launcher.config import Config, load_config, validate_world
from model.diffusion import antithetic_times
from model import vocab_parallel
from model.objectives import bound_summary, make_objective

LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------
# Noise that depends only on (seed, step, global sample index): the loss is the same function of
# the data whatever the parallel layout.
# ---------------------------------------------------------------------------------------------

def _mix(*parts: int) -> int:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(int(p).to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def step_noise(seed: int, step: int, sample_ids: list[int], global_batch: int, seq_len: int,
               antithetic: bool = True, streams: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """u [B] in [0, 1) and uniform noise [B, N] (streams == 1) or [B, streams, N] for the given global
    sample indices of one optimizer step. The objective maps u to its time t. Held-out noise is keyed
    by row content instead: model.objectives.row_noise."""
    g = torch.Generator().manual_seed(_mix(seed, step, -1))
    u = torch.rand((), generator=g, dtype=torch.float64)
    idx = torch.tensor(sample_ids)
    if antithetic:
        t = antithetic_times(u, idx, global_batch)
    else:
        t = torch.stack([torch.rand((), generator=torch.Generator().manual_seed(_mix(seed, step, i, -2)),
                                    dtype=torch.float64) for i in sample_ids])

    def stream(i: int, k: int) -> torch.Tensor:
        key = _mix(seed, step, i) if k == 0 else _mix(seed, step, i, k)
        return torch.rand(seq_len, generator=torch.Generator().manual_seed(key), dtype=torch.float64)

    noise = torch.stack([torch.stack([stream(i, k) for k in range(streams)]) for i in sample_ids])
    return t, (noise[:, 0] if streams == 1 else noise)


# ---------------------------------------------------------------------------------------------

def lr_lambda(cfg: Config):
    o = cfg.optim

    def f(step: int) -> float:
        if o.warmup_steps > 0 and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.lr_schedule == "constant":
            return 1.0
        span = max(1, o.train_steps - o.warmup_steps)
        progress = min(1.0, (step - o.warmup_steps) / span)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def autocast_ctx(precision: "str | Config", device: torch.device):
    """bf16 autocast or nothing; `precision` is a resolved one (bf16 | fp32) or a Config, resolved here for
    `device` (launcher/precision.py)."""
    if isinstance(precision, Config):
        from launcher.precision import resolve_precision

        precision = resolve_precision(precision.parallel.precision, device).resolved
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
    if torch.cuda.is_available():
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20    # KiB on Linux


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _len_or_none(loader):
    try:
        return len(loader)
    except TypeError:
        return None


class EMA:
    """fp32 exponential moving average of this rank's (tensor/pipeline shard of the) weights."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for k, p in module.named_parameters():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def swap_in(self, module: torch.nn.Module) -> dict:
        saved = {}
        for k, p in module.named_parameters():
            saved[k] = p.detach().clone()
            p.copy_(self.shadow[k])
        return saved

    @torch.no_grad()
    def swap_out(self, module: torch.nn.Module, saved: dict) -> None:
        for k, p in module.named_parameters():
            p.copy_(saved[k])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise RuntimeError(f"EMA state lacks {sorted(missing)[:3]}...")
        self.shadow = {k: v.float().clone() for k, v in state["shadow"].items()}


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"

    # ----- setup ------------------------------------------------------------------------------
    def setup(self):
        import deepspeed
        from data_pipeline.loader import build_eval_loader, build_train_loader, resolve_data_dir
        from data_pipeline.manifest import check_manifest
        from launcher.distributed import MegatronMPU, init_distributed
        from launcher.parallelize import build_pipeline_stage, deepspeed_config

        cfg = self.cfg
        self.info = info = init_distributed(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
                                            seed=cfg.run.seed, virtual_pipeline=cfg.parallel.virtual_pipeline)
        if not torch.cuda.is_available():
            # one share of the cores per local process: oversubscribed BLAS threads thrash on CPU
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))
        # the global batch is the contract; the micro-batch the largest divisor of this rank's share that
        # is <= optim.micro_batch_size (launcher.config.resolve_batch)
        self.batch = validate_world(cfg, info.world_size, str(self.run_dir / "config.yaml"))
        from launcher.precision import resolve_precision

        self.precision = resolve_precision(cfg.parallel.precision, info.device)
        self.warnings: list[str] = []   # what this job fell back on: printed, and in resolved.json + TensorBoard
        if self.precision.warning:
            self.warnings.append(self.precision.warning)
            if info.is_main:
                print(f"warning: {self.precision.warning}", flush=True)
        # a remote data.path (s3://, gs://, https://, file://, ...) is copied into the local cache
        # ($MDIFF_DATA_CACHE_DIR, default ~/.cache/mdiff/data), every file checked against its sha256
        self.data_dir = data_dir = resolve_data_dir(cfg.data.path)
        manifest = check_manifest(data_dir, tokenizer=cfg.data.tokenizer, seq_len=cfg.model.seq_len,
                                  vocab_size=cfg.model.vocab_size, image_shape=cfg.model.image_shape)
        if cfg.data.verify_sha256:
            # rank 0 reads every shard once (later runs only stat them: data_pipeline.manifest.ShardDigests);
            # every rank stops on its verdict, none waits in a collective for a rank that failed
            import torch.distributed as dist

            verdict = [None]
            if info.is_main:
                try:
                    check_manifest(data_dir, verify_sha256=True, splits=tuple(
                        sp for sp in dict.fromkeys((cfg.data.train_split, cfg.data.val_split)) if sp in manifest["splits"]))
                except ValueError as e:
                    verdict = [str(e)]
            dist.broadcast_object_list(verdict, src=0)
            if verdict[0] is not None:
                raise ValueError(verdict[0])
        self.image_shape = cfg.model.image_shape or manifest.get("image_shape")
        model = build_pipeline_stage(cfg.model, diffusion_cfg=cfg.diffusion,   # under VPP: ModelChunks, one module
                                     sequence_parallel=cfg.parallel.sequence_parallel)
        if cfg.checkpoint.init_from:
            # an export (any source layout): each rank slices its TP/PP shard; a resumable checkpoint,
            # loaded below, takes precedence
            from launcher.export import load_into_megatron

            doc = load_into_megatron(model, cfg.checkpoint.init_from, cfg)
            if info.is_main:
                print(f"initialised from {cfg.checkpoint.init_from} ({doc['weights']} weights of step "
                      f"{doc.get('step')})", flush=True)
        self.objective = make_objective(cfg, model, vocab=vocab_parallel.from_parallel_state())
        optimizer = build_optimizer(model, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(cfg, self.batch), mpu=MegatronMPU(), dist_init_required=False)
        from launcher.checkpoint import install_safe_loading

        install_safe_loading(self.engine)   # checkpoints load weights-only: no pickled code runs
        self.gas = self.batch.grad_accum
        self.train_loader = build_train_loader(data_dir, cfg.data.train_split, self.batch.micro_batch_size,
                                               info.dp_rank, info.dp_size, seed=cfg.run.seed,
                                               num_workers=cfg.data.num_workers, shuffle=cfg.data.shuffle)
        # logging.eval_batches: the first eval_batches x micro_batch_size held-out rows, the same at any layout
        self._build_eval_loader = lambda: build_eval_loader(
            data_dir, cfg.data.val_split, self.batch.micro_batch_size, info.dp_rank, info.dp_size,
            limit_rows=cfg.logging.eval_batches * cfg.optim.micro_batch_size or None)
        self.step = 0
        self.tokens_seen = 0
        self.writer = None
        from launcher.checkpoint import Checkpointer
        from launcher.runlog import Metrics, RunLogger

        if info.is_main:   # TensorBoard, and wandb when logging.wandb asks for it (launcher/runlog.py)
            self.writer = RunLogger(self.run_dir, cfg, {"resolved": {
                "precision": dataclasses.asdict(self.precision), "batch": dataclasses.asdict(self.batch),
                "device": str(info.device), "world_size": info.world_size}})
        self.metrics = Metrics(self.run_dir, self.writer, info.is_main)
        self.checkpointer = Checkpointer(self.ckpt_root, cfg.checkpoint, cfg.optim.train_steps, info.rank,
                                         self._provenance())
        from launcher.profiling import StepProfiler

        self.profiler = StepProfiler(self.run_dir, cfg.logging.profile_steps, info.rank)
        from model.flops import flops_per_token, peak_flops

        self.flops_per_token = flops_per_token(cfg.model.num_layers, cfg.model.hidden_size, cfg.model.seq_len,
                                               cfg.model.vocab_size, cfg.model.ffn_hidden_size)
        self.peak_flops = peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
        self.ema = EMA(self.engine.module, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        self._resume()
        from launcher.preemption import PreemptionHandler

        self.preemption = PreemptionHandler().install()

    def _resume(self):
        from launcher import checkpoint

        tag, skipped = checkpoint.find_resumable(self.ckpt_root, self.info.rank)
        self.warnings.extend(skipped)   # printed by find_resumable; TensorBoard text in write_resolved
        if tag is None:
            self.log(f"no checkpoint in {self.ckpt_root}: starting from step 0")
            return
        self._check_layout(self.ckpt_root / tag)
        client, extra = checkpoint.load(self.engine, self.ckpt_root, tag, self.info.rank)
        if self.ema is not None:
            if "ema" not in client:
                raise RuntimeError(f"{self.ckpt_root / tag} holds no EMA weights but optim.ema_decay > 0")
            self.ema.load_state_dict(client["ema"])
        self.step = int(client["step"])
        self.tokens_seen = int(client["tokens_seen"])
        self.train_loader.load_state_dict(extra["loader"])
        checkpoint.set_rng_state(extra["rng"])
        self._apply_optim_settings(self.ckpt_root / tag)
        self._truncate_metrics()
        self.log(f"resumed from {self.ckpt_root / tag} at step {self.step}")

    def _truncate_metrics(self) -> None:
        """metrics.jsonl keeps only the records up to the resumed step: the steps a crashed job ran past its
        last checkpoint are run again and must not appear twice."""
        path = self.run_dir / "metrics.jsonl"
        if not self.info.is_main or not path.is_file():
            return
        keep, dropped = [], 0
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:        # a line torn by the crash
                dropped += 1
                continue
            if int(rec.get("step", 0)) <= self.step:
                keep.append(line)
            else:
                dropped += 1
        if dropped:
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(l + "\n" for l in keep))
            os.replace(tmp, path)
            self.log(f"metrics.jsonl: dropped {dropped} record(s) past the resumed step {self.step}")

    def _apply_optim_settings(self, tag_dir: Path) -> None:
        """Resume applies this config's optim settings, not the checkpoint's: the optimizer state loaded
        from the checkpoint carries the old lr / betas / weight decay and the scheduler the old base lr;
        both are reset from cfg.optim and the LR schedule is re-derived from it at the resumed step
        (grad_clip comes from the DeepSpeed config, built from this config). Says which settings changed."""
        import yaml

        o = self.cfg.optim
        then = {}
        if (tag_dir / "config.yaml").is_file():
            then = (yaml.safe_load((tag_dir / "config.yaml").read_text()) or {}).get("optim", {}) or {}
        now = dataclasses.asdict(o)
        changed = [f"optim.{k}: {then[k]!r} -> {v!r}" for k, v in now.items() if k in then and then[k] != v]
        if changed:
            self.log("resuming with changed settings (applied from this config; LR schedule re-derived): "
                     + ", ".join(changed))
        sched = self.scheduler
        groups = sched.optimizer.param_groups
        sched.base_lrs = [o.lr for _ in groups]
        sched.lr_lambdas = [lr_lambda(self.cfg) for _ in groups]
        for i, g in enumerate(groups):
            g["lr"] = o.lr * sched.lr_lambdas[i](sched.last_epoch)
            g["initial_lr"] = o.lr
            g["betas"] = (o.beta1, o.beta2)
            if i == 0:                     # the decayed group (build_optimizer)
                g["weight_decay"] = o.weight_decay
        sched._last_lr = [g["lr"] for g in groups]

    def _check_layout(self, tag_dir: Path) -> None:
        """Refuse a checkpoint written at another layout, saying how to change the layout instead of failing
        inside DeepSpeed (launcher.checkpoint.layout_mismatch; submit.py asks the same before submitting)."""
        from launcher.checkpoint import export_route, layout_mismatch

        mismatch = layout_mismatch(tag_dir, self.cfg.parallel, self.info.world_size)
        if mismatch is not None:
            raise RuntimeError(f"{tag_dir} was written at {mismatch}. {export_route(tag_dir)}")

    def save(self):
        from launcher import checkpoint

        t0 = time.time()
        self.checkpointer.save(self.engine, self.step,
                               client_state={"step": self.step, "tokens_seen": self.tokens_seen,
                                             **({"ema": self.ema.state_dict()} if self.ema is not None else {})},
                               rank_state={"loader": self.train_loader.state_dict(), "rng": checkpoint.rng_state()})
        self.metrics.log(self.step, {"checkpoint_s": time.time() - t0}, to_file=False)
        self.log(f"saved checkpoint step {self.step} in {time.time() - t0:.1f}s")

    def _provenance(self) -> dict[str, str]:
        """The resolved config and the code version, copied into every checkpoint."""
        out = {}
        for name in ("config.yaml", "code_version.txt"):
            p = self.run_dir / name
            if p.is_file():
                out[name] = p.read_text()
        return out

    # ----- logging ----------------------------------------------------------------------------
    def write_resolved(self) -> None:
        """What `auto` and the batch split resolved to on this job's devices: <run_dir>/resolved.json (and
        TensorBoard text); config.yaml keeps what was asked."""
        if not self.info.is_main:
            return
        from dataclasses import asdict

        doc = {"precision": asdict(self.precision), "batch": asdict(self.batch), "device": str(self.info.device),
               "step": self.step, "warnings": self.warnings}
        (self.run_dir / "resolved.json").write_text(json.dumps(doc, indent=1) + "\n")
        if self.writer is not None:
            self.writer.add_text("run/resolved", f"precision: {self.precision.describe()}\n\n"
                                                 f"batch: {self.batch.describe()}", self.step)
            if self.warnings:
                self.writer.add_text("run/warnings", "\n\n".join(f"WARNING: {w}" for w in self.warnings), self.step)

    def log(self, msg: str):
        if self.info.is_main:
            print(f"[step {self.step}] {msg}", flush=True)

    # ----- one optimizer step -------------------------------------------------------------------
    def forward(self, **inputs):
        """The denoiser under the configured autocast (the objective's reductions stay fp32). Under
        pipeline parallelism: a forward-only pass through megatron's schedule, whose last-stage output is
        broadcast to every stage (evaluation and sampling run the same code on every rank)."""
        if self.info.pp_size == 1:
            with autocast_ctx(self.precision.resolved, self.info.device):
                return self.engine(**inputs)
        return self._pipeline_forward(inputs)

    def _pipeline_schedule(self, microbatches: list, forward_only: bool, loss_func_for=None) -> list:
        """megatron-core's pipeline schedule over `microbatches` = [(model kwargs, ctx)]: 1F1B over this rank's
        stage, or interleaved 1F1B over its model chunks (parallel.virtual_pipeline > 1), each chunk reading
        the micro-batches from its own iterator (only the first chunk of the first rank uses the inputs, only
        the last chunk of the last rank the loss)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from launcher.parallelize import model_chunks

        chunks = model_chunks(self.engine.module)
        dtype = chunks[0].config.pipeline_dtype

        def forward_step(data_iterator, model):
            inputs, ctx = next(data_iterator)
            with autocast_ctx(self.precision.resolved, self.info.device):
                out = model(**inputs)
            if not model.post_process:   # what travels to the next stage or chunk has the schedule's dtype
                out = out.to(dtype)
            return out, (loss_func_for(ctx) if loss_func_for is not None else None)

        b, s = next(iter(microbatches[0][0].values())).shape[:2]
        return get_forward_backward_func()(
            forward_step_func=forward_step, model=chunks,
            data_iterator=iter(microbatches) if len(chunks) == 1 else [iter(microbatches) for _ in chunks],
            num_microbatches=len(microbatches), seq_length=s, micro_batch_size=b, forward_only=forward_only)

    def _pipeline_forward(self, inputs: dict) -> torch.Tensor:
        """Forward-only through the pipeline; the last stage's output, broadcast to every pipeline rank. Under
        interleaved PP megatron's schedule takes a multiple of PP micro-batches (validate_world): the rows are
        split into PP equal micro-batches (the last row repeated to fill them; the copies are dropped again),
        which gives the same rows as one micro-batch, every row's forward being independent of the others."""
        from megatron.core import parallel_state

        if self.cfg.parallel.virtual_pipeline > 1:
            pp = self.info.pp_size
            rows = next(iter(inputs.values())).shape[0]
            per = -(-rows // pp)
            fill = per * pp - rows
            padded = {k: torch.cat([v, v[-1:].expand(fill, *v.shape[1:])]) if fill else v for k, v in inputs.items()}
            outs = self._pipeline_schedule([({k: v[i * per:(i + 1) * per] for k, v in padded.items()}, None) for i in range(pp)],
                                  forward_only=True)
            outs = [torch.cat(outs)[:rows]] if outs else outs
        else:
            outs = self._pipeline_schedule([(inputs, None)], forward_only=True)
        group = parallel_state.get_pipeline_model_parallel_group()
        src = parallel_state.get_pipeline_model_parallel_last_rank()
        if parallel_state.is_pipeline_last_stage():
            out = outs[0].contiguous()
            meta = torch.tensor([out.dim(), *out.shape] + [0] * (4 - out.dim()), dtype=torch.int64,
                                device=self.info.device)
        else:
            meta = torch.zeros(5, dtype=torch.int64, device=self.info.device)
        dist.broadcast(meta, src=src, group=group)
        if not parallel_state.is_pipeline_last_stage():
            out = torch.empty(meta[1:1 + int(meta[0])].tolist(), dtype=torch.float32, device=self.info.device)
        dist.broadcast(out, src=src, group=group)
        return out

    def train_step(self, batches) -> tuple[float, float, bool]:
        """One optimizer step, the same composition at every layout: the objective prepares each micro-batch,
        the forward and backward run through DeepSpeed's engine (PP = 1) or megatron's pipeline schedule, the
        objective finishes on the output; one host sync at the end. Returns (nelbo in nats/token averaged over
        data-parallel ranks, seconds spent waiting for data, whether DeepSpeed applied the update: ZeRO skips a
        step whose gradient norm is not finite, and so does not step the LR schedule either)."""
        from megatron.core import parallel_state

        cfg, info = self.cfg, self.info
        mb, n = self.batch.micro_batch_size, cfg.model.seq_len
        wait = 0.0
        prepared = []
        for m in range(self.gas):
            t0 = time.time()
            x0 = next(batches)
            wait += time.time() - t0
            base = (m * info.dp_size + info.dp_rank) * mb
            u, noise = step_noise(cfg.run.seed, self.step, list(range(base, base + x0.shape[0])),
                                  cfg.optim.global_batch_size, n, cfg.diffusion.antithetic,
                                  streams=self.objective.noise_streams(train=True))
            if noise.dim() == 2:
                noise = noise[:, None]
            prepared.append(self.objective.prepare(x0.to(info.device), u, noise, train=True))
        skipped_before = self.engine.skipped_steps
        nelbo = (self._pipeline_step(prepared) if info.pp_size > 1 else self._engine_step(prepared)) / n
        applied = self.engine.skipped_steps == skipped_before
        stats = torch.stack([nelbo.detach().double() / self.gas,
                             torch.tensor(wait, dtype=torch.float64, device=nelbo.device)])
        dist.all_reduce(stats, group=parallel_state.get_data_parallel_group())
        loss, wait = (stats / info.dp_size).tolist()          # the step's one host sync
        if applied and self.ema is not None:
            self.ema.update(self.engine.module)
        return loss, wait, applied

    def _engine_step(self, prepared: list) -> torch.Tensor:
        """Gradient accumulation through DeepSpeed's engine; the summed micro-batch nelbo (nats per sequence)."""
        n, total = self.cfg.model.seq_len, torch.zeros((), dtype=torch.float64, device=self.info.device)
        for inputs, ctx in prepared:
            with autocast_ctx(self.precision.resolved, self.info.device):
                out = self.engine(**inputs)
            train_loss, nelbo = self.objective.finish(out, ctx)
            self.engine.backward(train_loss.mean() / n)      # nats per token; DeepSpeed divides by GAS
            self.engine.step()
            total += nelbo.detach().mean().double()
        return total

    def _pipeline_step(self, prepared: list) -> torch.Tensor:
        """The micro-batches through megatron-core's 1F1B schedule (each stage runs its own backward), then
        ZeRO-1's gradient reduction and step, as DeepSpeed's own pipeline engine does. The summed micro-batch
        nelbo lives on the last stage and is broadcast to the others."""
        from megatron.core import parallel_state

        n = self.cfg.model.seq_len

        def loss_func_for(ctx):
            def loss_func(out):
                train_loss, nelbo = self.objective.finish(out, ctx)
                # megatron divides by the number of micro-batches, as DeepSpeed's GAS scaling does
                return train_loss.mean() / n, {"nelbo": nelbo.detach().mean()}
            return loss_func

        outs = self._pipeline_schedule(prepared, forward_only=False, loss_func_for=loss_func_for)
        total = torch.zeros((), dtype=torch.float64, device=self.info.device)
        for o in outs:
            total += o["nelbo"].double()
        dist.broadcast(total, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
        self.engine.optimizer.reduce_gradients(pipeline_parallel=True)
        self.engine.step()
        return total

    # ----- held-out bound -----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        from megatron.core import parallel_state

        cfg = self.cfg
        self.engine.eval()
        swapped = self.ema.swap_in(self.engine.module) if self.ema is not None else None
        from launcher.evaluate import bound_sums

        n, k_draws = cfg.model.seq_len, cfg.logging.eval_draws
        loader = self._build_eval_loader()
        total = _len_or_none(loader)
        t0, shown = time.time(), [time.time()]

        def progress(i, x0):      # a progress line for long evaluations (rank 0's share)
            if time.time() - shown[0] > 10:
                shown[0] = time.time()
                self.log(f"held-out bound: {i}{f'/{total}' if total else ''} batches, "
                         f"{fmt_duration(shown[0] - t0)} elapsed")

        sums = bound_sums(self.forward, self.objective, loader, k_draws, cfg.run.seed, self.info.device, progress)
        dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        sums = sums.cpu()
        if swapped is not None:
            self.ema.swap_out(self.engine.module, swapped)
        self.engine.train()
        return bound_summary(sums, n, k_draws)

    # ----- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self) -> tuple[str, dict]:
        """Draw logging.num_samples samples with the `sampler` settings (EMA weights when kept) and show
        them in TensorBoard: text, or an image grid (also saved as <run_dir>/samples/step_N.png) for pixel
        data. Returns (the first text sample or the PNG path, sampler stats)."""
        from launcher.sample import Codec, save_grid
        from model.denoiser import gather_logits
        from model.objectives import draw_samples

        cfg = self.cfg
        self.engine.eval()
        swapped = self.ema.swap_in(self.engine.module) if self.ema is not None else None

        calls, t0, shown = [0], time.time(), [time.time()]

        def denoiser(ids: torch.Tensor, t=None) -> torch.Tensor:
            kw = {"t": t.to(self.info.device)} if t is not None else {}
            calls[0] += 1
            if time.time() - shown[0] > 10:   # a progress line for long sampling runs
                shown[0] = time.time()
                self.log(f"sampling: network call {calls[0]} of at most {cfg.sampler.steps}, "
                         f"{fmt_duration(shown[0] - t0)} elapsed")
            return gather_logits(self.forward(input_ids=ids.to(self.info.device), **kw), cfg.model.vocab_size).float()

        g = torch.Generator().manual_seed(cfg.run.seed + self.step)
        sc = cfg.sampler
        tokens, stats = draw_samples(self.objective, denoiser, cfg.logging.num_samples, cfg.model.seq_len,
                                     steps=sc.steps, grid=sc.grid, top_p=sc.top_p, temperature=sc.temperature,
                                     use_cache=sc.use_cache, generator=g)
        if swapped is not None:
            self.ema.swap_out(self.engine.module, swapped)
        self.engine.train()
        if self.image_shape is not None:
            from launcher.visual import image_grid

            shown = str(self.run_dir / "samples" / f"step_{self.step:08d}.png")
            if self.info.is_main:
                save_grid(tokens, self.image_shape, shown)
                self.writer.add_image("samples/images", image_grid(tokens.cpu(), self.image_shape), self.step,
                                      dataformats="HWC")
            return shown, stats
        codec = Codec(cfg.data.tokenizer)     # a tokenizer without a text decoder (synthetic ids): the ids
        texts = [codec.decode(row.tolist()) for row in tokens]
        if self.writer is not None:
            self.writer.add_text("samples/unconditional", "\n\n---\n\n".join(texts), self.step)
        return texts[0], stats

    # ----- the loop ------------------------------------------------------------------------------------
    def run(self) -> dict | None:
        cfg, info = self.cfg, self.info
        batches = iter(self.train_loader)
        tokens_per_step = cfg.optim.global_batch_size * cfg.model.seq_len
        t_last, steps_since = time.time(), 0
        self.log(f"training {cfg.run.name}: world={info.world_size} (tp={info.tp_size} pp={info.pp_size} "
                 f"{f'vpp={cfg.parallel.virtual_pipeline} ' if cfg.parallel.virtual_pipeline > 1 else ''}"
                 f"dp={info.dp_size}), zero={cfg.parallel.zero_stage}, device={info.device}")
        self.log(f"precision: {self.precision.describe()}")
        self.log(f"batch: {self.batch.describe()}")
        self.write_resolved()
        from model.denoiser import kernel_report, resolve_attention

        self.log(f"kernels: {kernel_report(resolve_attention(cfg.model.attention))}")
        val = None
        wait_since, consecutive_skips = 0.0, 0
        while self.step < cfg.optim.train_steps:
            self.profiler.before_step(self.step + 1)
            loss, wait, applied = self.train_step(batches)
            self.step += 1
            self.profiler.after_step(self.step)
            self.tokens_seen += tokens_per_step
            steps_since += 1
            wait_since += wait
            if applied:
                consecutive_skips = 0
            else:
                consecutive_skips += 1
                self.log(f"non-finite loss or gradients: step skipped ({consecutive_skips} in a row, "
                         f"{self.engine.skipped_steps} in total)")
                self.metrics.log(self.step, {"skipped_steps": self.engine.skipped_steps}, to_file=False)
                if consecutive_skips >= cfg.optim.max_consecutive_skips:
                    self.save()
                    raise RuntimeError(
                        f"{consecutive_skips} consecutive steps with non-finite loss or gradients, the last at step "
                        f"{self.step}; checkpoint saved at {self.ckpt_root / 'latest'}; lower optim.lr or inspect the data")
            if self.step % cfg.logging.log_interval == 0 or self.step == cfg.optim.train_steps:
                dt = time.time() - t_last
                grad_norm = self.engine.get_global_grad_norm()
                grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
                lr = self.scheduler.get_last_lr()[0]
                tps = steps_since * tokens_per_step / dt
                achieved = tps * self.flops_per_token / info.world_size      # per device
                rec = {"train_bits_per_token": loss / LN2, "lr": lr, "grad_norm": grad_norm,
                       "tokens_per_s": tps, "tokens_seen": self.tokens_seen, "data_wait_s": wait_since / steps_since,
                       "tflops_per_device": achieved / 1e12, "peak_memory_gb": peak_memory_gb(),
                       "skipped_steps": self.engine.skipped_steps}
                if self.objective.kind == "genmd4":       # the learned schedule's spread
                    w = self.objective.learned_schedule().w.detach()
                    rec.update(genmd4_w_min=w.min().item(), genmd4_w_max=w.max().item())
                if self.peak_flops:
                    rec["mfu"] = achieved / self.peak_flops
                self.metrics.log(self.step, rec)
                left = (cfg.optim.train_steps - self.step) * dt / max(steps_since, 1)
                self.log(f"{self.step}/{cfg.optim.train_steps} train {rec['train_bits_per_token']:.3f} bits/token  "
                         f"lr {lr:.2e}  grad {grad_norm:.2f}  {tps:.0f} tok/s  data wait "
                         f"{rec['data_wait_s'] * 1e3:.0f} ms/step  ETA {fmt_duration(left)}")
                t_last, steps_since, wait_since = time.time(), 0, 0.0
            if self.step % cfg.logging.eval_interval == 0 or self.step == cfg.optim.train_steps:
                val = self.evaluate()
                self.metrics.log(self.step, {f"val_{k}": v for k, v in val.items()})
                self.log(f"held-out {val['bits_per_token']:.4f} bits/token, perplexity bound "
                         f"{val['ppl_bound']:.2f} ({val['rows']} rows, K={val['eval_draws']})")
            if cfg.logging.sample_interval and self.step % cfg.logging.sample_interval == 0:
                shown, stats = self.sample()
                self.log(f"sample ({stats.get('network_calls')} network calls): {shown[:200]!r}")
            if self.preemption.should_stop():
                self.save()
                self.log("preempted: checkpoint saved, requeueing")
                self.profiler.stop()
                if self.writer is not None:
                    self.writer.close()   # requeue_and_exit ends the process without unwinding
                self.preemption.requeue_and_exit(info.rank)
                return None
            if self.checkpointer.due(self.step):
                self.save()
        self.profiler.stop()
        if val is None:
            val = self.evaluate()
        result = {"step": self.step, "tokens_seen": self.tokens_seen, "heldout": val}
        if cfg.logging.sample_at_end:
            text, stats = self.sample()
            result["sample"] = text
            result["sample_network_calls"] = stats.get("network_calls") if isinstance(stats, dict) else None
        if info.is_main:
            from data_pipeline.loader import unigram_perplexity

            result["unigram_ppl"] = unigram_perplexity(self.data_dir)
            (self.run_dir / "result.json").write_text(json.dumps(result, indent=1))
        if self.writer is not None:
            self.writer.close()
        return result if info.is_main else None


def _take_run_lock(run_dir: Path):
    """Global rank 0 holds RUN_DIR/run.lock for the whole job (launcher/runlock.py)."""
    try:
        import submitit

        env = submitit.JobEnvironment()
        rank, job_id = env.global_rank, env.job_id
    except Exception:      # not under submitit (torchrun / srun entry)
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
        job_id = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if rank != 0:
        return None
    from launcher.runlock import acquire

    return acquire(run_dir, job_id=job_id)    # a requeue of the same job waits for its predecessor


def train_main(run_dir: str) -> dict | None:
    """Entry point of one rank; the resolved config is read from the run directory."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    lock = _take_run_lock(run_dir)   # noqa: F841  (held until this process ends)
    trainer = Trainer(cfg, run_dir)
    try:
        trainer.setup()
        return trainer.run()
    finally:
        from launcher.distributed import destroy_distributed

        destroy_distributed()


try:  # submitit is a dependency; keep this module importable for unit tests without it
    import submitit

    class TrainJob(submitit.helpers.Checkpointable):
        """What submitit runs on every task. On preemption/timeout submitit calls checkpoint() and
        requeues the same callable; the requeued run resumes from the newest verified checkpoint."""

        def __init__(self, run_dir: str):
            self.run_dir = str(run_dir)

        def __call__(self):
            return train_main(self.run_dir)

except ImportError:  # pragma: no cover
    TrainJob = None


if __name__ == "__main__":  # torchrun / srun entry: python -m launcher.train RUN_DIR
    out = train_main(sys.argv[1])
    if out is not None:
        print(json.dumps(out))
