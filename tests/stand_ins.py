"""A stand-in for the Inception network in FID tests: the real one costs ~0.1 s per image on a CPU core.

A fixed random conv + projection is sensitive to detail (not only to the mean colour, so a change of
resolution shows) and counts the images it embeds, so a test can tell a cache hit from a recomputation."""

from __future__ import annotations

import torch
from torch import nn

from rgan_dist.metrics import InceptionInfo, InceptionNetwork


class CountingFeatures(nn.Module):
    """[B,3,299,299] -> [B,features]; `seen` counts the images embedded so far."""

    def __init__(self, features: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 9, stride=8)
        self.proj = nn.Linear(4 * 8 * 8, features)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.1
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        y = nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 8)
        return self.proj(y.flatten(1))


def stand_in_network(features: int = 64, sha256: str = "0" * 64) -> InceptionNetwork:
    """An `InceptionNetwork` around `CountingFeatures` (64 features keep the Frechet distance's matrix
    functions cheap); `sha256` stands for the network's identity in cache keys and recorded protocols."""
    info = InceptionInfo(source="test stand-in", path="<memory>", sha256=sha256, convention="tf-range-299")
    return InceptionNetwork(CountingFeatures(features).eval(), info, torch.device("cpu"))
