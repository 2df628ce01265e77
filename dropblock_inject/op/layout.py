"""Memory-layout helpers shared by the eager and the traceable op."""

from __future__ import annotations

import math

import torch

from dropblock_inject.op.geometry import BlockGeometry

EPS = 1e-7
# dtypes whose own factor tensors (a scale folded into a mask) give the product that a multiply by
# the Python scalar gives; half types would round the scale to 8 or 11 bits first, so they rescale
# in float32 and round once
FACTOR_DTYPES = (torch.float32, torch.float64)


def storage_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor's elements in storage order."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def is_dense(t: torch.Tensor) -> bool:
    """True for contiguous and channels_last(_3d) tensors (no gaps, no overlaps)."""
    if t.dim() == 5:
        return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last_3d)
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def as_dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when :func:`is_dense`, else a contiguous copy."""
    return t if is_dense(t) else t.contiguous()


def seed_batch(x: torch.Tensor, geom: BlockGeometry, shared: bool) -> tuple[tuple[int, int], int]:
    """``((N, C'), number of seed positions)``; ``C' = 1`` when the mask is shared across channels."""
    batch = (x.shape[0], 1 if shared else x.shape[1])
    return batch, batch[0] * batch[1] * math.prod(geom.seed_grid)


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Strides of a contiguous tensor of ``shape``."""
    strides = [1]
    for size in reversed(shape[1:]):
        strides.insert(0, strides[0] * size)
    return tuple(strides)


def shared_strides(x: torch.Tensor) -> tuple[int, ...]:
    """Strides of the contiguous ``(N, 1, *spatial)`` mask of the shared-channel mode."""
    return contiguous_strides((x.shape[0], 1, *x.shape[2:]))


def rescale(numel: int, dropped_count: torch.Tensor) -> torch.Tensor:
    """``numel / kept`` as a 0-d float32 tensor, ``kept`` counted in float32 (no host sync)."""
    return numel / ((numel - dropped_count).to(torch.float32) + EPS)
