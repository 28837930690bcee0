"""Typed run configuration: YAML file + `key.sub=value` overrides, validated before anything launches.

Every section is a dataclass; unknown keys, bad types and values that the stack cannot run are errors
that name the key (and the file). `load_config(path, overrides)` is the single entry point.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config that cannot run. The message names the file and the key."""


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"          # run directory = output_dir/name
    seed: int = 1234


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    ffn_hidden_size: Optional[int] = None   # default 4 * hidden_size
    seq_len: int = 128
    vocab_size: int = 50257                 # real tokens V; the mask id is V
    dropout: float = 0.0
    position_embedding: Literal["rope", "learned"] = "rope"
    time_conditioning: Literal["none", "adaln"] = "none"   # adaln: adaLN-zero on the diffusion time t
    init_std: float = 0.02
    zero_init_output: bool = True
    make_vocab_size_divisible_by: int = 128
    attention: Literal["auto", "sdpa", "megatron"] = "auto"   # auto = sdpa (torch's fused kernels)
    recompute: Literal["none", "selective", "full"] = "none"   # activation recomputation (megatron-core)
    image_shape: Optional[list[int]] = None   # [H, W, C] for pixel data (rows HWC-flattened); null for text


@dataclass
class DiffusionConfig:
    kind: Literal["md4", "genmd4", "prime"] = "md4"
    schedule: Literal["linear", "polynomial", "cosine", "geometric"] = "linear"
    eps: float = 1e-4
    poly_exponent: float = 1.0
    geometric_bmin: float = 1e-5
    geometric_bmax: float = 20.0
    antithetic: bool = True
    prime_l: int = 2                 # Prime: sub-tokens per token (base b = ceil(V^(1/l)))
    genmd4_t1: float = 1e-3          # GenMD4: t sampled in [t1, 1], reconstruction term at t1


@dataclass
class SamplerConfig:
    steps: int = 128
    grid: Literal["cosine", "uniform"] = "cosine"
    top_p: Optional[float] = None    # None = no nucleus filtering (MD4 uses 0.98)
    temperature: float = 1.0
    use_cache: bool = True           # reuse the network output while no token changed (no time conditioning)


@dataclass
class DataConfig:
    path: str = ""                 # prepared data root (manifest.json, train/, val/)
    tokenizer: str = "gpt2"
    num_workers: int = 1
    shuffle: bool = True
    val_split: str = "val"
    train_split: str = "train"
    verify_sha256: bool = True     # check every shard against the manifest before training (cached per shard)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.03
    warmup_steps: int = 100
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0
    train_steps: int = 1000
    micro_batch_size: int = 8           # per-device maximum: the largest divisor of the per-rank share is used
    global_batch_size: int = 16         # the contract: sequences per optimizer step at any world size
    ema_decay: float = 0.0              # EMA of the weights for held-out evaluation; 0 = off (MD4: 0.9999)
    max_consecutive_skips: int = 10     # non-finite loss/gradients: skip the step; stop after this many in a row


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: int = 1                      # model chunks per pipeline rank (interleaved 1F1B); 1 = off
    sequence_parallel: bool = False                # megatron's sequence parallelism over the TP group
    zero_stage: int = 1                            # DeepSpeed ZeRO stage: 1, 2 or 3 (3: PP = 1, no EMA)
    # auto: bf16 autocast where the device computes bf16 natively, else fp32 (launcher/precision.py)
    precision: Literal["auto", "fp32", "bf16"] = "auto"


@dataclass
class CheckpointConfig:
    interval: int = 100
    keep_last: int = 2
    keep_every: int = 0              # also keep every checkpoint whose step is a multiple of this (0 = none)
    init_from: str = ""            # an export directory (launcher/export.py) to start from; ignored when resuming


