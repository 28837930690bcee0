#!/usr/bin/env python
"""Capacity plan before submitting: memory per device, FLOPs, step time and tokens/day of a config.

    python launcher/plan.py configs/md4_medium.yaml --nodes 16                  # 8 x H100-80GB per node
    python launcher/plan.py configs/md4_small.yaml --nodes 2 --gpu A100-80GB optim.micro_batch_size=16
    python launcher/plan.py configs/md4_tiny.yaml --local 2                     # this CPU machine

`submit.py --dry-run` prints the same plan. Per device (the most loaded pipeline stage):
  - model states under the ZeRO stage: this engine keeps fp32 weights (autocast computes in bf16) and fp32
    gradients; DeepSpeed adds an fp32 master partition, an fp32 gradient partition and Adam's two moments,
    divided over the data-parallel ranks (the form of DeepSpeed's own estimators, with 4-byte weights;
    with 2-byte weights the formulas are exactly estimate_zero2/zero3_model_states_mem_needs'),
  - the EMA (fp32, per model-parallel shard) and, under bf16 autocast, its cache of bf16 weight copies,
  - activations saved for backward per micro-batch (megatron's layer with SDPA attention: none, selective
    or full recompute; sequence parallelism divides the sequence terms by TP), times the micro-batches in
    flight (1, or up to PP under 1F1B),
  - the vocabulary projection at masked positions: logits, their fp32 copy and the softmax saved by the
    vocab-parallel cross-entropy, for the worst micro-batch (every position masked; antithetic times give
    one micro-batch a contiguous range of t, so one near t = 1 masks nearly all of it).
FLOPs per step come from model/flops.py (Megatron-LM's count); the step time assumes an MFU (--mfu).
The activation and state terms are checked against measured memory by tests/benchmarks/bench_memory.py.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from launcher.config import Config, ConfigError, load_config, resolve_batch  # noqa: E402

GiB = 2 ** 30


@dataclass(frozen=True)
class GPU:
    memory_gib: float
    peak_bf16: float        # dense FLOP/s
    peak_fp32: float
    native_bf16: bool = True


GPUS = {
    "H100-80GB": GPU(80, 989e12, 67e12),
    "H100-94GB": GPU(94, 989e12, 67e12),
    "H200-141GB": GPU(141, 989e12, 67e12),
    "A100-80GB": GPU(80, 312e12, 19.5e12),
    "A100-40GB": GPU(40, 312e12, 19.5e12),
    "L40S-48GB": GPU(48, 362e12, 91.6e12),
    "A10-24GB": GPU(24, 125e12, 31.2e12),
    "V100-32GB": GPU(32, 0.0, 15.7e12, native_bf16=False),
}
DEFAULT_GPU = "H100-80GB"
HEADROOM_GIB = 2.0      # CUDA context, NCCL buffers, allocator fragmentation


def round_up(n: int, k: int) -> int:
    return -(-n // k) * k


# ---------------------------------------------------------------------------------------------
# Parameters per device
# ---------------------------------------------------------------------------------------------

@dataclass
class ParamCount:
    total: int              # the whole model (vocabulary padded as the megatron model pads it, at TP = 1)
    per_device: int         # the most loaded (tensor, pipeline) shard
    largest_layer: int      # the largest single module's parameters (ZeRO-3 gathers one at a time)


def _layer_params(h: int, f: int, adaln: bool, features: int) -> tuple[int, int]:
    """(parameters split over TP, replicated) of one transformer layer."""
    split = (3 * h * h + 3 * h) + h * h + (h * f + f) + f * h     # qkv w+b, proj w, fc1 w+b, fc2 w
    replicated = h + h + 4 * h                                     # proj b, fc2 b, two LayerNorms
    if adaln:
        replicated += 6 * h * features + 6 * h
    return split, replicated


def count_params(cfg: Config) -> ParamCount:
    """Analytic count of model/denoiser.py's parameters (tests check it against the real model)."""
    from model.adaln import TIME_FEATURES

    m, d, p = cfg.model, cfg.diffusion, cfg.parallel
    h, f, L, V = m.hidden_size, m.ffn_hidden_size or 4 * m.hidden_size, m.num_layers, m.vocab_size
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    pad_to = math.lcm(m.make_vocab_size_divisible_by, tp)
    adaln = m.time_conditioning == "adaln"
    split, repl = _layer_params(h, f, adaln, TIME_FEATURES)
    first_split = first_repl = 0
    if d.kind == "prime":
        from model.diffusion.prime import prime_base

        first_repl += (prime_base(V, d.prime_l) + 1) * (h // d.prime_l)
    else:
        first_split += round_up(V + 1, pad_to) * h
        if m.position_embedding == "learned":
            first_repl += m.seq_len * h
    if m.image_shape:
        first_repl += sum(m.image_shape) * h
    last_split = round_up(V, pad_to) * h
    last_repl = 2 * h + ((2 * h * TIME_FEATURES + 2 * h) if adaln else 0)
    extra = V if d.kind == "genmd4" else 0
    total = first_split + first_repl + L * (split + repl) + last_split + last_repl + extra
    per_stage = L // pp
    body = per_stage * (split // tp + repl)
    first = first_split // tp + first_repl
    last = last_split // tp + last_repl
    per_device = body + extra + (first + last if pp == 1 else max(first, last))
    largest = max(split + repl, first_split + first_repl, last_split)
    return ParamCount(total, per_device, largest)


# ---------------------------------------------------------------------------------------------
# Memory terms
# ---------------------------------------------------------------------------------------------

def model_state_bytes(params: int, dp: int, zero_stage: int, weight_bytes: int = 4, grad_bytes: int | None = None,
                      largest_layer: int = 0) -> dict[str, float]:
    """Weights, gradients and optimizer state per device, as DeepSpeed's estimators count them: its
    estimate_zero2_model_states_mem_needs is weight_bytes = grad_bytes = 2 of the ZeRO-2 form here, and
    estimate_zero3_model_states_mem_needs the ZeRO-3 form. The optimizer holds an fp32 master partition,
    an fp32 gradient partition and Adam's two fp32 moments: 16 bytes per parameter over dp."""
    g = weight_bytes if grad_bytes is None else grad_bytes
    if zero_stage == 3:
        return {"weights": weight_bytes * params / dp, "gradients": 0.0,
                "gathered layer": 2 * weight_bytes * largest_layer, "optimizer": 16 * params / dp}
    grads = g * params if zero_stage <= 1 else g * params / dp
    return {"weights": float(weight_bytes * params), "gradients": float(grads), "optimizer": 16 * params / dp}


def activation_bytes_per_layer(cfg: Config, micro: int, compute_bytes: int, recompute: str | None = None) -> float:
    """Bytes saved for backward by one transformer layer for one micro-batch (SDPA attention: flash or
    memory-efficient kernels keep q, k, v, the output and the log-sum-exp, not the s x s scores).
    The residual stream and the LayerNorms run in fp32 under autocast; matmul outputs are compute_bytes."""
    m, p = cfg.model, cfg.parallel
    recompute = recompute or m.recompute
    s, b, h = m.seq_len, micro, m.hidden_size
    f = m.ffn_hidden_size or 4 * h
    t = p.tensor_parallel
    seq_div = t if p.sequence_parallel else 1
    c = compute_bytes
    sbh = s * b * h
    if recompute == "full":      # only each layer's input (the residual stream), fp32
        return 4 * sbh / seq_div
    # the two LayerNorm inputs (fp32), the two LayerNorm outputs as the column-parallel linears save them
    # (cast to c under autocast; a copy only then)
    seq_terms = 2 * 4 * sbh + (2 * c * sbh if c != 4 else 0)
    if m.time_conditioning == "adaln":    # modulate(LN(x)) and the gated branch outputs
        seq_terms += 2 * 4 * sbh + 2 * 4 * sbh
    if m.dropout > 0:                     # dropout masks after attention and MLP (bool)
        seq_terms += 2 * sbh
    # the qkv output (v, a view of it, keeps all of it), q and k after RoPE, the attention output (+ its
    # log-sum-exp) and its [s, b, h] copy that the projection saves; fc1 output (GELU input), GELU output
    rope = m.position_embedding == "rope"
    tp_terms = (3 + (2 if rope else 0) + 2) * c * sbh + 2 * c * s * b * f
    if recompute == "selective":          # megatron recomputes core attention: its output is not kept
        tp_terms -= c * sbh
    return seq_terms / seq_div + tp_terms / t


def vocab_projection_bytes(cfg: Config, micro: int, compute_bytes: int, masked_fraction: float = 1.0,
                           transient: bool = True) -> float:
    """The output layer at masked positions, over this rank's vocabulary shard: the vocab-parallel
    cross-entropy saves an fp32 softmax (the fp32 copy of bf16 logits is made in place of them), and in
    backward the logits' gradient exists beside it (`transient`); plus the final hidden states gathered
    over SP before the projection and their masked selection (fp32)."""
    m, p = cfg.model, cfg.parallel
    pad_to = math.lcm(m.make_vocab_size_divisible_by, p.tensor_parallel)
    v_local = round_up(m.vocab_size, pad_to) // p.tensor_parallel
    n = masked_fraction * micro * m.seq_len
    per = 4 + (4 if transient else 0)
    return n * v_local * per + 2 * 4 * micro * m.seq_len * m.hidden_size


@dataclass
class Plan:
    config: str
    world_size: int
    gpu: str | None
    device_memory_gib: float | None
    precision: str
    batch: object
    params: ParamCount
    memory: dict[str, float] = field(default_factory=dict)     # bytes per device
    activations_by_recompute: dict[str, float] = field(default_factory=dict)
    flops_per_step: float = 0.0
    mfu: float = 0.0
    step_time_s: float | None = None
    tokens_per_day: float | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> float:
        return sum(self.memory.values())


def plan_for(cfg: Config, world_size: int, *, gpus_per_node: int = 0, gpu: str | None = None, mfu: float = 0.4,
             source: str = "<config>") -> Plan:
    """The plan of `cfg` at `world_size` ranks: GPU ranks when gpus_per_node > 0 (gpu: a GPUS key, default
    H100-80GB), else CPU processes of this machine."""
    from model.flops import flops_per_token

    m, p, o = cfg.model, cfg.parallel, cfg.optim
    batch = resolve_batch(cfg, world_size, source)
    on_gpu = gpus_per_node > 0 or gpu is not None
    gpu_name = (gpu or DEFAULT_GPU) if on_gpu else None
    if gpu_name is not None and gpu_name not in GPUS:
        raise ConfigError(f"--gpu {gpu_name!r}: unknown GPU; known: {', '.join(GPUS)}")
    if gpu_name:
        spec = GPUS[gpu_name]
        native = spec.native_bf16
        resolved = "bf16" if (p.precision == "bf16" or (p.precision == "auto" and native)) else "fp32"
        precision = (f"{p.precision} -> {resolved} on {gpu_name}" if p.precision == "auto"
                     else f"{resolved} on {gpu_name}") + ("" if native else " (no native bf16)")
        mem_gib = spec.memory_gib
    else:
        from launcher.precision import resolve_precision

        pr = resolve_precision(p.precision, "cpu")
        resolved, precision = pr.resolved, pr.describe()
        try:
            import psutil

            mem_gib = psutil.virtual_memory().total / GiB / world_size
        except ImportError:   # pragma: no cover
            mem_gib = None
    c = 2 if resolved == "bf16" else 4
    params = count_params(cfg)
    plan = Plan(source, world_size, gpu_name, mem_gib, precision, batch, params)
    states = model_state_bytes(params.per_device, batch.data_parallel, p.zero_stage, 4,
                               largest_layer=params.largest_layer)
    plan.memory.update({f"{k} (fp32)" if k != "optimizer" else "optimizer: master + grad partition + Adam m, v": v
                        for k, v in states.items() if v})
    if o.ema_decay > 0:
        plan.memory["EMA (fp32)"] = 4.0 * params.per_device
    if c == 2:
        plan.memory["bf16 weight copies (autocast cache)"] = 2.0 * params.per_device
    layers = m.num_layers // p.pipeline_parallel
    in_flight = 1 if p.pipeline_parallel == 1 else min(p.pipeline_parallel, batch.grad_accum)
    for r in ("none", "selective", "full"):
        act = layers * activation_bytes_per_layer(cfg, batch.micro_batch_size, c, r)
        if r == "full":     # plus one layer's activations while it is recomputed in backward
            act += activation_bytes_per_layer(cfg, batch.micro_batch_size, c, "none")
        plan.activations_by_recompute[r] = act * in_flight
    plan.memory[f"activations ({m.recompute} recompute, {in_flight} micro-batch(es) in flight)"] = \
        plan.activations_by_recompute[m.recompute]
    plan.memory["vocabulary projection at masked positions (worst micro-batch)"] = \
        vocab_projection_bytes(cfg, batch.micro_batch_size, c)
    fpt = flops_per_token(m.num_layers, m.hidden_size, m.seq_len, m.vocab_size, m.ffn_hidden_size)
    tokens = o.global_batch_size * m.seq_len
    plan.flops_per_step = fpt * tokens
    plan.mfu = mfu
    if gpu_name:
        peak = GPUS[gpu_name].peak_bf16 if resolved == "bf16" else GPUS[gpu_name].peak_fp32
        plan.step_time_s = plan.flops_per_step / (world_size * peak * mfu)
        plan.tokens_per_day = tokens / plan.step_time_s * 86400
    if mem_gib is not None:
        usable = mem_gib - (HEADROOM_GIB if gpu_name else 0)
        if plan.total_bytes / GiB > usable:
            fixes = []
            if m.recompute != "full":
                fixes.append("model.recompute=full")
            if batch.micro_batch_size > 1:
                fixes.append(f"a smaller optim.micro_batch_size (now {batch.micro_batch_size})")
            if p.zero_stage < 3 and p.pipeline_parallel == 1:
                fixes.append("parallel.zero_stage=3")
            fixes.append("more tensor/pipeline parallelism or nodes")
            plan.warnings.append(
                f"the plan needs {plan.total_bytes / GiB:.1f} GiB per device but "
                f"{'a ' + gpu_name if gpu_name else 'this machine'} has {usable:.1f} GiB usable: it will run out "
                f"of memory; try {', '.join(fixes)}")
    return plan


def _gib(x: float) -> str:
    return f"{x / GiB:8.2f} GiB"


def render_plan(plan: Plan, prefix: str = "") -> str:
    b = plan.batch
    lines = [f"capacity plan: {plan.world_size} device(s)"
             + (f" of {plan.gpu}" if plan.gpu else " (CPU processes of this machine)"),
             f"  batch: {b.describe()}",
             f"  precision: {plan.precision}",
             f"  parameters: {plan.params.total / 1e6:.1f}M in all, {plan.params.per_device / 1e6:.1f}M on the most "
             f"loaded device"]
    lines.append("  memory per device:")
    for k, v in plan.memory.items():
        lines.append(f"    {_gib(v)}  {k}")
    lines.append(f"    {_gib(plan.total_bytes)}  total"
                 + (f" of {plan.device_memory_gib:.1f} GiB" if plan.device_memory_gib else ""))
    lines.append("  activations by model.recompute: "
                 + ", ".join(f"{r} {v / GiB:.2f} GiB" for r, v in plan.activations_by_recompute.items()))
    lines.append(f"  FLOPs per step: {plan.flops_per_step:.3e} (model/flops.py)")
    if plan.step_time_s is not None:
        lines.append(f"  at {plan.mfu:.0%} MFU: {plan.step_time_s:.3f} s/step, {plan.tokens_per_day / 1e9:.2f}B tokens/day")
    else:
        lines.append("  step time: no known peak FLOP/s for this device (measure it: tests/benchmarks/bench_step.py)")
    for w in plan.warnings:
        lines.append(f"  WARNING: {w}")
    return "\n".join(prefix + line for line in lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--nodes", type=int, default=None, help="SLURM nodes (default 1)")
    where.add_argument("--local", type=int, default=None, metavar="N", help="N CPU processes on this machine")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu", default=DEFAULT_GPU, help=f"one of {', '.join(GPUS)}")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    args = ap.parse_args(argv)
    for name, value in (("--nodes", args.nodes), ("--local", args.local), ("--gpus-per-node", args.gpus_per_node)):
        if value is not None and value < 1:
            ap.error(f"{name} must be >= 1, got {value}")
    if not 0 < args.mfu <= 1:
        ap.error(f"--mfu must be in (0, 1], got {args.mfu}")
    try:
        cfg = load_config(args.config, args.overrides)
        if args.local is not None:
            plan = plan_for(cfg, args.local, source=args.config, mfu=args.mfu)
        else:
            nodes = args.nodes or 1
            resolve_batch(cfg, nodes * args.gpus_per_node, args.config, tasks_per_unit=args.gpus_per_node)
            plan = plan_for(cfg, nodes * args.gpus_per_node, gpus_per_node=args.gpus_per_node, gpu=args.gpu,
                            mfu=args.mfu, source=args.config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(render_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
