"""Time conditioning through adaLN-zero (DiT; MD4's text model), shared by the megatron-core denoiser and
the plain one (model/plain.py).

The diffusion time t in [0, 1] of each row becomes sinusoidal features (ADM/DiT's timestep embedding of
1000 t, TIME_FEATURES wide, no parameters). Each transformer layer owns a zero-initialised linear map
`ada_ln` from the features to six [D] vectors and computes

    h = h + gate1 * attn(LN(h) * (1 + scale1) + shift1)
    h = h + gate2 * mlp(LN(h) * (1 + scale2) + shift2)

and the final norm is modulated by `final_ada_ln` (shift, scale). At initialisation every gate, shift and
scale is 0, so each layer is the identity and the network does not depend on t ("-zero").

Every layer maps the features itself (DiT shares an MLP over t between layers): each parameter then lives
on exactly one pipeline stage, and every layout computes the same function as one process.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

TIME_FEATURES = 256


def timestep_features(t: Tensor, dim: int = TIME_FEATURES) -> Tensor:
    """t [b] (any float dtype) -> [b, dim] float32: cos and sin of 1000 t at frequencies 10000^(-k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (1000.0 * t.float().reshape(-1))[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def zero_linear(in_features: int, out_features: int, dtype: torch.dtype | None = None) -> torch.nn.Linear:
    """The modulation map, zero-initialised (weight and bias)."""
    layer = torch.nn.Linear(in_features, out_features, dtype=dtype)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    return layer


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x * (1 + scale) + shift; shift and scale broadcast over x's sequence dimension."""
    return x * (1 + scale) + shift
