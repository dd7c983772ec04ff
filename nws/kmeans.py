"""Pools by k-means of a trained model's kernels, layer by layer (docs/reference.md §1,
option b)."""

from __future__ import annotations

import torch
from torch import nn

from nws.convert import Pools, convertible_layers, kernel_rows
from nws.search import nearest_index


@torch.no_grad()
def kmeans(points: torch.Tensor, k: int, *, iters: int = 20, max_points: int | None = 65536,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Lloyd's k-means of ``points`` (m, D) into ``k`` centroids, deterministic given
    ``generator``. Fits on at most ``max_points`` rows drawn without replacement. Empty
    clusters move to the points farthest from their centroid. With fewer distinct points
    than ``k``, the remaining centroids are drawn from N(mean, std) of the points.
    ``points`` may live on any device; random draws come from ``generator`` on its own
    device (CPU by default) and are moved to the points', so a seed gives the same
    centroids wherever the points are."""
    points = points.detach().float()
    device = points.device
    rng = generator.device if generator is not None else torch.device("cpu")
    if max_points is not None and len(points) > max_points:
        points = points[torch.randperm(len(points), generator=generator, device=rng)
                        [:max_points].to(device)]
    distinct = torch.unique(points, dim=0)
    if len(distinct) <= k:
        extra = k - len(distinct)
        std = points.std(0) if len(points) > 1 else points.new_ones(points.shape[1])
        noise = torch.randn(extra, points.shape[1], generator=generator, device=rng)
        return torch.cat([distinct, points.mean(0) + std * noise.to(device)])
    pick = torch.randperm(len(distinct), generator=generator, device=rng)[:k].to(device)
    centroids = distinct[pick].clone()
    for _ in range(iters):
        index = nearest_index(points, centroids)
        counts = torch.bincount(index, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, index, points)
        empty = torch.nonzero(counts == 0).squeeze(1)
        if empty.numel():  # distances only when an empty cluster needs the farthest points
            d1 = (points - centroids[index]).norm(dim=1)
        moved = counts > 0
        centroids[moved] = sums[moved] / counts[moved, None].to(sums.dtype)
        if empty.numel():
            far = torch.argsort(d1, descending=True, stable=True)[: empty.numel()]
            centroids[empty] = points[far]
    return centroids


def kmeans_pools(model: nn.Module, pool_size: int = 512, group_size: int = 1, *,
                 linear: str = "last", iters: int = 20, max_points: int | None = 65536,
                 generator: torch.Generator | None = None) -> Pools:
    """One pool per convertible layer of ``model``: k-means of that layer's kernels."""
    return {name: kmeans(kernel_rows(mod, group_size).cpu(), pool_size, iters=iters,
                         max_points=max_points, generator=generator)
            for name, mod in convertible_layers(model, linear).items()}