@dataclass
class WandbConfig:
    """Weights & Biases beside TensorBoard (rank 0; launcher/runlog.py). mode disabled = off."""
    mode: Literal["disabled", "online", "offline"] = "disabled"
    project: str = ""              # required when mode is online or offline
    entity: str = ""               # team or user; "" = wandb's default
    name: str = ""                 # display name; "" = run.name
    group: str = ""
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 0          # the first eval_batches x micro_batch_size held-out rows (any layout); 0 = all
    eval_draws: int = 1            # K draws of t per held-out sequence
    sample_at_end: bool = True     # draw samples with the `sampler` settings when training ends
    sample_interval: int = 0       # also every this many steps (0 = only at the end); TensorBoard text / image grid
    num_samples: int = 4           # samples per drawing (text: shown in TensorBoard; images: one grid)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    profile_steps: list[int] = field(default_factory=list)   # [first, last] optimizer steps to trace into <run_dir>/profile/; [] = off


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    # ----- derived quantities -------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.parallel.tensor_parallel * self.parallel.pipeline_parallel)

    def batch_layout(self, world_size: int, source: str = "<config>") -> "BatchLayout":
        """Micro-batch, gradient accumulation and data-parallel size at `world_size` (resolve_batch)."""
        return resolve_batch(self, world_size, source)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Building a typed Config from plain dicts
# ---------------------------------------------------------------------------------------------

_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} = {value!r} must be a list")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{source}: {key} = {value!r} is not one of {list(choices)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} = {value!r} must be a bool (true/false)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} = {value!r} must be an int")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            value = float(value)    # YAML 1.1 reads 3e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} = {value!r} must be a float")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} = {value!r} must be a string")
        return value
    raise ConfigError(f"{source}: {key}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: dict, prefix: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or 'top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(f"{source}: unknown key(s) {', '.join(prefix + ('.' if prefix else '') + u for u in unknown)} "
                          f"in {where}; known keys: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name] or {}, key, source)
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, key, source)
    return cls(**kwargs)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': cannot parse value: {e}") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
            node[p] = dict(child)
            node = node[p]
        node[parts[-1]] = value
    return data


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    cfg = _build(Config, data or {}, "", source)
    validate(cfg, source)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    source = str(path)
    if overrides:
        data = apply_overrides(data, overrides)
        source = f"{path} (with overrides {' '.join(overrides)})"
    return config_from_dict(data, source)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------------------------
# Semantic validation: values that type-check but cannot run
# ---------------------------------------------------------------------------------------------

