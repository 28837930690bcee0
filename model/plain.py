"""The denoiser as plain single-process PyTorch: no torch.distributed, no megatron parallel state.

Same architecture and the same parameter names as model/denoiser.py's megatron-core model at TP = PP = 1,
without vocabulary padding (what launcher/export.py writes):

    embedding.word_embeddings.weight               [V + 1, D]   (md4 / genmd4; the mask id is V)
    embedding.position_embeddings.weight           [N, D]       (position_embedding = learned)
    subtoken_embedding.table.weight                [b + 1, D/l] (prime)
    decoder.layers.{i}.input_layernorm.{weight,bias}
    decoder.layers.{i}.self_attention.linear_qkv.{weight,bias}   [3D, D]: per head h the rows [q_h; k_h; v_h]
    decoder.layers.{i}.self_attention.linear_proj.{weight,bias}
    decoder.layers.{i}.pre_mlp_layernorm.{weight,bias}
    decoder.layers.{i}.mlp.linear_fc1.{weight,bias}, decoder.layers.{i}.mlp.linear_fc2.{weight,bias}
    decoder.final_layernorm.{weight,bias}
    output_layer.weight                            [V, D]       (no bias)
    genmd4_schedule.raw                            [V]          (genmd4: w = softplus(raw))
    pixel_position.{row,col,channel}.weight        [H|W|C, D]   (model.image_shape: pixel data)
    decoder.layers.{i}.ada_ln.{weight,bias}        [6D, F]      (time_conditioning = adaln; F = TIME_FEATURES)
    final_ada_ln.{weight,bias}                     [2D, F]      (time_conditioning = adaln)

Each layer is pre-norm: x + proj(attn(LN(x))), then x + fc2(gelu(fc1(LN(x)))); attention is
bidirectional with megatron's non-interleaved RoPE (rotate-half, base 10000, all of each head's dims).
With time_conditioning = adaln, norms are modulated and branches gated by t (model/adaln.py).

forward follows the megatron model's contract, which model/objectives.py relies on:
    forward(input_ids)                       -> logits [b, s, V] float32
    forward(input_ids, labels[, loss_mask])  -> per-token NLL [b, s] float32 (0 where loss_mask is False)
For Prime input_ids are digits [b, s, l]; a time-conditioned model also takes t [b] (keyword `t`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.adaln import TIME_FEATURES, modulate, timestep_features, zero_linear


def rope_freqs(seq_len: int, head_dim: int, base: float = 10000.0, device=None) -> Tensor:
    """megatron's RotaryEmbedding (rotary_percent 1, not interleaved): [s, head_dim] angles."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return torch.cat((freqs, freqs), dim=-1)


def apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """x [b, h, s, d], freqs [s, d] -> x rotated (rotate-half convention, as megatron's bshd path)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * freqs.cos().to(x.dtype) + rotated * freqs.sin().to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, hidden // heads, dropout
        self.linear_qkv = nn.Linear(hidden, 3 * hidden)
        self.linear_proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, freqs: Optional[Tensor]) -> Tensor:   # x [b, s, D]
        b, s, _ = x.shape
        qkv = self.linear_qkv(x).view(b, s, self.heads, 3, self.head_dim)   # megatron: per head [q, k, v]
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))     # [b, h, s, d]
        if freqs is not None:
            q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.linear_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(hidden, ffn)
        self.linear_fc2 = nn.Linear(ffn, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float, eps: float, adaln: bool = False):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.self_attention = SelfAttention(hidden, heads, dropout)
        self.pre_mlp_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.mlp = MLP(hidden, ffn)
        self.dropout = dropout
        if adaln:
            self.ada_ln = zero_linear(TIME_FEATURES, 6 * hidden)

    def forward(self, x: Tensor, freqs: Optional[Tensor], features: Optional[Tensor] = None) -> Tensor:
        if features is None:
            x = x + F.dropout(self.self_attention(self.input_layernorm(x), freqs), self.dropout, self.training)
            return x + F.dropout(self.mlp(self.pre_mlp_layernorm(x)), self.dropout, self.training)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada_ln(features).to(x.dtype)[:, None].chunk(6, dim=-1)
        h = self.self_attention(modulate(self.input_layernorm(x), shift1, scale1), freqs)
        x = x + gate1 * F.dropout(h, self.dropout, self.training)
        h = self.mlp(modulate(self.pre_mlp_layernorm(x), shift2, scale2))
        return x + gate2 * F.dropout(h, self.dropout, self.training)


class Decoder(nn.Module):
    def __init__(self, num_layers: int, hidden: int, heads: int, ffn: int, dropout: float, eps: float,
                 adaln: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(Layer(hidden, heads, ffn, dropout, eps, adaln) for _ in range(num_layers))
        self.final_layernorm = nn.LayerNorm(hidden, eps=eps)


class Embedding(nn.Module):
    def __init__(self, vocab: int, hidden: int, max_len: int, learned_positions: bool):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        if learned_positions:
            self.position_embeddings = nn.Embedding(max_len, hidden)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.word_embeddings(ids)
        if hasattr(self, "position_embeddings"):
            x = x + self.position_embeddings(torch.arange(ids.shape[1], device=ids.device))
        return x


class PlainDenoiser(nn.Module):
    """The megatron denoiser's math in one process. `from_config(model_cfg, diffusion_cfg)` builds it; like
    model/denoiser.py it takes the diffusion kind's parts (model.objectives.network_parts) as plain arguments."""

    def __init__(self, *, vocab_size: int, hidden_size: int, num_layers: int, num_attention_heads: int,
                 ffn_hidden_size: Optional[int] = None, seq_len: int, position_embedding: str = "rope",
                 dropout: float = 0.0, layernorm_eps: float = 1e-5, input_digits: int = 0,
                 extra_modules: Optional[dict[str, nn.Module]] = None, image_shape=None,
                 time_conditioning: str = "none"):
        super().__init__()
        if position_embedding not in ("rope", "learned"):
            raise ValueError(f"position_embedding must be 'rope' or 'learned', got {position_embedding!r}")
        prime_l = input_digits
        self.vocab_size, self.mask_id, self.seq_len = vocab_size, vocab_size, seq_len
        self.position_embedding, self.prime_l, self.dropout = position_embedding, prime_l, dropout
        self.head_dim = hidden_size // num_attention_heads
        if prime_l:
            from model.diffusion.prime import SubTokenEmbedding, prime_base
            self.subtoken_embedding = SubTokenEmbedding(prime_base(vocab_size, prime_l), prime_l, hidden_size)
        else:
            self.embedding = Embedding(vocab_size + 1, hidden_size, seq_len, position_embedding == "learned")
        if image_shape:
            from model.pixels import PixelPositionEmbedding
            self.pixel_position = PixelPositionEmbedding(image_shape, hidden_size, init_std=0.02)
        self.image_shape = tuple(image_shape) if image_shape else None
        if time_conditioning not in ("none", "adaln"):
            raise ValueError(f"time_conditioning must be 'none' or 'adaln', got {time_conditioning!r}")
        self.time_conditioning = time_conditioning
        adaln = time_conditioning == "adaln"
        self.decoder = Decoder(num_layers, hidden_size, num_attention_heads, ffn_hidden_size or 4 * hidden_size,
                               dropout, layernorm_eps, adaln)
        self.output_layer = nn.Linear(hidden_size, vocab_size, bias=False)
        if adaln:
            self.final_ada_ln = zero_linear(TIME_FEATURES, 2 * hidden_size)
        for name, module in (extra_modules or {}).items():     # GenMD4's learned schedule
            self.add_module(name, module)

    @classmethod
    def from_config(cls, model_cfg, diffusion_cfg=None) -> "PlainDenoiser":
        """From launcher.config.ModelConfig / DiffusionConfig (None: MD4), as launcher.parallelize builds the
        megatron denoiser."""
        from model.objectives import network_parts
        return cls(vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.hidden_size,
                   num_layers=model_cfg.num_layers, num_attention_heads=model_cfg.num_attention_heads,
                   ffn_hidden_size=model_cfg.ffn_hidden_size, seq_len=model_cfg.seq_len,
                   position_embedding=model_cfg.position_embedding, dropout=model_cfg.dropout,
                   **network_parts(diffusion_cfg, model_cfg.vocab_size),
                   image_shape=getattr(model_cfg, "image_shape", None),
                   time_conditioning=model_cfg.time_conditioning)

    def hidden(self, input_ids: Tensor, t: Optional[Tensor] = None) -> Tensor:
        """[b, s] ids (Prime: [b, s, l] digits), t [b] if time-conditioned -> final-norm hidden states [b, s, D]."""
        features = None
        if self.time_conditioning == "adaln":
            if t is None:
                raise ValueError("this denoiser is time-conditioned (time_conditioning=adaln): pass t [b]")
            features = timestep_features(t.to(input_ids.device))
        x = self.subtoken_embedding(input_ids) if self.prime_l else self.embedding(input_ids)
        if self.image_shape:
            x = x + self.pixel_position(x.shape[1]).transpose(0, 1).to(x.dtype)   # [1, s, D]
        x = F.dropout(x, self.dropout, self.training)
        s = x.shape[1]
        freqs = rope_freqs(s, self.head_dim, device=x.device) if self.position_embedding == "rope" else None
        for layer in self.decoder.layers:
            x = layer(x, freqs, features)
        x = self.decoder.final_layernorm(x)
        if features is not None:
            shift, scale = self.final_ada_ln(features).to(x.dtype)[:, None].chunk(2, dim=-1)
            x = modulate(x, shift, scale)
        return x

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None,
                loss_mask: Optional[Tensor] = None, t: Optional[Tensor] = None) -> Tensor:
        h = self.hidden(input_ids, t)
        if labels is None:
            return self.output_layer(h).float()
        if loss_mask is None:
            loss_mask = torch.ones_like(labels, dtype=torch.bool)
        nll = torch.zeros(labels.shape, dtype=torch.float32, device=h.device)
        logits = self.output_layer(h[loss_mask]).float()
        nll[loss_mask] = F.cross_entropy(logits, labels[loss_mask], reduction="none")
        return nll
