"""The parallel layout, applied in one place (as torchtitan's parallelize.py): which part of the denoiser
this rank builds and how its gradients and optimizer state are shared.

- process groups: `init_model_parallel` sets up megatron's parallel_state (TP x PP x VPP; DP is the rest of
  the world) over the world torch.distributed started (gloo on CPU, NCCL on GPUs);
- tensor parallelism: megatron's column/row-parallel layers split themselves; `tp_split_dims` reads each
  parameter's split dimension from megatron's own `tensor_model_parallel` / `partition_dim` attributes
  (`split_dims_by_stage` records them in every checkpoint for export);
- sequence parallelism: `sum_sequence_parallel_grads` hooks the TP gradient sums of replicated parameters;
- pipeline parallelism: `build_pipeline_stage` builds this rank's stage, or its `ModelChunks` under
  interleaved PP, from the same initial weights at every layout; `global_parameter_name` maps a rank's
  parameter names to the whole model's (export and init_from read it); `pipeline_schedule` runs megatron's
  (interleaved) 1F1B schedule over a step's micro-batches, `pipeline_forward` a forward-only pass;
- data parallelism and ZeRO: `deepspeed_config` for DeepSpeed's engine.

The network itself (model/denoiser.py) and the masked-diffusion math (model/diffusion/) know none of this.
"""
from __future__ import annotations

import functools
import re
from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from torch import Tensor

from model.denoiser import MaskedDiffusionTransformer, build_denoiser
from model.objectives import network_parts


# ----- process groups ---------------------------------------------------------------------------------------

def init_model_parallel(tensor_parallel: int = 1, pipeline_parallel: int = 1, seed: int = 1234,
                        virtual_pipeline: int = 1) -> None:
    """After torch.distributed is initialised: apply the CPU layer (if no CUDA), set up megatron's
    parallel_state (TP x PP, virtual_pipeline model chunks per pipeline rank; DP is what is left of the world)
    and seed. Call once per process."""
    from launcher import megatron_cpu

    megatron_cpu.apply()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel,
            virtual_pipeline_model_parallel_size=virtual_pipeline if virtual_pipeline > 1 else None)
    megatron_cpu.seed_model_parallel(seed)


# ----- tensor and sequence parallelism ----------------------------------------------------------------------

def tp_split_dims(model: torch.nn.Module) -> dict[str, int | None]:
    """{parameter name: the dimension megatron splits it along over TP, None when replicated}."""
    return {name: (p.partition_dim if getattr(p, "tensor_model_parallel", False) else None)
            for name, p in model.named_parameters()}


def split_dims_by_stage(model: torch.nn.Module) -> dict[str, dict[str, int | None]]:
    """Collective: {pipeline rank: tp_split_dims of its stage (or ModelChunks)} over the whole world, gathered
    once at setup and written into every checkpoint (tp_split.json), so that export consolidates the shards
    along megatron's own split dimensions without building a model."""
    import torch.distributed as dist

    mine = (parallel_state.get_pipeline_model_parallel_rank(), tp_split_dims(model))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return {str(p): dims for p, dims in sorted(dict(every).items())}


def sum_sequence_parallel_grads(model: torch.nn.Module) -> int:
    """Under sequence parallelism, parameters marked `sequence_parallel` (norms, row-parallel biases) are
    replicated over TP but each rank's gradient covers only its sequence slice: a hook on each sums the
    slices over the TP group as the gradient is produced, before DeepSpeed's gradient hooks read it (what
    megatron's finalize_model_grads does for megatron's own DDP). Returns the number of hooked parameters."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return 0
    group = parallel_state.get_tensor_model_parallel_group()

    def hook(grad: Tensor) -> Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=group)
        return grad

    hooked = 0
    for p in model.parameters():
        if p.requires_grad and getattr(p, "sequence_parallel", False):
            p.register_hook(hook)
            hooked += 1
    return hooked


# ----- pipeline parallelism ---------------------------------------------------------------------------------

class ModelChunks(torch.nn.Module):
    """The model chunks (virtual pipeline stages) of one pipeline rank as one module, so that DeepSpeed's one
    engine (ZeRO, gradient clipping, checkpoints) and the EMA see every chunk's parameters. Parameter names are
    `chunks.<vp_stage>.<the chunk's own name>`. megatron's interleaved schedule runs the chunks themselves
    (`model_chunks(module)`); this container has no forward of its own."""

    def __init__(self, chunks: list[MaskedDiffusionTransformer]):
        super().__init__()
        self.chunks = torch.nn.ModuleList(chunks)

    @property
    def config(self) -> TransformerConfig:
        return self.chunks[0].config

    def forward(self, *args, **kwargs):
        raise RuntimeError("ModelChunks has no forward of its own: megatron's interleaved pipeline schedule runs "
                           "each of model_chunks(module)")


def model_chunks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The list of model chunks megatron's schedules take: [module] for one stage, the chunks of a ModelChunks."""
    return list(module.chunks) if isinstance(module, ModelChunks) else [module]


