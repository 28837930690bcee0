"""The denoiser: a bidirectional transformer over V real tokens plus a mask token, built from megatron-core.

Input vocabulary: V + 1 ids (the mask id is V), padded to a multiple of lcm(make_vocab_size_divisible_by, TP).
Output classes: exactly the V real tokens (the mask is never predicted), padded likewise; padded
classes get logit -inf, so the model's distribution is over the V real tokens at any TP size.

forward(input_ids [b, s], labels [b, s]) -> per-token NLL [b, s] float32, computed vocab-parallel (full
logits are never gathered in training); forward(input_ids) -> vocab-parallel logits [b, s, V_out / TP];
`gather_logits` turns those into full [b, s, V] for sampling and evaluation.

What a diffusion kind adds to the network arrives as plain arguments (model.objectives.network_parts):
`input_digits` l > 0 replaces the input embedding by Prime's sub-token embedding (input_ids are digits
[b, s, l]; output logits stay over the V tokens); `extra_modules` are registered as submodules so they
train and checkpoint with the network (GenMD4's learned schedule `genmd4_schedule`, w = softplus(raw)).

Time conditioning (model.time_conditioning = adaln): adaLN-zero (model/adaln.py); forward then takes t [b],
every layer is AdaLNTransformerLayer and gets the features of t as the block's `context`.

Images (model.image_shape = [H, W, C]): rows are HWC-flattened 8-bit sub-pixels, one token each (V = 256
plus the mask); learned row, column and channel embeddings are added to the token embedding, RoPE runs
over the flattened index. Every sub-pixel is its own token, as in MD4's pixel models (no patching), so
the ELBO is per dimension and bits/dim need no correction.

Pipeline parallelism: a stage built with pre_process=False takes its input from `set_input_tensor` (megatron's
schedules call it) and ignores input_ids; a stage with post_process=False returns hidden states [s, b, h].
Which stages and chunks a rank builds, the sequence-parallel gradient hooks and the DeepSpeed config are
the parallel layout, applied in launcher/parallelize.py.

The denoiser knows nothing about which diffusion it serves (model/diffusion/ holds the math).
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (TransformerBlock, TransformerBlockSubmodules,
                                                         get_num_layers_to_build)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import get_pg_rank

from model.adaln import TIME_FEATURES, modulate, timestep_features, zero_linear
from model.pixels import PixelPositionEmbedding


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class SDPACoreAttention(MegatronModule):
    """megatron's core-attention interface on torch.nn.functional.scaled_dot_product_attention, without a
    mask (every position attends to every position). torch picks the kernel: FlashAttention-2 or the
    memory-efficient kernel on GPUs, a fused CPU kernel otherwise. Same math as megatron's
    DotProductAttention (scale 1/sqrt(head dim), dropout on the probabilities), no parameters."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.no_mask:
            raise ValueError(f"SDPACoreAttention is bidirectional; got attn_mask_type={attn_mask_type}")
        if config.context_parallel_size > 1:
            raise ValueError("SDPACoreAttention does not implement context parallelism")
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale   # None: 1/sqrt(head dim), megatron's default

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params=None) -> Tensor:
        if attention_mask is not None or attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPACoreAttention takes no mask, bias or packed sequences")
        s, b, heads, hd = query.shape                      # [s, b, heads/TP, head dim]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))   # [b, heads, s, hd]
        p = self.dropout if self.training else 0.0
        if p > 0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.softmax_scale,
                                                     enable_gqa=k.size(1) != heads)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.softmax_scale,
                                                 enable_gqa=k.size(1) != heads)
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * hd)


ATTENTION_BACKENDS = ("sdpa", "megatron")


def resolve_attention(choice: str) -> str:
    """model.attention: 'auto' = torch SDPA (fused flash / memory-efficient kernels where the device has
    them); 'megatron' = megatron-core's unfused DotProductAttention (the reference path)."""
    if choice == "auto":
        return "sdpa"
    if choice not in ATTENTION_BACKENDS:
        raise ValueError(f"model.attention={choice!r}: use auto, {' or '.join(ATTENTION_BACKENDS)}")
    return choice


