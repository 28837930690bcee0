"""Pictures for people: sample grids of 8-bit images (rows of HWC pixel tokens)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def image_grid(tokens, image_shape, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """[n, H*W*C] pixel values 0..255 -> one uint8 HWC picture (RGB; grey images are repeated) with the
    n images in a near-square grid separated by `pad` white pixels."""
    arr = np.asarray(tokens, dtype=np.int64)
    h, w, c = (int(v) for v in image_shape)
    if arr.ndim != 2 or arr.shape[1] != h * w * c:
        raise ValueError(f"samples of shape {arr.shape} are not rows of {h}x{w}x{c} pixels")
    imgs = np.clip(arr, 0, 255).astype(np.uint8).reshape(-1, h, w, c)
    if c == 1:
        imgs = np.repeat(imgs, 3, axis=-1)
    elif c != 3:
        raise ValueError(f"{c} channels: image grids show 1 (grey) or 3 (RGB)")
    n = imgs.shape[0]
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(imgs):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    return grid


def save_png(picture: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)
    return path
