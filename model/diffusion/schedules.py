"""MD4 masking schedules alpha(t), t in [0, 1], with MD4's eps shift.

alpha(t) = (1 - 2 eps) * alpha~(t) + eps,  alpha'(t) = (1 - 2 eps) * alpha~'(t),
weight(t) = -alpha'(t) / (1 - alpha(t)) > 0 (the continuous-time ELBO weight).
Pure torch; no parallelism.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    name: str = "linear"
    eps: float = 1e-4
    k: float = 1.0            # polynomial exponent
    bmin: float = 1e-5        # geometric
    bmax: float = 20.0

    # alpha~ and its derivative before the eps shift
    def _alpha_tilde(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.name == "linear":
            return 1.0 - t, -torch.ones_like(t)
        if self.name == "polynomial":
            return 1.0 - t ** self.k, -self.k * t ** (self.k - 1.0)
        if self.name == "cosine":
            a = 1.0 - torch.cos(0.5 * math.pi * (1.0 - t))
            da = -0.5 * math.pi * torch.sin(0.5 * math.pi * (1.0 - t))
            return a, da
        if self.name == "geometric":
            sigma = self.bmin ** (1.0 - t) * self.bmax ** t
            a = torch.exp(-sigma)
            da = -a * sigma * math.log(self.bmax / self.bmin)
            return a, da
        raise ValueError(f"unknown schedule {self.name!r}")

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        a, _ = self._alpha_tilde(t)
        return (1.0 - 2.0 * self.eps) * a + self.eps

    def dalpha(self, t: torch.Tensor) -> torch.Tensor:
        _, da = self._alpha_tilde(t)
        return (1.0 - 2.0 * self.eps) * da

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'(t) / (1 - alpha(t)): the continuous-time ELBO weight."""
        return -self.dalpha(t) / (1.0 - self.alpha(t))


def make_schedule(name: str, eps: float = 1e-4, **params) -> Schedule:
    if name not in ("linear", "polynomial", "cosine", "geometric"):
        raise ValueError(f"unknown schedule {name!r}; choose linear, polynomial, cosine or geometric")
    return Schedule(name=name, eps=eps, **params)
