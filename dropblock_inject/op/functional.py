"""The DropBlock op: ``drop_block(x, drop_prob, block_size)`` on 4-D and 5-D tensors.

Two implementations draw seeds the same way (:mod:`dropblock_inject.op.sampling`), and CUDA has
a third, fused one in Triton (:mod:`dropblock_inject.op.fused`, 4-D and 5-D inputs with small maps):

* eager (:class:`_DropBlockFunction`): the exact seeds, their block rows as storage indices, the
  dropped units counted (from the sorted rows, or a dense ``bool`` map when rows are many), one
  dense multiply by the rescale factor, then the dropped units are zeroed in place through their
  indices. Backward saves the block rows (or the ``bool`` map when that is smaller), at most one
  byte per unit, never a float tensor. Where a block covers the map (7x7 maps with block 7), the
  seeds are whole planes: float32 and float64 inputs take one multiply by a per-plane factor, and
  backward saves the seeds.
* traceable (:func:`~dropblock_inject.op.traceable.drop_block_traceable`, used under
  ``torch.compile``): fixed-size tensors only (no data-dependent shapes, no ``.item()``), one
  dense pass over the input, and a rate that may be a tensor, so a schedule never recompiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from dropblock_inject.op.fused import fused_drop_block, fused_eligible
from dropblock_inject.op.geometry import (
    GAMMA_MODES,
    SEED_REGIONS,
    BlockGeometry,
    block_geometry,
    max_seeds,
)
from dropblock_inject.op.layout import FACTOR_DTYPES, is_dense, seed_batch, shared_strides, storage_view
from dropblock_inject.op.sampling import block_rows, fill_rows, seed_positions
from dropblock_inject.op.traceable import drop_block_traceable

__all__ = ["drop_block", "drop_block_traceable"]

_COUNT_GROUP = 255 * 8  # bytes per group of _count_dropped
_SORT_COUNT_DENSITY = 100  # _count_without_map sorts block rows only below one per this many units
BlockSize = int | Sequence[int]


def drop_block(
    x: torch.Tensor,
    drop_prob: float,
    block_size: BlockSize,
    *,
    gamma_scale: float = 1.0,
    shared_channels: bool = False,
    gamma: str = "paper",
    seed_region: str = "valid",
    training: bool = True,
    generator: torch.Generator | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """DropBlock (Ghiasi et al., 2018): zero random contiguous blocks and rescale the rest.

    Seeds fall with rate ``gamma`` on the positions where a whole block fits (the paper's valid
    region), each with its own mask per channel, and every seed zeroes the block it anchors. The
    kept units are rescaled by ``numel / kept`` (counted in float32), so the expected value is
    preserved; the output has the input's dtype and memory format.

    Args:
        x: Input of shape ``(N, C, H, W)`` or ``(N, C, D, H, W)``.
        drop_prob: Target fraction of dropped units, in ``[0, 1]``.
        block_size: Block side, or one size per spatial dimension (rectangular or cuboid
            blocks). Each side is clipped to the feature size; even sizes are fine.
        gamma_scale: Multiplies the drop rate (timm's ``gamma_scale``; e.g. 0.25 for ResNet
            group 3 in the TF reference). The op aims at ``drop_prob * gamma_scale``.
        shared_channels: One mask per sample shared by all channels (faster, not the paper).
        gamma: ``"paper"`` uses Eq. 1 of the paper, which ignores block overlaps and so drops
            slightly less than asked; ``"calibrated"`` solves for the seed rate whose expected
            dropped fraction, overlaps and edges counted, is exactly the target.
        seed_region: ``"valid"`` (the paper: only where the whole block fits) or ``"full"``
            (seeds anywhere, blocks centred on them and truncated at the edges).
        training: When False the op is the identity.
        generator: Optional ``torch.Generator`` for reproducible masks.
        inplace: Modify ``x`` in place.

    Returns:
        A tensor of the shape, dtype and memory format of ``x``; ``x`` itself (the same object)
        when ``training`` is False or the rate is 0.

    Raises:
        ValueError: ``drop_prob`` outside ``[0, 1]``, a block size below 1, a block tuple of the
            wrong length, an input that is not 4-D or 5-D, or an unknown ``gamma``/``seed_region``.
        TypeError: ``block_size`` is not an int or a tuple of ints.

    Example:
        >>> x = torch.randn(8, 64, 14, 14)
        >>> y = drop_block(x, drop_prob=0.1, block_size=7)
        >>> y.shape
        torch.Size([8, 64, 14, 14])
        >>> drop_block(x, 0.1, 7, training=False) is x
        True
    """
    block = validate_args(drop_prob, block_size, gamma_scale, gamma, seed_region)
    block = _block_for(x, block)
    rate = drop_prob * gamma_scale
    if not training or rate == 0.0:
        return x
    geom = block_geometry(tuple(x.shape[2:]), block, seed_region)
    if torch.compiler.is_compiling():
        return drop_block_traceable(x, rate, geom, shared_channels, gamma, max_rate=rate, generator=generator)
    return drop_block_eager(x, rate, geom, shared_channels, gamma, generator, inplace)


def drop_block_eager(
    x: torch.Tensor,
    rate: float,
    geom: BlockGeometry,
    shared: bool,
    mode: str,
    generator: torch.Generator | None,
    inplace: bool,
) -> torch.Tensor:
    """The eager op at drop ``rate``: the fused Triton kernels where they apply (CUDA), else ATen."""
    if fused_eligible(x, geom, shared):
        return fused_drop_block(x, geom.seed_rate(rate, mode), geom, generator, inplace, shared=shared)
    return _DropBlockFunction.apply(x, rate, geom, shared, mode, generator, inplace)


def validate_args(
    drop_prob: float, block_size: BlockSize, gamma_scale: float, gamma: str, seed_region: str
) -> tuple[int, ...]:
    """Check the op's settings; returns the block size as a tuple (length 1 for an int)."""
    if isinstance(drop_prob, bool) or not isinstance(drop_prob, (int, float)):
        raise TypeError(f"drop_prob must be a float in [0, 1], got {drop_prob!r}")
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob}")
    if isinstance(gamma_scale, bool) or not isinstance(gamma_scale, (int, float)) or gamma_scale < 0:
        raise ValueError(f"gamma_scale must be a non-negative number, got {gamma_scale!r}")
    if gamma not in GAMMA_MODES:
        raise ValueError(f"gamma must be one of {GAMMA_MODES}, got {gamma!r}")
    if seed_region not in SEED_REGIONS:
        raise ValueError(f"seed_region must be one of {SEED_REGIONS}, got {seed_region!r}")
    return _as_block_tuple(block_size)


