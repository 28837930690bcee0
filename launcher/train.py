"""The training task every rank runs: megatron-core denoiser, DeepSpeed ZeRO, a masked-diffusion objective,
streamed shards. Read top to bottom, as nanoGPT's train.py:

    job = setup(cfg, run_dir)     # process groups, data check, model + engine, loaders, logging, resume
    train(job)                    # while step < train_steps: batch -> train_step -> log / eval / sample /
                                  # checkpoint when due; a preemption signal saves and requeues

`train_step` is one composition at every layout: the objective prepares each micro-batch, forward and
backward run through DeepSpeed's engine (PP = 1) or megatron's pipeline schedule (launcher/parallelize.py),
the objective finishes on the output, one host sync per optimizer step. The held-out bound and the samples
are the functions of launcher/evaluate.py and launcher/sample.py, the CLIs that use them too.

`TrainJob` is what launcher/submit.py hands to submitit (local executor or SLURM).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from launcher.config import Config, load_config, validate_world
from model import vocab_parallel
from model.diffusion.noise import step_noise
from model.flops import flops_per_token, peak_flops
from model.objectives import make_objective

LN2 = math.log(2.0)


# ----- the optimizer -------------------------------------------------------------------------

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


# ----- setup ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Job:
    """What one rank holds for a training run: what setup built, and the step counters train() advances."""
    cfg: Config
    run_dir: Path
    info: Any                  # launcher.distributed.DistInfo
    batch: Any                 # launcher.config.BatchPlan
    precision: Any             # launcher.precision.Precision
    data_dir: Path
    image_shape: list | None
    engine: Any                # DeepSpeed engine around this rank's stage (or ModelChunks)
    scheduler: Any
    objective: Any             # model.objectives.Objective
    train_loader: Any
    metrics: Any               # launcher.runlog.Metrics
    writer: Any                # launcher.runlog.RunLogger on rank 0, else None
    checkpointer: Any          # launcher.checkpoint.Checkpointer
    profiler: Any
    ema: EMA | None
    warnings: list[str]        # what this job fell back on: printed, and in resolved.json + TensorBoard
    step: int = 0
    tokens_seen: int = 0
    preemption: Any = None

    def say(self, msg: str) -> None:
        if self.info.is_main:
            print(f"[step {self.step}] {msg}", flush=True)

    def autocast(self):
        return autocast_ctx(self.precision.resolved, self.info.device)

    def forward(self, **inputs) -> torch.Tensor:
        """The denoiser under the configured autocast (the objective's reductions stay fp32). Under pipeline
        parallelism a forward-only pass through megatron's schedule, whose last-stage output every stage gets
        (evaluation and sampling run the same code on every rank)."""
        if self.info.pp_size == 1:
            with self.autocast():
                return self.engine(**inputs)
        from launcher.parallelize import model_chunks, pipeline_forward

        return pipeline_forward(model_chunks(self.engine.module), inputs, self.autocast, self.info.device)


def setup(cfg: Config, run_dir: Path) -> Job:
    """Everything before the first step, in the order a failure should be found: the world and batch split,
    the data against the config, then the model, engine and loaders, the logs, and the resume."""
    import deepspeed
    from data_pipeline.loader import build_train_loader
    from launcher.checkpoint import SPLIT_FILE, Checkpointer, install_safe_loading, provenance
    from launcher.distributed import MegatronMPU, init_distributed
    from launcher.parallelize import build_pipeline_stage, deepspeed_config, split_dims_by_stage
    from launcher.precision import resolve_precision
    from launcher.profiling import StepProfiler
    from launcher.runlog import Metrics, RunLogger

    run_dir = Path(run_dir)
    info = init_distributed(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, seed=cfg.run.seed,
                            virtual_pipeline=cfg.parallel.virtual_pipeline)
    if not torch.cuda.is_available():
        # one share of the cores per local process (oversubscribed BLAS threads thrash on CPU), unless
        # OMP_NUM_THREADS says how many (as torchrun's users set it; the test suite does under pytest-xdist)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if not threads.isdigit() or int(threads) < 1:
            threads = max(1, (os.cpu_count() or 1) // max(local, 1))
        torch.set_num_threads(int(threads))
    # the global batch is the contract; the micro-batch the largest divisor of this rank's share that is
    # <= optim.micro_batch_size (launcher.config.resolve_batch)
    batch = validate_world(cfg, info.world_size, str(run_dir / "config.yaml"))
    precision = resolve_precision(cfg.parallel.precision, info.device)
    warnings = [precision.warning] if precision.warning else []
    if precision.warning and info.is_main:
        print(f"warning: {precision.warning}", flush=True)
    data_dir, manifest = check_data(cfg, info)

    model = build_pipeline_stage(cfg.model, diffusion_cfg=cfg.diffusion,   # under VPP: ModelChunks, one module
                                 sequence_parallel=cfg.parallel.sequence_parallel)
    if cfg.checkpoint.init_from:
        # an export (any source layout): each rank slices its TP/PP shard; a resumable checkpoint, loaded by
        # resume(), takes precedence
        from launcher.export import load_into_megatron

        doc = load_into_megatron(model, cfg.checkpoint.init_from, cfg)
        if info.is_main:
            print(f"initialised from {cfg.checkpoint.init_from} ({doc['weights']} weights of step "
                  f"{doc.get('step')})", flush=True)
    objective = make_objective(cfg, model, vocab=vocab_parallel.from_parallel_state())
    optimizer = build_optimizer(model, cfg)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg)),
        config=deepspeed_config(cfg, batch), mpu=MegatronMPU(), dist_init_required=False)
    install_safe_loading(engine)   # checkpoints load weights-only: no pickled code runs

    train_loader = build_train_loader(data_dir, cfg.data.train_split, batch.micro_batch_size, info.dp_rank,
                                      info.dp_size, seed=cfg.run.seed, num_workers=cfg.data.num_workers,
                                      shuffle=cfg.data.shuffle)
    writer = None
    if info.is_main:   # TensorBoard, and wandb when logging.wandb asks for it (launcher/runlog.py)
        writer = RunLogger(run_dir, cfg, {"resolved": {
            "precision": dataclasses.asdict(precision), "batch": dataclasses.asdict(batch),
            "device": str(info.device), "world_size": info.world_size}})
    job = Job(cfg=cfg, run_dir=run_dir, info=info, batch=batch, precision=precision, data_dir=data_dir,
              image_shape=cfg.model.image_shape or manifest.get("image_shape"), engine=engine, scheduler=scheduler,
              objective=objective, train_loader=train_loader, metrics=Metrics(run_dir, writer, info.is_main),
              writer=writer,
              checkpointer=Checkpointer(run_dir / "checkpoints", cfg.checkpoint, cfg.optim.train_steps, info.rank,
                                        {**provenance(run_dir), SPLIT_FILE: json.dumps(split_dims_by_stage(model))}),
              profiler=StepProfiler(run_dir, cfg.logging.profile_steps, info.rank),
              ema=EMA(engine.module, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None, warnings=warnings)
    resume(job)
    from launcher.preemption import PreemptionHandler

    job.preemption = PreemptionHandler().install()
    return job


def check_data(cfg: Config, info) -> tuple[Path, dict]:
    """The data folder (a remote data.path is copied into the local cache, $MDIFF_DATA_CACHE_DIR, every file
    checked against its sha256) and its manifest, checked against the config before any training work. With
    data.verify_sha256 rank 0 reads every shard once (later runs only stat them: manifest.ShardDigests) and
    every rank stops on its verdict: none waits in a collective for a rank that failed."""
    from data_pipeline.loader import resolve_data_dir
    from data_pipeline.manifest import check_manifest

    data_dir = resolve_data_dir(cfg.data.path)
    manifest = check_manifest(data_dir, tokenizer=cfg.data.tokenizer, seq_len=cfg.model.seq_len,
                              vocab_size=cfg.model.vocab_size, image_shape=cfg.model.image_shape)
    if cfg.data.verify_sha256:
        verdict = [None]
        if info.is_main:
            splits = tuple(sp for sp in dict.fromkeys((cfg.data.train_split, cfg.data.val_split))
                           if sp in manifest["splits"])
            try:
                check_manifest(data_dir, verify_sha256=True, splits=splits)
            except ValueError as e:
                verdict = [str(e)]
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise ValueError(verdict[0])
    return data_dir, manifest


# ----- checkpoints -----------------------------------------------------------------------------------

def resume(job: Job) -> None:
    """From the newest verified checkpoint of the run directory, when there is one: weights, optimizer, LR
    schedule, EMA, step and token counters, each rank's data position and RNG; this config's optim settings
    applied; metrics.jsonl cut back to the resumed step."""
    from launcher.checkpoint import set_rng_state

    tag, client, extra, skipped = job.checkpointer.restore(job.engine, job.cfg.parallel, job.info.world_size)
    job.warnings.extend(skipped)   # printed by find_resumable; TensorBoard text in write_resolved
    if tag is None:
        job.say(f"no checkpoint in {job.checkpointer.root}: starting from step 0")
        return
    tag_dir = job.checkpointer.root / tag
    if job.ema is not None:
        if "ema" not in client:
            raise RuntimeError(f"{tag_dir} holds no EMA weights but optim.ema_decay > 0")
        job.ema.load_state_dict(client["ema"])
    job.step, job.tokens_seen = int(client["step"]), int(client["tokens_seen"])
    job.train_loader.load_state_dict(extra["loader"])
    set_rng_state(extra["rng"])
    apply_optim_settings(job.scheduler, job.cfg, tag_dir, job.say)
    dropped = job.metrics.truncate(job.step)
    if dropped:
        job.say(f"metrics.jsonl: dropped {dropped} record(s) past the resumed step {job.step}")
    job.say(f"resumed from {tag_dir} at step {job.step}")


def apply_optim_settings(scheduler, cfg: Config, tag_dir: Path, say) -> None:
    """Resume applies this config's optim settings, not the checkpoint's: the optimizer state loaded from the
    checkpoint carries the old lr / betas / weight decay and the scheduler the old base lr; both are reset from
    cfg.optim and the LR schedule is re-derived from it at the resumed step (grad_clip comes from the DeepSpeed
    config, built from this config). Says which settings changed."""
    import yaml

    o = cfg.optim
    then = {}
    if (tag_dir / "config.yaml").is_file():
        then = (yaml.safe_load((tag_dir / "config.yaml").read_text()) or {}).get("optim", {}) or {}
    changed = [f"optim.{k}: {then[k]!r} -> {v!r}" for k, v in dataclasses.asdict(o).items() if k in then and then[k] != v]
    if changed:
        say("resuming with changed settings (applied from this config; LR schedule re-derived): " + ", ".join(changed))
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [o.lr for _ in groups]
    scheduler.lr_lambdas = [lr_lambda(cfg) for _ in groups]
    for i, g in enumerate(groups):
        g["lr"] = o.lr * scheduler.lr_lambdas[i](scheduler.last_epoch)
        g["initial_lr"] = o.lr
        g["betas"] = (o.beta1, o.beta2)
        if i == 0:                     # the decayed group (build_optimizer)
            g["weight_decay"] = o.weight_decay
    scheduler._last_lr = [g["lr"] for g in groups]


def save(job: Job) -> None:
    from launcher.checkpoint import rng_state

    t0 = time.time()
    client = {"step": job.step, "tokens_seen": job.tokens_seen,
              **({"ema": job.ema.state_dict()} if job.ema is not None else {})}
    job.checkpointer.save(job.engine, job.step, client_state=client,
                          rank_state={"loader": job.train_loader.state_dict(), "rng": rng_state()})
    job.metrics.log(job.step, {"checkpoint_s": time.time() - t0}, to_file=False)
    job.say(f"saved checkpoint step {job.step} in {time.time() - t0:.1f}s")


# ----- one optimizer step ------------------------------------------------------------------------------

@dataclasses.dataclass
class StepResult:
    loss: float        # nelbo in nats/token, averaged over the data-parallel ranks
    data_wait: float   # seconds this step waited for data (averaged likewise)
    applied: bool      # False when DeepSpeed skipped a non-finite step (the LR schedule does not step then)


def train_step(job: Job, batches) -> StepResult:
    """One optimizer step, the same composition at every layout: the objective prepares each micro-batch with
    the step's noise (model/diffusion/noise.py), forward and backward run through DeepSpeed's engine (PP = 1)
    or megatron's pipeline schedule, the objective finishes on the output; one host sync at the end."""
    from megatron.core import parallel_state

    cfg, info = job.cfg, job.info
    mb, n, gas = job.batch.micro_batch_size, cfg.model.seq_len, job.batch.grad_accum
    wait, prepared = 0.0, []
    for m in range(gas):
        t0 = time.time()
        x0 = next(batches)
        wait += time.time() - t0
        base = (m * info.dp_size + info.dp_rank) * mb      # the global index of this micro-batch's first row
        u, noise = step_noise(cfg.run.seed, job.step, list(range(base, base + x0.shape[0])),
                              cfg.optim.global_batch_size, n, cfg.diffusion.antithetic,
                              streams=job.objective.noise_streams(train=True))
        prepared.append(job.objective.prepare(x0.to(info.device), u, noise, train=True))
    skipped_before = job.engine.skipped_steps
    nelbo = (_pipeline_step(job, prepared) if info.pp_size > 1 else _engine_step(job, prepared)) / n
    applied = job.engine.skipped_steps == skipped_before
    stats = torch.stack([nelbo.detach().double() / gas, torch.tensor(wait, dtype=torch.float64, device=nelbo.device)])
    dist.all_reduce(stats, group=parallel_state.get_data_parallel_group())
    loss, wait = (stats / info.dp_size).tolist()          # the step's one host sync
    if applied and job.ema is not None:
        job.ema.update(job.engine.module)
    return StepResult(loss, wait, applied)


def _engine_step(job: Job, prepared: list) -> torch.Tensor:
    """Gradient accumulation through DeepSpeed's engine; the summed micro-batch nelbo (nats per sequence)."""
    n, total = job.cfg.model.seq_len, torch.zeros((), dtype=torch.float64, device=job.info.device)
    for inputs, ctx in prepared:
        with job.autocast():
            out = job.engine(**inputs)
        train_loss, nelbo = job.objective.finish(out, ctx)
        job.engine.backward(train_loss.mean() / n)      # nats per token; DeepSpeed divides by GAS
        job.engine.step()
        total += nelbo.detach().mean().double()
    return total


def _pipeline_step(job: Job, prepared: list) -> torch.Tensor:
    """The micro-batches through megatron-core's 1F1B schedule (each stage runs its own backward), then ZeRO-1's
    gradient reduction and step, as DeepSpeed's own pipeline engine does. The summed micro-batch nelbo lives on
    the last stage and is broadcast to the others."""
    from megatron.core import parallel_state

    from launcher.parallelize import model_chunks, pipeline_schedule

    n = job.cfg.model.seq_len

    def loss_func_for(ctx):
        def loss_func(out):
            train_loss, nelbo = job.objective.finish(out, ctx)
            # megatron divides by the number of micro-batches, as DeepSpeed's GAS scaling does
            return train_loss.mean() / n, {"nelbo": nelbo.detach().mean()}
        return loss_func

    outs = pipeline_schedule(model_chunks(job.engine.module), prepared, False, job.autocast, loss_func_for)
    total = torch.zeros((), dtype=torch.float64, device=job.info.device)
    for o in outs:
        total += o["nelbo"].double()
    dist.broadcast(total, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    job.engine.optimizer.reduce_gradients(pipeline_parallel=True)
    job.engine.step()
    return total


# ----- the held-out bound and samples, with the EMA weights when kept ---------------------------------------

@contextmanager
def eval_weights(job: Job):
    job.engine.eval()
    saved = job.ema.swap_in(job.engine.module) if job.ema is not None else None
    try:
        yield
    finally:
        if saved is not None:
            job.ema.swap_out(job.engine.module, saved)
        job.engine.train()


def every(seconds: float, say):
    """tick(message) says message() at most every `seconds` (progress lines of long evaluations and sampling);
    message gets the time elapsed since the start."""
    t0, last = time.time(), [time.time()]

    def tick(message) -> None:
        if time.time() - last[0] > seconds:
            last[0] = time.time()
            say(message(fmt_duration(last[0] - t0)))

    return tick


def evaluate(job: Job) -> dict:
    """The held-out bound over the first logging.eval_batches x optim.micro_batch_size rows of data.val_split
    (the same rows at any layout), through launcher/evaluate.py's heldout_bound."""
    from megatron.core import parallel_state

    from data_pipeline.loader import build_eval_loader
    from launcher.evaluate import heldout_bound

    cfg, info = job.cfg, job.info
    loader = build_eval_loader(job.data_dir, cfg.data.val_split, job.batch.micro_batch_size, info.dp_rank,
                               info.dp_size, limit_rows=cfg.logging.eval_batches * cfg.optim.micro_batch_size or None)
    total, tick = _len_or_none(loader), every(10, job.say)
    with eval_weights(job):
        return heldout_bound(
            job.forward, job.objective, loader, cfg.logging.eval_draws, cfg.run.seed, cfg.model.seq_len, info.device,
            on_batch=lambda i, x0: tick(lambda el: f"held-out bound: {i}{f'/{total}' if total else ''} batches, "
                                                   f"{el} elapsed"),
            all_reduce=lambda sums: dist.all_reduce(sums, group=parallel_state.get_data_parallel_group()))


def sample(job: Job) -> tuple[str, dict]:
    """logging.num_samples samples with the `sampler` settings, shown in TensorBoard (launcher/sample.py's
    show_samples: text, or an image grid also saved as <run_dir>/samples/step_N.png). Returns (the first text
    or the PNG path, sampler stats)."""
    from launcher.sample import sampler_settings, show_samples
    from model.denoiser import gather_logits
    from model.objectives import draw_samples

    cfg, device = job.cfg, job.info.device
    calls, tick = [0], every(10, job.say)

    def denoiser(ids: torch.Tensor, t=None) -> torch.Tensor:
        calls[0] += 1
        tick(lambda el: f"sampling: network call {calls[0]} of at most {cfg.sampler.steps}, {el} elapsed")
        kw = {"t": t.to(device)} if t is not None else {}
        return gather_logits(job.forward(input_ids=ids.to(device), **kw), cfg.model.vocab_size).float()

    with eval_weights(job), torch.no_grad():
        tokens, stats = draw_samples(job.objective, denoiser, cfg.logging.num_samples, cfg.model.seq_len,
                                     generator=torch.Generator().manual_seed(cfg.run.seed + job.step),
                                     **sampler_settings(cfg.sampler))
    return show_samples(tokens, cfg.data.tokenizer, job.image_shape, job.step, job.run_dir, job.writer,
                        job.info.is_main), stats


# ----- the loop --------------------------------------------------------------------------------------------

def train(job: Job) -> dict | None:
    """Train to optim.train_steps; the result (step, tokens, held-out bound, a sample) on rank 0, None elsewhere
    and when preempted (the job is requeued and resumes)."""
    cfg, info = job.cfg, job.info
    announce(job)
    batches = iter(job.train_loader)
    tokens_per_step = cfg.optim.global_batch_size * cfg.model.seq_len
    meter = {"t": time.time(), "steps": 0, "wait": 0.0}
    val, skips_in_a_row = None, 0
    while job.step < cfg.optim.train_steps:
        job.profiler.before_step(job.step + 1)
        out = train_step(job, batches)
        job.step += 1
        job.profiler.after_step(job.step)
        job.tokens_seen += tokens_per_step
        meter["steps"] += 1
        meter["wait"] += out.data_wait
        skips_in_a_row = 0 if out.applied else skips_in_a_row + 1
        if not out.applied:
            on_skipped_step(job, skips_in_a_row)
        last = job.step == cfg.optim.train_steps
        if job.step % cfg.logging.log_interval == 0 or last:
            log_progress(job, out.loss, meter)
        if job.step % cfg.logging.eval_interval == 0 or last:
            val = evaluate(job)
            job.metrics.log(job.step, {f"val_{k}": v for k, v in val.items()})
            job.say(f"held-out {val['bits_per_token']:.4f} bits/token, perplexity bound {val['ppl_bound']:.2f} "
                    f"({val['rows']} rows, K={val['eval_draws']})")
        if cfg.logging.sample_interval and job.step % cfg.logging.sample_interval == 0:
            shown, stats = sample(job)
            job.say(f"sample ({stats.get('network_calls')} network calls): {shown[:200]!r}")
        if job.preemption.should_stop():
            save(job)
            job.say("preempted: checkpoint saved, requeueing")
            job.profiler.stop()
            if job.writer is not None:
                job.writer.close()   # requeue_and_exit ends the process without unwinding
            job.preemption.requeue_and_exit(info.rank)
            return None
        if job.checkpointer.due(job.step):
            save(job)
    job.profiler.stop()
    return finish(job, val if val is not None else evaluate(job))


def announce(job: Job) -> None:
    """The run's header lines, resolved.json, and the same as TensorBoard text."""
    cfg, info = job.cfg, job.info
    job.say(f"training {cfg.run.name}: world={info.world_size} (tp={info.tp_size} pp={info.pp_size} "
            f"{f'vpp={cfg.parallel.virtual_pipeline} ' if cfg.parallel.virtual_pipeline > 1 else ''}"
            f"dp={info.dp_size}), zero={cfg.parallel.zero_stage}, device={info.device}")
    job.say(f"precision: {job.precision.describe()}")
    job.say(f"batch: {job.batch.describe()}")
    if info.is_main:
        # what `auto` and the batch split resolved to on this job's devices; config.yaml keeps what was asked
        doc = {"precision": dataclasses.asdict(job.precision), "batch": dataclasses.asdict(job.batch),
               "device": str(info.device), "step": job.step, "warnings": job.warnings}
        (job.run_dir / "resolved.json").write_text(json.dumps(doc, indent=1) + "\n")
        job.writer.add_text("run/resolved", f"precision: {job.precision.describe()}\n\n"
                                            f"batch: {job.batch.describe()}", job.step)
        if job.warnings:
            job.writer.add_text("run/warnings", "\n\n".join(f"WARNING: {w}" for w in job.warnings), job.step)
    from model.denoiser import kernel_report, resolve_attention

    job.say(f"kernels: {kernel_report(resolve_attention(cfg.model.attention))}")


def on_skipped_step(job: Job, in_a_row: int) -> None:
    job.say(f"non-finite loss or gradients: step skipped ({in_a_row} in a row, {job.engine.skipped_steps} in total)")
    job.metrics.log(job.step, {"skipped_steps": job.engine.skipped_steps}, to_file=False)
    if in_a_row >= job.cfg.optim.max_consecutive_skips:
        save(job)
        raise RuntimeError(
            f"{in_a_row} consecutive steps with non-finite loss or gradients, the last at step {job.step}; "
            f"checkpoint saved at {job.checkpointer.root / 'latest'}; lower optim.lr or inspect the data")


def log_progress(job: Job, loss: float, meter: dict) -> None:
    """The training metrics since the last report (metrics.jsonl, TensorBoard) and one terminal line."""
    cfg = job.cfg
    dt = time.time() - meter["t"]
    grad_norm = job.engine.get_global_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    lr = job.scheduler.get_last_lr()[0]
    tps = meter["steps"] * cfg.optim.global_batch_size * cfg.model.seq_len / dt
    flops = flops_per_token(cfg.model.num_layers, cfg.model.hidden_size, cfg.model.seq_len, cfg.model.vocab_size,
                            cfg.model.ffn_hidden_size)
    achieved = tps * flops / job.info.world_size      # per device
    rec = {"train_bits_per_token": loss / LN2, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
           "tokens_seen": job.tokens_seen, "data_wait_s": meter["wait"] / meter["steps"],
           "tflops_per_device": achieved / 1e12, "peak_memory_gb": peak_memory_gb(),
           "skipped_steps": job.engine.skipped_steps}
    if job.objective.kind == "genmd4":       # the learned schedule's spread
        w = job.objective.learned_schedule().w.detach()
        rec.update(genmd4_w_min=w.min().item(), genmd4_w_max=w.max().item())
    peak = peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    if peak:
        rec["mfu"] = achieved / peak
    job.metrics.log(job.step, rec)
    left = (cfg.optim.train_steps - job.step) * dt / max(meter["steps"], 1)
    job.say(f"{job.step}/{cfg.optim.train_steps} train {rec['train_bits_per_token']:.3f} bits/token  lr {lr:.2e}  "
            f"grad {grad_norm:.2f}  {tps:.0f} tok/s  data wait {rec['data_wait_s'] * 1e3:.0f} ms/step  "
            f"ETA {fmt_duration(left)}")
    meter.update(t=time.time(), steps=0, wait=0.0)


def finish(job: Job, val: dict) -> dict | None:
    """The final sample and result.json (rank 0), writers closed."""
    cfg = job.cfg
    result = {"step": job.step, "tokens_seen": job.tokens_seen, "heldout": val}
    if cfg.logging.sample_at_end:
        text, stats = sample(job)
        result["sample"] = text
        result["sample_network_calls"] = stats.get("network_calls") if isinstance(stats, dict) else None
    if job.info.is_main:
        from data_pipeline.loader import unigram_perplexity

        result["unigram_ppl"] = unigram_perplexity(job.data_dir)
        (job.run_dir / "result.json").write_text(json.dumps(result, indent=1))
    if job.writer is not None:
        job.writer.close()
    return result if job.info.is_main else None


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
    try:
        return train(setup(cfg, run_dir))
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