def _require(cond: bool, source: str, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{source}: {key}: {msg}")


def validate(cfg: Config, source: str = "<config>", world_size: int | None = None) -> None:
    m, d, o, p = cfg.model, cfg.diffusion, cfg.optim, cfg.parallel
    for key, val in [("model.num_layers", m.num_layers), ("model.hidden_size", m.hidden_size),
                     ("model.num_attention_heads", m.num_attention_heads), ("model.seq_len", m.seq_len),
                     ("model.vocab_size", m.vocab_size), ("optim.train_steps", o.train_steps),
                     ("optim.micro_batch_size", o.micro_batch_size),
                     ("optim.global_batch_size", o.global_batch_size),
                     ("parallel.tensor_parallel", p.tensor_parallel),
                     ("parallel.pipeline_parallel", p.pipeline_parallel),
                     ("parallel.virtual_pipeline", p.virtual_pipeline),
                     ("checkpoint.interval", cfg.checkpoint.interval),
                     ("checkpoint.keep_last", cfg.checkpoint.keep_last),
                     ("logging.log_interval", cfg.logging.log_interval),
                     ("logging.eval_interval", cfg.logging.eval_interval),
                     ("logging.eval_draws", cfg.logging.eval_draws),
                     ("model.make_vocab_size_divisible_by", m.make_vocab_size_divisible_by)]:
        _require(val >= 1, source, key, f"must be >= 1, got {val}")
    _require(m.hidden_size % m.num_attention_heads == 0, source, "model.hidden_size",
             f"{m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}")
    _require(0.0 <= m.dropout < 1.0, source, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _require(0.0 < d.eps < 0.5, source, "diffusion.eps", f"must be in (0, 0.5), got {d.eps}")
    _require(d.poly_exponent > 0, source, "diffusion.poly_exponent", "must be > 0")
    _require(0 < d.geometric_bmin < d.geometric_bmax, source, "diffusion.geometric_bmin",
             "need 0 < geometric_bmin < geometric_bmax")
    _require(d.prime_l >= 1, source, "diffusion.prime_l", f"must be >= 1, got {d.prime_l}")
    _require(d.kind != "prime" or m.position_embedding == "rope", source, "model.position_embedding",
             f"{m.position_embedding!r}: Prime's sub-token embedding is used with rope positions")
    _require(d.kind != "genmd4" or p.pipeline_parallel == 1, source, "diffusion.kind",
             "genmd4 with parallel.pipeline_parallel > 1: the learned schedule w is used on the first stage "
             "(masking) and the last (loss); keeping the two copies in sync is not implemented")
    _require(d.kind != "prime" or m.hidden_size % d.prime_l == 0, source, "diffusion.prime_l",
             f"model.hidden_size={m.hidden_size} is not divisible by prime_l={d.prime_l} (sub-embeddings are concatenated)")
    _require(0.0 < d.genmd4_t1 < 1.0, source, "diffusion.genmd4_t1", f"must be in (0, 1), got {d.genmd4_t1}")
    sp = cfg.sampler
    _require(sp.steps >= 1, source, "sampler.steps", f"must be >= 1, got {sp.steps}")
    _require(sp.top_p is None or 0.0 < sp.top_p <= 1.0, source, "sampler.top_p", f"must be in (0, 1] or null, got {sp.top_p}")
    _require(sp.temperature > 0 and math.isfinite(sp.temperature), source, "sampler.temperature",
             f"must be a positive number, got {sp.temperature}")
    _require(o.lr > 0 and math.isfinite(o.lr), source, "optim.lr", f"must be a positive number, got {o.lr}")
    _require(0 <= o.min_lr_ratio <= 1, source, "optim.min_lr_ratio", "must be in [0, 1]")
    _require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, source, "optim.beta1/beta2", "must be in [0, 1)")
    _require(o.warmup_steps >= 0, source, "optim.warmup_steps", "must be >= 0")
    _require(o.grad_clip >= 0, source, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    _require(p.zero_stage in (0, 1, 2, 3), source, "parallel.zero_stage", f"must be 0, 1, 2 or 3, got {p.zero_stage}")
    _require(m.num_attention_heads % p.tensor_parallel == 0, source, "parallel.tensor_parallel",
             f"model.num_attention_heads={m.num_attention_heads} is not divisible by tensor_parallel={p.tensor_parallel}")
    _require(not p.sequence_parallel or p.tensor_parallel > 1, source, "parallel.sequence_parallel",
             "true needs parallel.tensor_parallel > 1 (it splits the sequence over the tensor-parallel group)")
    _require(not p.sequence_parallel or m.seq_len % p.tensor_parallel == 0, source, "parallel.sequence_parallel",
             f"model.seq_len={m.seq_len} is not divisible by tensor_parallel={p.tensor_parallel}")
    _require(m.num_layers % p.pipeline_parallel == 0, source, "parallel.pipeline_parallel",
             f"model.num_layers={m.num_layers} is not divisible by pipeline_parallel={p.pipeline_parallel}")
    _require(p.virtual_pipeline == 1 or p.pipeline_parallel > 1, source, "parallel.virtual_pipeline",
             f"{p.virtual_pipeline} needs parallel.pipeline_parallel > 1 (model chunks are interleaved over the "
             f"pipeline ranks), got pipeline_parallel={p.pipeline_parallel}")
    _require(m.num_layers % (p.pipeline_parallel * p.virtual_pipeline) == 0, source, "parallel.virtual_pipeline",
             f"model.num_layers={m.num_layers} is not divisible by pipeline_parallel x virtual_pipeline = "
             f"{p.pipeline_parallel} x {p.virtual_pipeline} (every model chunk holds the same number of layers)")
    _require(p.pipeline_parallel == 1 or p.zero_stage == 1, source, "parallel.zero_stage",
             f"{p.zero_stage} with parallel.pipeline_parallel={p.pipeline_parallel}: ZeRO-2 and -3 partition "
             "gradients inside DeepSpeed's backward, which megatron's 1F1B pipeline schedule bypasses; use zero_stage 1")
    _require(p.zero_stage in (1, 2, 3), source, "parallel.zero_stage",
             f"{p.zero_stage}: use 1, 2 or 3 (without ZeRO, DeepSpeed would not skip steps whose gradients are "
             "not finite)")
    _require(p.zero_stage != 3 or o.ema_decay == 0, source, "optim.ema_decay",
             f"{o.ema_decay} with parallel.zero_stage=3: the EMA copies whole weights, which ZeRO-3 holds only as "
             "partitions between forward passes; use zero_stage 1 or 2 with an EMA")
    _require(p.zero_stage != 3 or d.kind != "genmd4", source, "diffusion.kind",
             "genmd4 with parallel.zero_stage=3: the learned schedule w is read outside the network's forward, "
             "where ZeRO-3 holds only a partition of it; use zero_stage 1 or 2")
    _require(0.0 <= o.ema_decay < 1.0, source, "optim.ema_decay", f"must be in [0, 1), got {o.ema_decay}")
    _require(o.max_consecutive_skips >= 1, source, "optim.max_consecutive_skips", "must be >= 1")
    _require(cfg.data.num_workers >= 0, source, "data.num_workers", "must be >= 0")
    if m.image_shape is not None:
        _require(len(m.image_shape) == 3 and all(int(v) >= 1 for v in m.image_shape), source, "model.image_shape",
                 f"must be [H, W, C] with positive sizes, got {m.image_shape}")
        _require(math.prod(m.image_shape) == m.seq_len, source, "model.image_shape",
                 f"{m.image_shape} holds {math.prod(m.image_shape)} sub-pixels but model.seq_len={m.seq_len}")
    _require(cfg.logging.sample_interval >= 0, source, "logging.sample_interval", "must be >= 0 (0 = only at the end)")
    _require(cfg.logging.num_samples >= 1, source, "logging.num_samples", f"must be >= 1, got {cfg.logging.num_samples}")
    _require(cfg.checkpoint.keep_every >= 0, source, "checkpoint.keep_every", "must be >= 0 (0 keeps only the last k)")
    _require(cfg.logging.eval_batches >= 0, source, "logging.eval_batches", "must be >= 0")
    wb = cfg.logging.wandb
    _require(wb.mode == "disabled" or wb.project.strip() != "", source, "logging.wandb.project",
             f"must be set when logging.wandb.mode is {wb.mode!r}")
    ps = cfg.logging.profile_steps
    _require(ps == [] or (len(ps) == 2 and 1 <= ps[0] <= ps[1]), source, "logging.profile_steps",
             f"must be [] (off) or [first, last] optimizer steps with 1 <= first <= last, got {ps}")
    if world_size is not None:
        validate_world(cfg, world_size, source)


@dataclass(frozen=True)
class BatchLayout:
    """How optim.global_batch_size is split at one world size: per step every data-parallel rank runs
    grad_accum micro-batches of micro_batch_size sequences (micro_batch_size x grad_accum x data_parallel
    = global_batch_size)."""
    world_size: int
    data_parallel: int
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int
    requested_micro_batch_size: int

    def describe(self) -> str:
        capped = ("" if self.micro_batch_size == self.requested_micro_batch_size
                  else f" (optim.micro_batch_size={self.requested_micro_batch_size} is the per-device maximum)")
        return (f"global batch {self.global_batch_size} = micro-batch {self.micro_batch_size} x gradient accumulation "
                f"{self.grad_accum} x data-parallel {self.data_parallel}{capped}")


def _split(cfg: Config, world_size: int) -> tuple[int, int, int] | None:
    """(dp, micro, gas) or None: the largest micro-batch <= optim.micro_batch_size that divides the per-rank
    share of the global batch, with megatron's interleaved schedule's rule on the micro-batch count."""
    p, o = cfg.parallel, cfg.optim
    mp = p.tensor_parallel * p.pipeline_parallel
    if world_size < 1 or world_size % mp:
        return None
    dp = world_size // mp
    if o.global_batch_size % dp:
        return None
    share = o.global_batch_size // dp
    for micro in range(min(o.micro_batch_size, share), 0, -1):
        gas = share // micro
        if share % micro:
            continue
        # megatron-core 0.16.1's forward_backward_pipelining_with_interleaving runs the micro-batches in groups
        # of microbatch_group_size_per_vp_stage (= pipeline_parallel) per model chunk: it raises ValueError
        # unless PP <= M and RuntimeError unless M % PP == 0 (a last group of 0 < M % PP < PP micro-batches)
        if p.virtual_pipeline > 1 and gas % p.pipeline_parallel:
            continue
        return dp, micro, gas
    return None


def working_sizes(cfg: Config, tasks_per_unit: int = 1, up_to: int = 64) -> list[int]:
    """The unit counts n <= up_to (nodes of tasks_per_unit tasks, or local processes) at which the global
    batch splits over the data-parallel ranks."""
    return [n for n in range(1, up_to + 1) if _split(cfg, n * tasks_per_unit) is not None]


def resolve_batch(cfg: Config, world_size: int, source: str = "<config>", tasks_per_unit: int | None = None,
                  unit: str = "nodes") -> BatchLayout:
    """The global batch is the contract and the micro-batch a per-device maximum. Only a global batch that
    cannot be split over the data-parallel ranks at all is an error; it lists the sizes that would work
    (`unit` counts of `tasks_per_unit` tasks: nodes of G GPUs, or local processes)."""
    p, o = cfg.parallel, cfg.optim
    mp = p.tensor_parallel * p.pipeline_parallel
    _require(world_size % mp == 0, source, "parallel",
             f"world size {world_size} is not divisible by tensor_parallel x pipeline_parallel = {mp}")
    split = _split(cfg, world_size)
    if split is None:
        dp = world_size // mp
        per = tasks_per_unit or 1
        ok = working_sizes(cfg, per, up_to=max(64, 2 * world_size // per))
        where = f"{unit} of {per} tasks each" if tasks_per_unit and unit == "nodes" else unit
        hint = (f"; it splits at {', '.join(map(str, ok[:16]))}{' ...' if len(ok) > 16 else ''} {where}" if ok
                else "; no world size up to 64 units splits it: change optim.global_batch_size")
        if o.global_batch_size % dp:
            why = f"{o.global_batch_size} sequences do not split over {dp} data-parallel ranks"
        else:
            why = (f"{o.global_batch_size // dp} sequences per data-parallel rank cannot be cut into a multiple of "
                   f"parallel.pipeline_parallel={p.pipeline_parallel} micro-batches of at most "
                   f"optim.micro_batch_size={o.micro_batch_size} (parallel.virtual_pipeline={p.virtual_pipeline}: "
                   "megatron's interleaved schedule)")
        raise ConfigError(f"{source}: optim.global_batch_size: {why} (world size {world_size} = "
                          f"tensor_parallel {p.tensor_parallel} x pipeline_parallel {p.pipeline_parallel} x "
                          f"data_parallel {dp}){hint}")
    dp, micro, gas = split
    return BatchLayout(world_size, dp, micro, gas, o.global_batch_size, o.micro_batch_size)


def validate_world(cfg: Config, world_size: int, source: str = "<config>", tasks_per_unit: int | None = None,
                   unit: str = "nodes") -> BatchLayout:
    """The config at `world_size` ranks: the layout fits and the global batch splits; returns the split."""
    return resolve_batch(cfg, world_size, source, tasks_per_unit, unit)