def build_pipeline_stage(model_cfg, *, diffusion_cfg=None, params_dtype: torch.dtype = torch.float32,
                         sequence_parallel: bool = False) -> torch.nn.Module:
    """This rank's part of the denoiser (megatron's parallel_state says which): the whole model at PP=1, its
    pipeline stage under PP, and under interleaved PP (virtual pipeline size VPP) a `ModelChunks` of VPP chunks,
    chunk c holding the layers megatron assigns it ((c * PP + p) * L / (PP * VPP) ... on pipeline rank p; the
    embedding only on chunk 0 of rank 0, the output layer only on the last chunk of the last rank).

    On CPU (megatron's `use_cpu_initialization`) the initial weights do not depend on the layout: the
    full model is drawn with the same generator as at PP=1 and each stage or chunk keeps its slice of it
    (`global_parameter_name`), so every layout starts from the same weights. The generator is left where the
    PP=1 build leaves it."""
    stage = _build_stage(model_cfg, diffusion_cfg, params_dtype, sequence_parallel)
    if sequence_parallel:
        for chunk in model_chunks(stage):
            sum_sequence_parallel_grads(chunk)
    return stage


def _build_stage(model_cfg, diffusion_cfg, params_dtype, sequence_parallel):
    def build(**kw) -> MaskedDiffusionTransformer:   # the diffusion kind's parts are fresh modules per chunk
        return build_denoiser(model_cfg, params_dtype=params_dtype,
                              **network_parts(diffusion_cfg, model_cfg.vocab_size), **kw)

    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp == 1:
        return build(sequence_parallel=sequence_parallel)
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()

    def build_chunks() -> list[MaskedDiffusionTransformer]:
        return [build(vp_stage=vp, sequence_parallel=sequence_parallel,
                      pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                      post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp))
                for vp in ([None] if vpp is None else range(vpp))]

    if torch.cuda.is_available():   # GPU initialisation is per rank (megatron's RNG tracker) anyway
        chunks = build_chunks()
        return chunks[0] if vpp is None else ModelChunks(chunks)
    full = build(whole_model=True).state_dict()
    after_full = torch.get_rng_state()
    chunks = build_chunks()
    torch.set_rng_state(after_full)
    stage = chunks[0] if vpp is None else ModelChunks(chunks)
    stage.load_state_dict(stage_state_dict(full, stage.state_dict().keys(), model_cfg.num_layers))
    return stage


def stage_state_dict(full: dict, stage_keys, num_layers: int) -> dict:
    """The entries of a full (PP=1) state dict that this rank's stage or ModelChunks holds, under its own names
    (megatron's parallel_state gives the layout; `global_parameter_name` the mapping)."""
    layout = current_layout()
    out = {}
    for key in stage_keys:
        src = global_parameter_name(key, num_layers=num_layers, **layout)
        if src not in full:
            raise KeyError(f"{src} (stage parameter {key}) is not in the full state dict")
        out[key] = full[src]
    return out


# ----- running the pipeline --------------------------------------------------------------------------------

