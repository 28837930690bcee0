"""The mdiff denoiser as a transformers AutoModelForMaskedLM (copied into an export by launcher/hf_export.py).

    from transformers import AutoModelForMaskedLM
    model = AutoModelForMaskedLM.from_pretrained(EXPORT, trust_remote_code=True)
    logits = model(input_ids, t=t).logits          # [b, s, V]; t [b] in [0, 1] only for adaLN models

This file is the one deliberate copy of model/plain.py's forward (with model/adaln.py's time features,
model/pixels.py's pixel positions and Prime's sub-token embedding from model/diffusion/prime.py): an export
must load with torch and transformers alone, without this project on the path. tests/test_hf_export.py
checks that its logits equal model/plain.py's for MD4 (with and without adaLN), Prime, a pixel model and
GenMD4, so a change to one that is not made to the other fails the suite.

The parameter names are model/plain.py's (the export's model.safetensors loads without a prefix map):
`embedding.*`, `subtoken_embedding.table.weight`, `pixel_position.*`, `decoder.layers.{i}.*`,
`decoder.final_layernorm.*`, `output_layer.weight`, `final_ada_ln.*`, `genmd4_schedule.raw`.

Inputs:
    input_ids  [b, s] token ids, the mask id is config.mask_token_id (= V). Prime: [b, s, l] base-b digits
               (sub-token mask id b), or [b, s] token ids, which are written as digits (the mask id -> l
               masked digits).
    t          [b] diffusion time in [0, 1]; required when config.architecture["time_conditioning"] is
               "adaln", ignored otherwise (MD4's and Prime's networks without adaLN do not see t).
    labels     optional [b, s] token ids, -100 where ignored: `loss` is the mean cross-entropy over the
               others (the transformers convention; the diffusion ELBO weights it by w(t), see the project).
Output: MaskedLMOutput(logits [b, s, V] float32, loss). Prime's logits are over the V tokens before the
carry-over filter (model/diffusion/prime.carry_over_filter), as model/plain.py returns them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_mdiff import MDiffConfig

TIME_FEATURES = 256      # model/adaln.TIME_FEATURES


# ----- model/adaln.py ------------------------------------------------------------------------------

def timestep_features(t: Tensor, dim: int = TIME_FEATURES) -> Tensor:
    """t [b] -> [b, dim] float32: cos and sin of 1000 t at frequencies 10000^(-k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (1000.0 * t.float().reshape(-1))[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


# ----- model/diffusion/prime.py --------------------------------------------------------------------

def prime_base(vocab_size: int, l: int) -> int:
    """b = ceil(V^(1/l)), computed in integers."""
    b = max(2, round(vocab_size ** (1.0 / l)))
    while b ** l < vocab_size:
        b += 1
    while b > 2 and (b - 1) ** l >= vocab_size:
        b -= 1
    return b


def token_digits(x: Tensor, b: int, l: int) -> Tensor:
    """ids [...] -> base-b digits [..., l], most significant first."""
    powers = b ** torch.arange(l - 1, -1, -1, device=x.device)
    return torch.div(x.long()[..., None], powers, rounding_mode="floor") % b


class SubTokenEmbedding(nn.Module):
    def __init__(self, b: int, l: int, hidden_size: int):
        super().__init__()
        self.b, self.l = b, l
        self.table = nn.Embedding(b + 1, hidden_size // l)

    def forward(self, y: Tensor) -> Tensor:      # [b, s, l] -> [b, s, D]
        return self.table(y).flatten(-2)


# ----- model/pixels.py -----------------------------------------------------------------------------

class PixelPositionEmbedding(nn.Module):
    def __init__(self, image_shape, hidden_size: int):
        super().__init__()
        h, w, c = (int(v) for v in image_shape)
        self.image_shape = (h, w, c)
        self.row = nn.Embedding(h, hidden_size)
        self.col = nn.Embedding(w, hidden_size)
        self.channel = nn.Embedding(c, hidden_size)

    def forward(self, seq_len: int) -> Tensor:       # [s, D] (model/pixels.py returns [s, 1, D])
        h, w, c = self.image_shape
        idx = torch.arange(seq_len, device=self.row.weight.device)
        return self.row(idx // (w * c)) + self.col((idx // c) % w) + self.channel(idx % c)


# ----- model/plain.py ------------------------------------------------------------------------------

def rope_freqs(seq_len: int, head_dim: int, base: float = 10000.0, device=None) -> Tensor:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return torch.cat((freqs, freqs), dim=-1)


def apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * freqs.cos().to(x.dtype) + rotated * freqs.sin().to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, hidden // heads, dropout
        self.linear_qkv = nn.Linear(hidden, 3 * hidden)
        self.linear_proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, freqs: Optional[Tensor]) -> Tensor:
        b, s, _ = x.shape
        qkv = self.linear_qkv(x).view(b, s, self.heads, 3, self.head_dim)   # per head [q, k, v] (megatron)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
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
    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float, eps: float, adaln: bool):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.self_attention = SelfAttention(hidden, heads, dropout)
        self.pre_mlp_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.mlp = MLP(hidden, ffn)
        self.dropout = dropout
        if adaln:
            self.ada_ln = nn.Linear(TIME_FEATURES, 6 * hidden)

    def forward(self, x: Tensor, freqs: Optional[Tensor], features: Optional[Tensor]) -> Tensor:
        if features is None:
            x = x + F.dropout(self.self_attention(self.input_layernorm(x), freqs), self.dropout, self.training)
            return x + F.dropout(self.mlp(self.pre_mlp_layernorm(x)), self.dropout, self.training)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada_ln(features).to(x.dtype)[:, None].chunk(6, dim=-1)
        h = self.self_attention(modulate(self.input_layernorm(x), shift1, scale1), freqs)
        x = x + gate1 * F.dropout(h, self.dropout, self.training)
        h = self.mlp(modulate(self.pre_mlp_layernorm(x), shift2, scale2))
        return x + gate2 * F.dropout(h, self.dropout, self.training)


class Decoder(nn.Module):
    def __init__(self, num_layers: int, hidden: int, heads: int, ffn: int, dropout: float, eps: float, adaln: bool):
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


class GenMD4Schedule(nn.Module):
    """GenMD4's learned per-token schedule: w = softplus(raw) (model/diffusion/genmd4.py); not used by forward."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.raw = nn.Parameter(torch.zeros(vocab_size))

    def w(self) -> Tensor:
        return F.softplus(self.raw)


class MDiffPreTrainedModel(PreTrainedModel):
    config_class = MDiffConfig
    base_model_prefix = "mdiff"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Layer"]

    def _init_weights(self, module: nn.Module) -> None:
        """Only for weights an export lacks (from_pretrained fills all of them from model.safetensors)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class MDiffForMaskedLM(MDiffPreTrainedModel):
    """model/plain.PlainDenoiser's forward under transformers' loading, saving and output conventions."""

    def __init__(self, config: MDiffConfig):
        super().__init__(config)
        a, kind = config.architecture, config.diffusion.get("kind", "md4")
        if a.get("position_embedding") not in ("rope", "learned"):
            raise ValueError(f"config.json: architecture.position_embedding must be 'rope' or 'learned', "
                             f"got {a.get('position_embedding')!r}")
        if a.get("time_conditioning") not in ("none", "adaln"):
            raise ValueError(f"config.json: architecture.time_conditioning must be 'none' or 'adaln', "
                             f"got {a.get('time_conditioning')!r}")
        hidden, V = config.hidden_size, config.vocab_size
        self.time_conditioning, self.position_embedding = a["time_conditioning"], a["position_embedding"]
        self.prime_l, self.head_dim, self.dropout = config.prime_l, hidden // config.num_attention_heads, config.dropout
        if self.prime_l:
            if hidden % self.prime_l:
                raise ValueError(f"config.json: hidden_size {hidden} is not divisible by diffusion.prime_l "
                                 f"{self.prime_l}")
            self.subtoken_embedding = SubTokenEmbedding(prime_base(V, self.prime_l), self.prime_l, hidden)
        else:
            self.embedding = Embedding(V + 1, hidden, config.max_position_embeddings, self.position_embedding == "learned")
        self.image_shape = tuple(config.image_shape) if config.image_shape else None
        if self.image_shape:
            self.pixel_position = PixelPositionEmbedding(self.image_shape, hidden)
        adaln = self.time_conditioning == "adaln"
        self.decoder = Decoder(config.num_hidden_layers, hidden, config.num_attention_heads,
                               config.intermediate_size, self.dropout, config.layer_norm_eps, adaln)
        self.output_layer = nn.Linear(hidden, V, bias=False)
        if adaln:
            self.final_ada_ln = nn.Linear(TIME_FEATURES, 2 * hidden)
        if kind == "genmd4":
            self.genmd4_schedule = GenMD4Schedule(V)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.subtoken_embedding.table if self.prime_l else self.embedding.word_embeddings

    def get_output_embeddings(self) -> nn.Module:
        return self.output_layer

    def _embed(self, input_ids: Tensor) -> Tensor:
        if not self.prime_l:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, seq] token ids, got shape {tuple(input_ids.shape)}")
            return self.embedding(input_ids)
        b = self.subtoken_embedding.b
        if input_ids.dim() == 2:       # token ids: the mask id V becomes l masked digits
            masked = input_ids == self.config.mask_token_id
            digits = token_digits(input_ids.masked_fill(masked, 0), b, self.prime_l)
            input_ids = digits.masked_fill(masked[..., None], b)
        if input_ids.dim() != 3 or input_ids.shape[-1] != self.prime_l:
            raise ValueError(f"Prime input_ids must be [batch, seq] token ids or [batch, seq, {self.prime_l}] "
                             f"digits, got shape {tuple(input_ids.shape)}")
        return self.subtoken_embedding(input_ids)

    def forward(self, input_ids: Tensor, t: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, token_type_ids: Optional[Tensor] = None,
                **kwargs) -> MaskedLMOutput | tuple:
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("attention_mask has zeros: this denoiser attends to every position of a fixed-length "
                             "row (no padding); pass full rows, masked positions as mask_token_id")
        if token_type_ids is not None and bool(token_type_ids.any()):
            raise ValueError("token_type_ids other than 0: this denoiser has no segment embeddings")
        unused = sorted(k for k, v in kwargs.items() if v is not None and v is not False)
        if unused:
            raise TypeError(f"MDiffForMaskedLM.forward does not take {unused} (it takes input_ids, t, attention_mask, "
                            "labels, output_hidden_states, return_dict)")
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        features = None
        if self.time_conditioning == "adaln":
            if t is None:
                raise ValueError("this denoiser is time-conditioned (architecture.time_conditioning = adaln): "
                                 "pass t [batch] in [0, 1]")
            t = torch.as_tensor(t, device=input_ids.device)
            features = timestep_features(t.expand(input_ids.shape[0]) if t.dim() == 0 else t)
        x = self._embed(input_ids)
        if self.image_shape:
            x = x + self.pixel_position(x.shape[1]).to(x.dtype)[None]
        x = F.dropout(x, self.dropout, self.training)
        s = x.shape[1]
        freqs = rope_freqs(s, self.head_dim, self.config.rope_theta, x.device) if self.position_embedding == "rope" else None
        hidden_states = [x] if output_hidden_states else None
        for layer in self.decoder.layers:
            x = layer(x, freqs, features)
            if hidden_states is not None:
                hidden_states.append(x)
        x = self.decoder.final_layernorm(x)
        if features is not None:
            shift, scale = self.final_ada_ln(features).to(x.dtype)[:, None].chunk(2, dim=-1)
            x = modulate(x, shift, scale)
        logits = self.output_layer(x).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(), ignore_index=-100)
        if not return_dict:
            out = (logits,) + ((tuple(hidden_states),) if hidden_states is not None else ())
            return ((loss,) + out) if loss is not None else out
        return MaskedLMOutput(loss=loss, logits=logits,
                              hidden_states=tuple(hidden_states) if hidden_states is not None else None)


MDiffConfig.register_for_auto_class()
MDiffForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")
