"""Where a sub-pixel token sits in an image: shared by the megatron denoiser and the plain one (pure torch)."""
from __future__ import annotations

import torch
from torch import Tensor


class PixelPositionEmbedding(torch.nn.Module):
    """Where a sub-pixel token sits in an H x W x C image (rows are HWC-flattened): learned row, column
    and channel embeddings, summed and added to the token embedding (replicated over TP: H + W + C rows).
    With RoPE over the flattened index this gives the network both the 2-D layout and the channel."""

    def __init__(self, image_shape, hidden_size: int, init_std: float):
        super().__init__()
        h, w, c = (int(v) for v in image_shape)
        self.image_shape = (h, w, c)
        self.row = torch.nn.Embedding(h, hidden_size)
        self.col = torch.nn.Embedding(w, hidden_size)
        self.channel = torch.nn.Embedding(c, hidden_size)
        for emb in (self.row, self.col, self.channel):
            torch.nn.init.normal_(emb.weight, std=init_std)

    def forward(self, seq_len: int) -> Tensor:
        """[s, 1, hidden] for the first seq_len positions."""
        h, w, c = self.image_shape
        idx = torch.arange(seq_len, device=self.row.weight.device)
        pos = self.row(idx // (w * c)) + self.col((idx // c) % w) + self.channel(idx % c)
        return pos.unsqueeze(1)