def pipeline_schedule(chunks: list, microbatches: list, forward_only: bool, autocast: Callable,
                      loss_func_for: Callable | None = None) -> list:
    """megatron-core's pipeline schedule over `microbatches` = [(model kwargs, ctx)]: 1F1B over this rank's
    stage, or interleaved 1F1B over its model chunks (virtual pipeline), each chunk reading the micro-batches
    from its own iterator (only the first chunk of the first rank uses the inputs, only the last chunk of the
    last rank the loss: loss_func_for(ctx) -> megatron's loss_func). autocast() is the forward's precision
    context. Returns the last stage's outputs or loss records (nothing elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dtype = chunks[0].config.pipeline_dtype

    def forward_step(data_iterator, model):
        inputs, ctx = next(data_iterator)
        with autocast():
            out = model(**inputs)
        if not model.post_process:   # what travels to the next stage or chunk has the schedule's dtype
            out = out.to(dtype)
        return out, (loss_func_for(ctx) if loss_func_for is not None else None)

    b, s = next(iter(microbatches[0][0].values())).shape[:2]
    return get_forward_backward_func()(
        forward_step_func=forward_step, model=chunks,
        data_iterator=iter(microbatches) if len(chunks) == 1 else [iter(microbatches) for _ in chunks],
        num_microbatches=len(microbatches), seq_length=s, micro_batch_size=b, forward_only=forward_only)


def pipeline_forward(chunks: list, inputs: dict, autocast: Callable, device: torch.device) -> Tensor:
    """Forward-only through the pipeline; the last stage's output, broadcast to every pipeline rank (so that
    evaluation and sampling run the same code on every rank). Under interleaved PP megatron's schedule takes a
    multiple of PP micro-batches: the rows are split into PP equal micro-batches (the last row repeated to fill
    them; the copies are dropped again), which gives the same rows as one micro-batch, every row's forward being
    independent of the others."""
    import torch.distributed as dist

    if len(chunks) > 1:
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        rows = next(iter(inputs.values())).shape[0]
        per = -(-rows // pp)
        fill = per * pp - rows
        padded = {k: torch.cat([v, v[-1:].expand(fill, *v.shape[1:])]) if fill else v for k, v in inputs.items()}
        outs = pipeline_schedule(chunks, [({k: v[i * per:(i + 1) * per] for k, v in padded.items()}, None)
                                          for i in range(pp)], True, autocast)
        outs = [torch.cat(outs)[:rows]] if outs else outs
    else:
        outs = pipeline_schedule(chunks, [(inputs, None)], True, autocast)
    group = parallel_state.get_pipeline_model_parallel_group()
    src = parallel_state.get_pipeline_model_parallel_last_rank()
    if parallel_state.is_pipeline_last_stage():
        out = outs[0].contiguous()
        meta = torch.tensor([out.dim(), *out.shape] + [0] * (4 - out.dim()), dtype=torch.int64, device=device)
    else:
        meta = torch.zeros(5, dtype=torch.int64, device=device)
    dist.broadcast(meta, src=src, group=group)
    if not parallel_state.is_pipeline_last_stage():
        out = torch.empty(meta[1:1 + int(meta[0])].tolist(), dtype=torch.float32, device=device)
    dist.broadcast(out, src=src, group=group)
    return out


# ----- where a pipeline rank's parameters sit in the whole model ------------------------------------------

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_CHUNK = re.compile(r"^chunks\.(\d+)\.")


def current_layout() -> dict:
    """This rank's (pipeline_parallel, virtual_pipeline, pp_rank) from megatron's parallel_state, as the keyword
    arguments of `global_parameter_name`."""
    return {"pipeline_parallel": parallel_state.get_pipeline_model_parallel_world_size(),
            "virtual_pipeline": parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1,
            "pp_rank": parallel_state.get_pipeline_model_parallel_rank()}


@functools.lru_cache(maxsize=None)
def layer_offset(num_layers: int, pipeline_parallel: int, virtual_pipeline: int, pp_rank: int,
                 vp_stage: int = 0) -> int:
    """Global index of the first decoder layer of pipeline rank `pp_rank`'s stage (chunk `vp_stage` under
    interleaved PP), as megatron-core places it (transformer_layer.get_transformer_layer_offset, the offset
    TransformerBlock builds its layers at): p * L / PP without virtual stages, (c * PP + p) * L / (PP * VPP)
    with them."""
    if pipeline_parallel == 1:
        return 0
    vpp = virtual_pipeline if virtual_pipeline > 1 else None
    layout = TransformerConfig(num_layers=num_layers, hidden_size=1, num_attention_heads=1,
                               pipeline_model_parallel_size=pipeline_parallel, pipeline_dtype=torch.float32,
                               virtual_pipeline_model_parallel_size=vpp)
    return get_transformer_layer_offset(layout, vp_stage=vp_stage if vpp else None, pp_rank=pp_rank)


def global_parameter_name(name: str, *, num_layers: int, pipeline_parallel: int, pp_rank: int,
                          virtual_pipeline: int = 1) -> str:
    """A parameter (state-dict) name of pipeline rank `pp_rank`'s module -> its name in the whole TP=1, PP=1
    model: the ModelChunks prefix `chunks.<c>.` (present exactly when virtual_pipeline > 1) is dropped and
    `decoder.layers.<i>.` becomes the global layer number (layer_offset). Tensor-parallel shards keep
    their names."""
    m = _CHUNK.match(name)
    if (m is not None) != (virtual_pipeline > 1):
        raise ValueError(f"{name}: " + (f"a model chunk's parameter, but virtual_pipeline={virtual_pipeline}" if m
                                        else f"no 'chunks.<c>.' prefix under virtual_pipeline={virtual_pipeline}"))
    vp_stage = 0
    if m is not None:
        vp_stage, name = int(m[1]), name[m.end():]
        if vp_stage >= virtual_pipeline:
            raise ValueError(f"chunks.{vp_stage}.{name}: chunk {vp_stage} of virtual_pipeline={virtual_pipeline}")
    offset = layer_offset(num_layers, pipeline_parallel, virtual_pipeline, pp_rank, vp_stage)
    return _LAYER.sub(lambda k: f"decoder.layers.{int(k[1]) + offset}.", name)


# ----- data parallelism and ZeRO ----------------------------------------------------------------------------

def deepspeed_config(cfg, batch) -> dict:
    """DeepSpeed's config for a resolved config and its batch split `batch` (launcher.config.BatchLayout)."""
    o, p = cfg.optim, cfg.parallel
    gas, micro = batch.grad_accum, batch.micro_batch_size
    if p.pipeline_parallel > 1:
        # megatron's pipeline schedule runs the micro-batches; DeepSpeed sees one step per global batch
        micro, gas = micro * gas, 1
    return {
        "train_batch_size": o.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": {"stage": p.zero_stage},
        "zero_allow_untested_optimizer": True,
        # bf16 is applied by torch.autocast over fp32 master weights (fp32 loss reductions)
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