def kernel_report(attention: str) -> str:
    """What runs, for the start-of-training log line."""
    spec = bidirectional_layer_spec(attention)
    norm = spec.submodules.input_layernorm
    norm_name = "torch LayerNorm" if norm is TorchLayerNorm else f"{norm.__module__}.{norm.__name__}"
    attn = ("torch scaled_dot_product_attention (flash / memory-efficient / CPU fused, torch's choice)"
            if attention == "sdpa" else "megatron-core DotProductAttention (unfused)")
    opt = "torch AdamW (fused)" if torch.cuda.is_available() else "torch AdamW (foreach)"
    return f"attention={attn}; norm={norm_name}; optimizer={opt}"


class TorchLayerNorm(torch.nn.LayerNorm):
    """megatron's norm interface (what WrappedTorchNorm builds) on torch.nn.LayerNorm, with sequence
    parallelism, which WrappedTorchNorm refuses. Under SP each tensor-parallel rank normalises only its
    slice of the sequence, so the gradients of the (replicated) weight and bias are partial sums; they
    carry megatron's `sequence_parallel` marker, like apex's FusedLayerNorm's and the row-parallel biases,
    and `sum_sequence_parallel_grads` completes them over the TP group."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization != "LayerNorm":
            raise ValueError(f"TorchLayerNorm implements LayerNorm, not {config.normalization}")
        if config.layernorm_zero_centered_gamma or config.memory_efficient_layer_norm:
            raise ValueError("TorchLayerNorm: zero-centred gamma / memory-efficient layer norm are apex features")
        super().__init__(hidden_size, eps=eps)
        for p in self.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)


class AutocastInputColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    """megatron's ColumnParallelLinear whose input is first cast to the autocast dtype when torch.autocast is
    on (fp32 master weights with bf16 compute, this engine's bf16). Under sequence parallelism megatron's
    backward reduce-scatters the input gradient (autocast dtype) into a buffer of the saved input's dtype
    (fp32), which NCCL and gloo refuse ("Check failed: outputTensors[i].dtype() == inputTensors[i].dtype()");
    the cast is the one autocast applies inside the matmul anyway, so the numbers are unchanged, and the
    sequence all-gather moves half the bytes."""

    def forward(self, input_: Tensor, *args, **kwargs):
        device = input_.device.type
        if torch.is_autocast_enabled(device):
            input_ = input_.to(torch.get_autocast_dtype(device))
        return super().forward(input_, *args, **kwargs)


class AdaLNTransformerLayer(TransformerLayer):
    """megatron's transformer layer (same submodules: norms, self-attention, MLP) with adaLN-zero time
    conditioning (model/adaln.py): `ada_ln` maps the time features, which the block passes to every layer
    as its `context`, to shift / scale after each norm and a gate on each residual branch. `ada_ln` is
    replicated over TP; under sequence parallelism it meets one sequence slice per rank, so it carries the
    `sequence_parallel` marker (its gradient is summed over TP)."""

    def __init__(self, config: TransformerConfig, submodules, layer_number: int = 1,
                 hidden_dropout: Optional[float] = None, **kwargs):
        super().__init__(config, submodules, layer_number=layer_number, hidden_dropout=hidden_dropout, **kwargs)
        self.ada_ln = zero_linear(TIME_FEATURES, 6 * config.hidden_size, dtype=config.params_dtype)
        for p in self.ada_ln.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                context: Optional[Tensor] = None, rotary_pos_emb: Optional[Tensor] = None, **unused):
        if context is None:
            raise ValueError("AdaLNTransformerLayer needs the time features as `context` [b, TIME_FEATURES]")
        mod = self.ada_ln(context).to(hidden_states.dtype).unsqueeze(0)       # [1, b, 6 D]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        x = modulate(self.input_layernorm(hidden_states), shift1, scale1)
        out, bias = self.self_attention(x, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb)
        hidden_states = hidden_states + gate1 * self._dropout(out, bias)
        x = modulate(self.pre_mlp_layernorm(hidden_states), shift2, scale2)
        out, bias = self.mlp(x)
        hidden_states = hidden_states + gate2 * self._dropout(out, bias)
        return hidden_states, context

    def _dropout(self, out: Tensor, bias: Optional[Tensor]) -> Tensor:
        if bias is not None:
            out = out + bias
        with self.bias_dropout_add_exec_handler():    # megatron's RNG fork under sequence parallelism
            return F.dropout(out, p=self.hidden_dropout, training=self.training)


def bidirectional_layer_spec(attention: str = "sdpa", time_conditioning: str = "none") -> ModuleSpec:
    """megatron's local (non-transformer-engine) GPT layer with the causal mask removed; its norms are
    apex's FusedLayerNorm when apex is installed (megatron's choice), otherwise TorchLayerNorm.
    time_conditioning='adaln': the layer is AdaLNTransformerLayer (same submodules)."""
    spec = copy.deepcopy(get_gpt_layer_local_spec())
    if time_conditioning == "adaln":
        spec.module = AdaLNTransformerLayer
    elif time_conditioning != "none":
        raise ValueError(f"model.time_conditioning={time_conditioning!r}: use none or adaln")
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        if getattr(spec.submodules, name) is WrappedTorchNorm:
            setattr(spec.submodules, name, TorchLayerNorm)
    spec.submodules.self_attention.submodules.linear_qkv = AutocastInputColumnParallelLinear
    spec.submodules.mlp.submodules.linear_fc1 = AutocastInputColumnParallelLinear
    attn = spec.submodules.self_attention
    attn.params = {**attn.params, "attn_mask_type": AttnMaskType.no_mask}
    if resolve_attention(attention) == "sdpa":
        attn.submodules.core_attention = SDPACoreAttention
    return spec


def bidirectional_block_spec(config: TransformerConfig, attention: str, pp_rank: int,
                             vp_stage: Optional[int] = None, time_conditioning: str = "none") -> TransformerBlockSubmodules:
    """This stage's layers of `bidirectional_layer_spec` plus the final norm, of the same class as the
    layers' norms (megatron's block would pick WrappedTorchNorm, which has no sequence parallelism)."""
    layer = bidirectional_layer_spec(attention, time_conditioning)
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage, pp_rank),
                                      layer_norm=layer.submodules.input_layernorm)


class MaskedDiffusionTransformer(MegatronModule):
    """Embedding (+ RoPE or learned positions) -> bidirectional TransformerBlock (+ final norm) -> output
    ColumnParallelLinear -> vocab-parallel NLL. One pipeline stage of it when pre/post_process say so."""

    def __init__(self, config: TransformerConfig, *, vocab_size: int, max_sequence_length: int,
                 position_embedding: str = "rope", zero_init_output: bool = True,
                 make_vocab_size_divisible_by: int = 128, pre_process: bool = True,
                 post_process: bool = True, input_digits: int = 0,
                 extra_modules: Optional[dict[str, torch.nn.Module]] = None, attention: str = "sdpa", image_shape: Optional[tuple[int, int, int]] = None,
                 time_conditioning: str = "none", vp_stage: Optional[int] = None):
        super().__init__(config=config)
        if position_embedding not in ("rope", "learned"):
            raise ValueError(f"position_embedding must be 'rope' or 'learned', got {position_embedding!r}")
        tp = config.tensor_model_parallel_size
        self.model_type = ModelType.encoder_or_decoder   # read by megatron's pipeline schedules
        self.vocab_size = vocab_size                     # V real tokens
        self.mask_id = vocab_size
        # Padding that does not depend on TP (for TP dividing make_vocab_size_divisible_by): the same
        # shapes, hence the same random initialisation and checkpoints, under every layout.
        pad_to = math.lcm(make_vocab_size_divisible_by, tp)
        self.input_vocab_size = _round_up(vocab_size + 1, pad_to)
        self.output_vocab_size = _round_up(vocab_size, pad_to)
        self.max_sequence_length = max_sequence_length
        self.position_embedding = position_embedding
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage       # model chunk index under interleaved PP (read by megatron's schedules)
        pgs = ProcessGroupCollection.use_mpu_process_groups()   # megatron's parallel_state groups

        self.prime_l = prime_l = input_digits
        if prime_l and position_embedding != "rope":
            raise ValueError("Prime's sub-token embedding needs position_embedding='rope'")
        if pre_process and prime_l:
            # Prime: l digits of base b per position, sub-embeddings concatenated (replicated over TP:
            # the table has only b + 1 rows)
            from model.diffusion.prime import SubTokenEmbedding, prime_base
            self.subtoken_embedding = SubTokenEmbedding(prime_base(vocab_size, prime_l), prime_l,
                                                        config.hidden_size, init_std=config.init_method_std)
        elif pre_process:
            # under sequence parallelism the embedding reduce-scatters its output to this rank's sequence
            # slice itself, unless pixel positions are still to be added to the whole sequence
            self.embedding = LanguageModelEmbedding(
                config=config, vocab_size=self.input_vocab_size, max_sequence_length=max_sequence_length,
                position_embedding_type="rope" if position_embedding == "rope" else "learned_absolute",
                scatter_to_sequence_parallel=not image_shape, tp_group=pgs.tp)
        self.image_shape = tuple(image_shape) if image_shape else None
        if pre_process and self.image_shape:
            self.pixel_position = PixelPositionEmbedding(self.image_shape, config.hidden_size, config.init_method_std)
        if position_embedding == "rope":   # every stage applies RoPE inside its attention layers
            self.rotary_pos_emb = RotaryEmbedding(
                kv_channels=config.kv_channels, rotary_percent=1.0,
                rotary_interleaved=config.rotary_interleaved,
                use_cpu_initialization=config.use_cpu_initialization, cp_group=pgs.cp)
        self.time_conditioning = time_conditioning
        block = bidirectional_block_spec(config, attention, pp_rank=get_pg_rank(pgs.pp), vp_stage=vp_stage,
                                         time_conditioning=time_conditioning)
        self.decoder = TransformerBlock(config=config, spec=block, pre_process=pre_process,
                                        post_process=post_process, pg_collection=pgs, vp_stage=vp_stage)
        if post_process:
            # the output layer sees the whole sequence even under sequence parallelism: `forward` gathers
            # the final hidden states first, so that the loss mask can select positions before the
            # vocabulary projection
            out_config = copy.copy(config)
            out_config.sequence_parallel = False
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, self.output_vocab_size, config=out_config, init_method=config.init_method,
                bias=False, gather_output=False, skip_bias_add=False, tp_group=pgs.tp)
            if zero_init_output:
                with torch.no_grad():
                    self.output_layer.weight.zero_()
            if time_conditioning == "adaln":    # adaLN-zero on the final norm: shift, scale
                self.final_ada_ln = zero_linear(TIME_FEATURES, 2 * config.hidden_size, dtype=config.params_dtype)
                for p in self.final_ada_ln.parameters():
                    setattr(p, "sequence_parallel", config.sequence_parallel)
        # the objective's own modules (GenMD4's learned schedule w, one entry per token value): trained and
        # saved with the network, replicated over TP
        for name, module in (extra_modules or {}).items():
            self.add_module(name, module)

    def set_input_tensor(self, input_tensor) -> None:
        """Called by megatron's pipeline schedules with the previous stage's output (or [None])."""
        if isinstance(input_tensor, (list, tuple)):
            assert len(input_tensor) == 1, "one input tensor per stage"
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def _padded_class_mask(self, local_classes: int, device: torch.device) -> Optional[Tensor]:
        """True for this rank's output columns that are padding (class id >= V); None if there are none."""
        if self.output_vocab_size == self.vocab_size:
            return None
        start = parallel_state.get_tensor_model_parallel_rank() * local_classes
        return torch.arange(start, start + local_classes, device=device) >= self.vocab_size

    def forward(self, input_ids: Optional[Tensor], labels: Optional[Tensor] = None,
                loss_mask: Optional[Tensor] = None, t: Optional[Tensor] = None) -> Tensor:
        """input_ids, labels: [b, s] int64. Returns per-token NLL [b, s] float32 if labels are given, else
        vocab-parallel logits [b, s, V_out / TP] (padded classes -inf); [s, b, h] hidden states on a stage
        without post_process.

        loss_mask [b, s] bool (with labels): the output layer and cross-entropy run only where it is True
        (the masked positions, the only ones a masked-diffusion loss reads); the NLL is 0 elsewhere. The
        vocabulary projection dominates small models, so this halves their step time on average."""
        if self.pre_process and self.prime_l:
            b, s = input_ids.shape[:2]                     # digits [b, s, l]
            hidden = self.subtoken_embedding(input_ids).transpose(0, 1).contiguous()   # [s, b, h]
            hidden = torch.nn.functional.dropout(hidden, p=self.config.hidden_dropout, training=self.training)
        elif self.pre_process:
            b, s = input_ids.shape
            position_ids = None
            if self.position_embedding == "learned":
                position_ids = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)
            hidden = self.embedding(input_ids=input_ids, position_ids=position_ids)   # [s, b, h]
        else:
            hidden = None                                  # the block reads its set_input_tensor
            s = self.decoder.input_tensor.size(0)
        sp = self.config.sequence_parallel
        if self.pre_process and self.image_shape:
            hidden = hidden + self.pixel_position(s).to(hidden.dtype)
        if sp and self.pre_process and (self.prime_l or self.image_shape):
            # the embedding could not scatter by itself: this rank keeps its slice of the sequence (the
            # backward gathers the gradient, so the replicated embeddings get the whole of it)
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden)
        if sp and not self.pre_process:
            s *= parallel_state.get_tensor_model_parallel_world_size()   # the stage got [s / TP, b, h]
        rotary = self.rotary_pos_emb(s) if self.position_embedding == "rope" else None
        features = None
        if self.time_conditioning == "adaln":
            if t is None:
                raise ValueError("this denoiser is time-conditioned (model.time_conditioning=adaln): pass t [b]")
            features = timestep_features(t.to(self.decoder.layers[0].ada_ln.weight.device))
        hidden = self.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary, context=features)
        if not self.post_process:
            return hidden
        if features is not None:
            shift, scale = self.final_ada_ln(features).to(hidden.dtype).unsqueeze(0).chunk(2, dim=-1)
            hidden = modulate(hidden, shift, scale)
        if sp:
            # [s / TP, b, h] -> [s, b, h]; the output layer all-reduces its input gradient over TP, so the
            # backward of the gather only keeps this rank's slice
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)

        if labels is not None and loss_mask is not None:
            sel = loss_mask.transpose(0, 1)                 # [s, b]; identical on every TP rank
            nll = hidden.new_zeros(sel.shape, dtype=torch.float32)
            nll[sel] = self._nll(hidden[sel].unsqueeze(1), labels.transpose(0, 1)[sel].unsqueeze(1)).squeeze(1)
            return nll.transpose(0, 1).contiguous()
        if labels is not None:
            return self._nll(hidden, labels.transpose(0, 1).contiguous()).transpose(0, 1).contiguous()
        return self._logits(hidden).transpose(0, 1).contiguous()

    def _logits(self, hidden: Tensor) -> Tensor:
        logits, _ = self.output_layer(hidden)             # [s, b, V_out / TP]
        logits = logits.float()                             # a copy under bf16 autocast
        pad = self._padded_class_mask(logits.size(-1), logits.device)
        if pad is not None:   # in place: neither the linear's nor the cast's backward needs these values
            logits.masked_fill_(pad, float("-inf"))
        return logits

    def _nll(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """[s, b, h], [s, b] -> per-token NLL [s, b] float32, vocab-parallel (full logits never gathered)."""
        return tensor_parallel.vocab_parallel_cross_entropy(self._logits(hidden), labels)

    def gather_logits(self, logits: Tensor) -> Tensor:
        """`gather_logits(logits, self.vocab_size)`."""
        return gather_logits(logits, self.vocab_size)


def gather_logits(logits: Tensor, vocab_size: Optional[int] = None) -> Tensor:
    """Vocab-parallel logits [b, s, V_out / TP] -> full logits [b, s, V] (the V real classes) on every TP
    rank. For sampling and evaluation; training never needs it.

    Without `vocab_size` the padded classes are recognised as what the model makes them: the trailing
    columns that are -inf everywhere."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    if vocab_size is None:
        vocab_size = logits.size(-1)
        while vocab_size > 1 and torch.isneginf(logits[..., vocab_size - 1]).all():
            vocab_size -= 1
    return logits[..., :vocab_size]


def _recompute_kwargs(recompute: str) -> dict:
    """model.recompute: 'none'; 'selective' = megatron recomputes core attention in backward; 'full' =
    every layer keeps only its input and recomputes itself (uniform, one layer per unit)."""
    if recompute == "none":
        return {}
    if recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    raise ValueError(f"model.recompute={recompute!r}: use none, selective or full")


def _virtual_pipeline_kwargs(vpp: Optional[int]) -> dict:
    """TransformerConfig fields of interleaved PP (virtual_pipeline_model_parallel_size: TransformerBlock builds a
    chunk's layers at megatron's offset for its vp_stage; the interleaved schedule reads it too).
    microbatch_group_size_per_vp_stage stays megatron's default, PP (launcher.config.validate_world checks the
    number of micro-batches against it).

    batch_p2p_comm=False (megatron's _p2p_ops; megatron-based trainers turn batching off under VPP too):
    the interleaved schedule sends an activation to the next rank and a gradient to the previous one in the
    same call, and at PP=2 both are the same peer. _batched_p2p_ops posts them as [send_prev, recv_prev,
    send_next, recv_next] on one group, so the peer's recv_prev is matched with the gradient and its recv_next
    with the activation (same shape, no error: the PP=2 x VPP=2 losses came out wrong in
    tests/test_denoiser.py); _p2p_ops orders them by rank parity and puts the two directions on different
    groups at PP=2."""
    if vpp is None:
        return {}
    return {"virtual_pipeline_model_parallel_size": vpp, "batch_p2p_comm": False}


def transformer_config(model_cfg, *, params_dtype: torch.dtype = torch.float32, whole_model: bool = False,
                       sequence_parallel: bool = False) -> TransformerConfig:
    """megatron TransformerConfig from our ModelConfig; TP/PP sizes come from megatron's parallel_state
    (whole_model: all layers on this rank whatever the pipeline size); sequence_parallel: megatron's
    sequence parallelism (norms, dropout and residuals on [s / TP, b, h]; needs TP > 1)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if sequence_parallel and tp == 1:
        raise ValueError("sequence parallelism needs tensor parallelism (TP > 1)")
    pp = 1 if whole_model else parallel_state.get_pipeline_model_parallel_world_size()
    vpp = None if whole_model else parallel_state.get_virtual_pipeline_model_parallel_world_size()
    return TransformerConfig(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        num_attention_heads=model_cfg.num_attention_heads,
        ffn_hidden_size=model_cfg.ffn_hidden_size or 4 * model_cfg.hidden_size,
        hidden_dropout=model_cfg.dropout,
        attention_dropout=model_cfg.dropout,
        init_method_std=model_cfg.init_std,
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        pipeline_model_parallel_size=pp,
        **_virtual_pipeline_kwargs(vpp),
        pipeline_dtype=params_dtype,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        **_recompute_kwargs(getattr(model_cfg, "recompute", "none")),
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=True,
    )


def build_denoiser(model_cfg, *, params_dtype: torch.dtype = torch.float32, pre_process: bool = True,
                   post_process: bool = True, input_digits: int = 0,
                   extra_modules: Optional[dict[str, torch.nn.Module]] = None, whole_model: bool = False,
                   sequence_parallel: bool = False, vp_stage: Optional[int] = None) -> MaskedDiffusionTransformer:
    """The denoiser for `model_cfg` (launcher.config.ModelConfig), one pipeline stage of it under PP.

    Needs megatron's parallel_state initialised (launcher.parallelize.init_model_parallel). For PP pass
    pre_process=parallel_state.is_pipeline_first_stage(), post_process=...is_pipeline_last_stage(); under
    interleaved PP one call per model chunk (vp_stage; launcher.parallelize.build_pipeline_stage does all that).
    input_digits / extra_modules: what the diffusion kind adds (model.objectives.network_parts).
    sequence_parallel (TP > 1): megatron's sequence parallelism in the layers; its gradient hooks are
    launcher.parallelize.sum_sequence_parallel_grads."""
    return MaskedDiffusionTransformer(
        transformer_config(model_cfg, params_dtype=params_dtype, whole_model=whole_model,
                           sequence_parallel=sequence_parallel),
        vocab_size=model_cfg.vocab_size, max_sequence_length=model_cfg.seq_len,
        position_embedding=model_cfg.position_embedding, zero_init_output=model_cfg.zero_init_output,
        make_vocab_size_divisible_by=model_cfg.make_vocab_size_divisible_by,
        pre_process=pre_process, post_process=post_process, input_digits=input_digits,
        extra_modules=extra_modules, attention=resolve_attention(getattr(model_cfg, "attention", "auto")),
        image_shape=getattr(model_cfg, "image_shape", None),
        time_conditioning=model_cfg.time_conditioning, vp_stage=vp_stage)