def _as_block_tuple(block_size: BlockSize) -> tuple[int, ...]:
    sizes = (block_size,) if isinstance(block_size, int) and not isinstance(block_size, bool) else block_size
    if (
        not isinstance(sizes, (tuple, list))
        or not sizes
        or any(isinstance(k, bool) or not isinstance(k, int) for k in sizes)
    ):
        raise TypeError(f"block_size must be an int or a tuple of ints, got {block_size!r}")
    if any(k < 1 for k in sizes):
        raise ValueError(f"block_size must be >= 1 in every dimension, got {block_size!r}")
    if len(sizes) not in (1, 2, 3):
        raise ValueError(f"block_size must have 1, 2 or 3 entries, got {len(sizes)} in {block_size!r}")
    return tuple(sizes)


def _block_for(x: torch.Tensor, block: tuple[int, ...]) -> tuple[int, ...]:
    """Broadcast the block to the input's spatial rank, checking both."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"drop_block expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (4, 5):
        raise ValueError(
            f"drop_block expects a 4-D (N, C, H, W) or 5-D (N, C, D, H, W) input, got shape {tuple(x.shape)}"
        )
    ndim = x.dim() - 2
    if len(block) == 1:
        return block * ndim
    if len(block) != ndim:
        raise ValueError(f"block_size {block} has {len(block)} entries but the input has {ndim} spatial dimensions")
    return block


def _new_dropped_map(numel: int, device: torch.device) -> torch.Tensor:
    """A zeroed ``bool`` map of ``numel`` units, padded to whole groups of 255 8-byte words."""
    return torch.zeros(-(-numel // _COUNT_GROUP) * _COUNT_GROUP, dtype=torch.bool, device=device)


def _count_dropped(dropped: torch.Tensor) -> torch.Tensor:
    """Number of True entries of a padded map from :func:`_new_dropped_map`, as a 0-d int64.

    Every byte is 0 or 1, so summing 255 int64 words adds each byte lane without a carry; the
    lane sums are then bytes again. Faster than ``count_nonzero`` on CPU.
    """
    lanes = dropped.view(torch.int64).view(-1, 255).sum(1)
    return lanes.view(torch.uint8).sum()


class _DropBlockFunction(torch.autograd.Function):
    """Eager DropBlock with a lean backward (block rows, a bool map or the dropped planes are all it saves)."""

    @staticmethod
    def forward(ctx, x, rate, geom, shared, mode, generator, inplace):
        if not is_dense(x):
            x = x.contiguous()
            inplace = False
        batch, num_pos = seed_batch(x, geom, shared)
        gamma = geom.seed_rate(rate, mode)
        pos = seed_positions(num_pos, max_seeds(num_pos, gamma), gamma, device=x.device, generator=generator)
        # half inputs keep the rows path: a float32 factor tensor would take ATen's mixed-dtype loop
        # (measured slower for bfloat16), a half one would round the scale
        if math.prod(geom.seed_grid) == 1 and x.dtype in FACTOR_DTYPES:
            return _drop_planes(ctx, x, pos, batch, inplace)
        strides = shared_strides(x) if shared else x.stride()
        rows, width = block_rows(pos, geom, batch, strides)
        numel = batch[0] * batch[1] * math.prod(geom.spatial)
        small_rows = not shared and rows.numel() * 8 <= numel  # then backward keeps the rows
        dropped = _count_without_map(rows, width, geom, x, numel) if small_rows else None
        if dropped is None:
            dropped_map = _new_dropped_map(numel, x.device)
            fill_rows(dropped_map, rows, width, strides[-1], True)
            dropped = int(_count_dropped(dropped_map))
        scale = _kept_scale(numel, dropped)
        ctx.planes, ctx.shared, ctx.scale, ctx.width = False, shared, scale, width
        if shared:
            out = _scale_shared(x, dropped_map[:numel], scale, inplace)
            ctx.save_for_backward(dropped_map[:numel])
        else:
            out = x.mul_(scale) if inplace else x * scale
            fill_rows(storage_view(out), rows, width, strides[-1], 0)
            ctx.x_layout = (x.shape, x.stride())
            # at most one byte per unit either way: the block rows, else the dense bool map
            ctx.save_for_backward(rows if small_rows else dropped_map[:numel])
        if inplace:
            ctx.mark_dirty(x)
        return out

    @staticmethod
    def backward(ctx, grad):
        (saved,), scale = ctx.saved_tensors, ctx.scale
        if ctx.planes:
            return _scale_planes(grad, saved, ctx.batch, scale), None, None, None, None, None, None
        if ctx.shared:
            return _scale_shared(grad, saved, scale, False), None, None, None, None, None, None
        shape, stride = ctx.x_layout
        if saved.dtype == torch.bool:
            grad = (grad * scale).masked_fill_(saved.as_strided(shape, stride), 0)
        else:  # block rows: storage indices in the input's layout, which the gradient takes
            grad = torch.mul(grad, scale, out=grad.new_empty_strided(shape, stride))
            fill_rows(storage_view(grad), saved, ctx.width, stride[-1], 0)
        return grad, None, None, None, None, None, None


def _kept_scale(numel: int, dropped: int) -> float:
    """``numel / kept``; 0. when nothing is kept (the output is then all zeros)."""
    kept = numel - dropped
    return numel / kept if kept else 0.0


def _drop_planes(ctx, x: torch.Tensor, pos: torch.Tensor, batch: tuple[int, int], inplace: bool) -> torch.Tensor:
    """Blocks that cover the map: every seed position is a whole plane (a sample when the mask is
    shared), so the op is one multiply by a per-plane factor (SpatialDropout), with no block rows
    to fill. Backward saves the seeds only. A dropped plane is ``x * 0.``, as in ``nn.Dropout2d``:
    an inf or NaN there stays NaN, where the block-rows path writes exact zeros.
    """
    ctx.planes, ctx.batch = True, batch  # backward needs nothing else
    ctx.scale = _kept_scale(batch[0] * batch[1], pos.numel())
    ctx.save_for_backward(pos)
    if inplace:
        ctx.mark_dirty(x)
        return x.mul_(_plane_factor(x, pos, batch, ctx.scale))
    return _scale_planes(x, pos, batch, ctx.scale)


def _scale_planes(t: torch.Tensor, pos: torch.Tensor, batch: tuple[int, int], scale: float) -> torch.Tensor:
    """``t`` times :func:`_plane_factor`, as a new tensor in ``t``'s dtype and memory format."""
    return torch.mul(t, _plane_factor(t, pos, batch, scale), out=torch.empty_like(t))


