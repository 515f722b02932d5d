"""Sample grids: the quickest honest look at what a generator has learned."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 [0, 255], the form FID, shards and PNGs share."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, pad: int = 2) -> Path:
    """Write a [B, C, H, W] batch in [-1, 1] as one PNG grid (atomically, so a viewer never sees half)."""
    x = to_uint8(images.detach().cpu())
    b, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    ncol = math.ceil(b / nrow)
    grid = np.zeros((ncol * (h + pad) + pad, nrow * (w + pad) + pad, 3), dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        tile = x[i].permute(1, 2, 0).numpy()
        if c == 1:
            tile = np.repeat(tile, 3, axis=2)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[y0 : y0 + h, x0 : x0 + w] = tile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(grid).save(tmp)
    tmp.replace(path)
    return path
