"""Model FLOPs of the masked-diffusion transformer (for tokens/s -> MFU), counting full bidirectional
attention and the whole vocabulary projection, forward + backward (x3), as Megatron-LM counts them."""
from __future__ import annotations


def flops_per_token(num_layers: int, hidden_size: int, seq_len: int, vocab_size: int,
                    ffn_hidden_size: int | None = None) -> float:
    h, L, s, V = hidden_size, num_layers, seq_len, vocab_size
    f = ffn_hidden_size or 4 * h
    per_layer = 2 * (4 * h * h) + 2 * (2 * h * f) + 2 * (2 * s * h)   # qkv+proj, mlp, QK^T and AV
    return 3.0 * (L * per_layer + 2 * h * V)


# dense bf16 tensor-core peaks (no sparsity), FLOP/s
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device_name: str) -> float | None:
    for key, value in PEAK_BF16.items():
        if key in device_name:
            return value
    return None