def _plane_factor(like: torch.Tensor, pos: torch.Tensor, batch: tuple[int, int], scale: float) -> torch.Tensor:
    """``(N, C', 1, ...)`` in ``like``'s dtype: 0. at the dropped planes ``pos`` (flat over ``N * C'``),
    else ``scale``."""
    factor = torch.full((batch[0] * batch[1],), scale, dtype=like.dtype, device=like.device)
    return factor.index_fill_(0, pos, 0.0).view(*batch, *([1] * (like.dim() - 2)))


def _count_without_map(rows: torch.Tensor, width: int, geom: BlockGeometry, x: torch.Tensor, numel: int) -> int | None:
    """The number of dropped units of per-channel blocks, where it is cheaper than a dense map.

    That is a contiguous input with few block rows: the rows are then flat ``plane, row, column``
    indices, and in the valid region a block row never reaches the next map row. Sorted, each
    row adds ``min(width, gap to the next row)`` units, so overlaps count once.

    Returns None where the dense ``bool`` map of :func:`_new_dropped_map` is the better count.
    """
    if geom.seed_region != "valid":
        return None
    if not x.is_contiguous() or rows.numel() * _SORT_COUNT_DENSITY > numel:
        return None
    if rows.numel() == 0:
        return 0
    starts = torch.sort(rows.reshape(-1)).values
    return int(starts.diff().clamp_(max=width).sum()) + width


def _scale_shared(t: torch.Tensor, dropped: torch.Tensor, scale: float, inplace: bool) -> torch.Tensor:
    """``t`` times the shared-channel keep mask ``(N, 1, *spatial)`` and ``scale``, rounded once.

    float32 and float64 fold the scale into the mask (one pass over ``t``); half types multiply by
    the scalar first (in float32), then by the exact 0/1 mask.
    """
    keep = (~dropped).view(t.shape[0], 1, *t.shape[2:]).to(t.dtype)
    if t.dtype in FACTOR_DTYPES:
        keep = keep.mul_(scale)
        return t.mul_(keep) if inplace else t * keep
    scaled = t.mul_(scale) if inplace else t * scale
    return scaled.mul_(keep)
