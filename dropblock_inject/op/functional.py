"""The DropBlock op: ``drop_block(x, drop_prob, block_size)`` on 4-D and 5-D tensors.

Two implementations draw the same exact Bernoulli seeds (:mod:`dropblock_inject.op.sampling`), and
CUDA has a third, fused one in Triton (:mod:`dropblock_inject.op.fused`, 4-D and 5-D inputs with small maps):

* eager (:class:`_DropBlockFunction`), three paths by size:

  - small seed grids (up to ``DENSE_MAX_POSITIONS`` positions: shared masks at 7x7 and 14x14,
    small inputs): a uniform draw per seed position and one matrix product with a 0/1 coverage
    matrix give a dense ``bool`` mask in a handful of small ops (at these sizes the mask's cost
    is the calls' host time);
  - blocks that cover the map (7x7 maps with block 7): the seeds are whole planes, and float32
    and float64 inputs take one multiply by a per-plane factor; backward saves the seeds;
  - otherwise the exact sparse seeds as block rows (storage indices): the dropped units counted
    (from the sorted rows, plane by plane on CPU where seeds are about one per plane or fewer,
    else a dense ``bool`` map), then one multiply by the rescale factor with the rows zeroed in
    place through their indices; on CPU a large contiguous input does both a chunk at a time, so
    the fills find the output in cache. Shared masks multiply by a broadcast factor instead.

  Backward saves the block rows, the seeds or a ``bool`` mask, at most one byte per unit and
  never a float tensor.
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
    compile_safe_cache,
    max_seeds,
)
from dropblock_inject.op.layout import (
    FACTOR_DTYPES,
    contiguous_strides,
    is_dense,
    seed_batch,
    shared_strides,
    storage_view,
)
from dropblock_inject.op.sampling import (
    GEOMETRIC_MAX_DRAWS,
    block_rows,
    fill_rows,
    floor_div,
    row_window,
    seed_positions,
)
from dropblock_inject.op.traceable import drop_block_traceable

__all__ = ["drop_block", "drop_block_traceable"]

_COUNT_GROUP = 255 * 8  # bytes per group of _count_dropped
_SORT_COUNT_DENSITY = 100  # _count_without_map sorts block rows only below one per this many units
_CHUNK_UNITS = 1 << 20  # units per chunk of the multiply-and-fill and of a large map (they stay in cache)
_CHUNK_MIN_UNITS = 1 << 23  # inputs this large work in chunks; smaller ones only with many rows:
_CHUNK_ROW_DENSITY = 32  # ... at least one block row per this many units
_CHUNK_MAP_UNITS = 1 << 24  # maps of more units than this are built a chunk at a time
_PLANES_COUNT_DENSITY = 128  # _count_by_planes counts where there are this many units per seed or more
DENSE_MAX_POSITIONS = 8192  # seed positions up to which a call draws them all (_drop_dense)
DENSE_MAX_UNITS = 1 << 18  # ... and per-channel units up to which it zeroes them through a dense mask
DENSE_MAX_COVERAGE = 1 << 16  # ... and entries of its coverage matrix
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
    return torch.zeros(_padded_map_size(numel), dtype=torch.bool, device=device)


def _padded_map_size(numel: int) -> int:
    return -(-numel // _COUNT_GROUP) * _COUNT_GROUP


def _bytes_of(t: torch.Tensor | None, size: int) -> torch.Tensor | None:
    """The first ``size`` bytes of a dense tensor's memory as a 1-D ``bool`` tensor (None if fewer)."""
    if t is None or t.numel() * t.element_size() < size:
        return None
    return storage_view(t).view(torch.uint8)[:size].view(torch.bool)


def _count_dropped(dropped: torch.Tensor) -> torch.Tensor:
    """Number of True entries of a padded map from :func:`_new_dropped_map`, as a 0-d int64.

    Every byte is 0 or 1, so summing 255 int64 words adds each byte lane without a carry; the
    lane sums are then bytes again. Faster than ``count_nonzero`` on CPU.
    """
    lanes = dropped.view(torch.int64).view(-1, 255).sum(1)
    return lanes.view(torch.uint8).sum()


class _DropBlockFunction(torch.autograd.Function):
    """Eager DropBlock with a lean backward: block rows, a ``bool`` mask or the dropped planes are all
    it saves, at most one byte per unit."""

    @staticmethod
    def forward(ctx, x, rate, geom, shared, mode, generator, inplace):
        if not is_dense(x):
            x = x.contiguous()
            inplace = False
        batch, num_pos = seed_batch(x, geom, shared)
        gamma = geom.seed_rate(rate, mode)
        # half inputs keep the rows path: a float32 factor tensor would take ATen's mixed-dtype loop
        # (measured slower for bfloat16), a half one would round the scale
        planes = math.prod(geom.seed_grid) == 1 and x.dtype in FACTOR_DTYPES
        if not planes and _dense_fits(geom, num_pos, x.numel(), shared):
            out = _drop_dense(ctx, x, gamma, geom, batch, shared, generator, inplace)
        else:
            draws = max_seeds(num_pos, gamma)
            # many seeds: float64 positions, whose index arithmetic is the faster (and exact while
            # every partial sum of a storage index stays below 2**52); few: int64, fewer ops
            many = draws > GEOMETRIC_MAX_DRAWS and num_pos * max(x.stride()) < 2**52
            dtype = torch.float64 if many else torch.int64
            pos = seed_positions(num_pos, draws, gamma, device=x.device, generator=generator, dtype=dtype)
            if planes:
                out = _drop_planes(ctx, x, pos.to(torch.int64), batch, inplace)
            else:
                out = _drop_rows(ctx, x, pos, geom, batch, shared, inplace)
        if inplace:
            ctx.mark_dirty(x)
        return out

    @staticmethod
    def backward(ctx, grad):
        (saved,), scale, kind = ctx.saved_tensors, ctx.scale, ctx.kind
        if kind == "planes":
            grad = _scale_planes(grad, saved, ctx.batch, scale)
        elif kind == "keep":
            grad = _scale_shared(grad, saved, scale, False)
        elif kind == "dropped":
            grad = _scale_dropped(grad, saved, scale, False)
        elif saved.dtype == torch.bool:  # the dense map, in the input's storage layout
            shape, stride = ctx.x_layout
            grad = (grad * scale).masked_fill_(saved.as_strided(shape, stride), 0)
        else:  # block rows: storage indices in the input's layout, which the gradient takes
            shape, stride = ctx.x_layout
            out = None if grad.stride() == stride else grad.new_empty_strided(shape, stride)
            grad = _scale_rows(grad, scale, saved, ctx.width, ctx.chunked and out is None, out)
        return grad, None, None, None, None, None, None


def _dense_fits(geom: BlockGeometry, num_pos: int, numel: int, shared: bool) -> bool:
    """Whether :func:`_drop_dense` takes the call: few seed positions, a small coverage matrix, and
    (per channel, where the mask is as large as the input) few units."""
    small_matrix = math.prod(geom.seed_grid) * math.prod(geom.spatial) <= DENSE_MAX_COVERAGE
    return num_pos <= DENSE_MAX_POSITIONS and small_matrix and (shared or numel <= DENSE_MAX_UNITS)


def _drop_dense(
    ctx,
    x: torch.Tensor,
    gamma: float,
    geom: BlockGeometry,
    batch: tuple[int, int],
    shared: bool,
    generator: torch.Generator | None,
    inplace: bool,
) -> torch.Tensor:
    """Small seed grids: a draw for every seed position and a dense ``bool`` mask, in a few small ops.

    A seed position is a seed when its uniform draw (53 bits, as the sparse sampler's) is below
    ``gamma``. The seeds (0. or 1.) times a 0/1 matrix of which seed positions cover which units
    (:func:`_coverage`) count the blocks over each unit: exact small integers, so a unit is
    dropped where its count is above 0. Per-channel masks zero their units exactly, as the block
    rows do; a shared mask is a broadcast factor, as in the sparse shared path. Backward saves the
    ``bool`` mask.
    """
    seeds = torch.rand((batch[0] * batch[1], math.prod(geom.seed_grid)), dtype=torch.float64, device=x.device,
                       generator=generator) < gamma  # fmt: skip
    covers = torch.mm(seeds.to(torch.float32), _coverage(geom, x.device)).view(*batch, *geom.spatial)
    if shared:
        keep = covers == 0
        ctx.kind, ctx.scale = "keep", _kept_scale(keep.numel(), keep.numel() - int(keep.sum()))
        ctx.save_for_backward(keep)
        return _scale_shared(x, keep, ctx.scale, inplace)
    dropped = covers > 0
    ctx.kind, ctx.scale = "dropped", _kept_scale(dropped.numel(), int(dropped.sum()))
    ctx.save_for_backward(dropped)
    return _scale_dropped(x, dropped, ctx.scale, inplace)


@compile_safe_cache(maxsize=256)
def _coverage(geom: BlockGeometry, device: torch.device) -> torch.Tensor:
    """float32 ``(prod(seed_grid), prod(spatial))``: 1. where the block of a seed position (row-major)
    covers a unit (row-major), else 0.; the Kronecker product of one band matrix per dimension."""
    matrix = torch.ones(1, 1)
    for size, k, start, grid in zip(geom.spatial, geom.block, geom.block_start, geom.seed_grid):
        seed = torch.arange(grid)[:, None] + start
        unit = torch.arange(size)[None, :]
        matrix = torch.kron(matrix, ((unit >= seed) & (unit < seed + k)).to(torch.float32))
    return matrix.to(device)


def _drop_rows(
    ctx,
    x: torch.Tensor,
    pos: torch.Tensor,
    geom: BlockGeometry,
    batch: tuple[int, int],
    shared: bool,
    inplace: bool,
) -> torch.Tensor:
    """The seeds ``pos`` as block rows: counted (from the sorted rows, plane by plane, or with a dense
    ``bool`` map), then ``x`` rescaled with the rows zeroed in place (per channel) or multiplied by
    the shared mask."""
    strides = shared_strides(x) if shared else x.stride()
    rows, width = block_rows(pos, geom, batch, strides)
    numel = batch[0] * batch[1] * math.prod(geom.spatial)
    chunked = not shared and _chunks_fit(x, geom, rows.numel(), numel)
    small_rows = not shared and rows.numel() * 8 <= numel  # then backward keeps the rows
    dropped = _count_without_map(rows, width, geom, x, numel) if small_rows else None
    if dropped is None and small_rows and _count_planes_fits(geom, pos.numel(), batch, numel, x.device):
        dropped = _count_by_planes(pos, geom)
    out = None if shared or inplace else torch.empty_like(x)
    if dropped is None:
        # a map that backward does not keep lives in the output's memory until the multiply
        # overwrites it: no allocation of its own, and no cache lines besides the output's
        scratch = _bytes_of(out, _padded_map_size(numel)) if small_rows else None
        chunk_map = chunked and numel > _CHUNK_MAP_UNITS
        dropped_map = _rows_map(rows, width, strides[-1], numel, x.device, chunk_map, scratch)
        dropped = int(_count_dropped(dropped_map))
        dropped_map = dropped_map[:numel]
    scale = _kept_scale(numel, dropped)
    ctx.scale, ctx.width, ctx.chunked = scale, width, chunked
    if shared:
        keep = dropped_map.view(batch[0], 1, *geom.spatial).logical_not()
        ctx.kind = "keep"
        ctx.save_for_backward(keep)
        return _scale_shared(x, keep, scale, inplace)
    ctx.kind, ctx.x_layout = "rows", (x.shape, x.stride())
    # at most one byte per unit either way: the block rows, else the dense bool map
    ctx.save_for_backward(rows if small_rows else dropped_map)
    return _scale_rows(x, scale, rows, width, chunked, x if inplace else out)


def _chunks_fit(x: torch.Tensor, geom: BlockGeometry, rows: int, numel: int) -> bool:
    """Whether :func:`_scale_rows` works a chunk at a time (on CPU, for its caches): a seed's rows must
    end at a fixed offset from its first unit and rise with the seeds (the valid region of a
    contiguous input), and the input be large, or the rows many (the chunks' calls cost more than
    the cache misses they save elsewhere)."""
    if x.device.type != "cpu" or geom.seed_region != "valid" or not x.is_contiguous() or numel < 2 * _CHUNK_UNITS:
        return False
    return numel >= _CHUNK_MIN_UNITS or rows * _CHUNK_ROW_DENSITY >= numel


def _count_planes_fits(
    geom: BlockGeometry, seeds: int, batch: tuple[int, int], numel: int, device: torch.device
) -> bool:
    """Whether :func:`_count_by_planes` is the cheaper count (on CPU, where the full map's cost is
    its cache footprint): the valid region, about a seed per plane or fewer, and many units per
    seed (its work grows with the seeds, the map's with the units)."""
    if device.type != "cpu" or geom.seed_region != "valid":
        return False
    return seeds <= batch[0] * batch[1] and seeds * _PLANES_COUNT_DENSITY <= numel


def _count_by_planes(pos: torch.Tensor, geom: BlockGeometry) -> int:
    """The number of dropped units of per-channel blocks in the valid region, counted plane by plane.

    With about a seed per plane or fewer, most seeds are alone in their plane and drop exactly a
    whole block; only the planes with several seeds need a map, and a map of those planes alone
    is small enough to stay in cache (the full map, as large as the input in bytes, pushes the
    input and the output out of it).
    """
    per_plane, area = math.prod(geom.seed_grid), math.prod(geom.block)
    plane = floor_div(pos, per_plane)
    same = plane[1:] == plane[:-1]  # seeds are sorted: a plane's seeds are neighbours
    shares = torch.zeros(pos.numel(), dtype=torch.bool, device=pos.device)
    shares[1:] = same
    shares[:-1] |= same
    index = shares.nonzero().view(-1)
    alone = pos.numel() - index.numel()
    if not index.numel():
        return alone * area
    pos, plane = pos.index_select(0, index), plane.index_select(0, index)
    # those planes, numbered 0, 1, ... in a compact (planes, 1, *spatial) tensor: a seed's position
    # there is pos - (plane - number) * per_plane
    first = torch.ones_like(plane)
    torch.ne(plane[1:], plane[:-1], out=first[1:])
    number = first.cumsum_(0)
    local = pos.sub_(plane.sub_(number).add_(1), alpha=per_plane)
    planes = int(number[-1])
    rows, width = block_rows(local, geom, (planes, 1), contiguous_strides((planes, 1, *geom.spatial)))
    dropped_map = _new_dropped_map(planes * math.prod(geom.spatial), pos.device)
    fill_rows(dropped_map, rows, width, 1, True)
    return alone * area + int(_count_dropped(dropped_map))


def _rows_map(
    rows: torch.Tensor,
    width: int,
    step: int,
    numel: int,
    device: torch.device,
    chunked: bool,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """A padded ``bool`` map (:func:`_new_dropped_map`) with the units of ``rows`` set, in ``scratch``
    (a ``bool`` tensor of that size) where given.

    ``chunked``: zeroed and filled a chunk at a time (see :func:`_chunk_rows`), so that the fills
    find the map in cache.
    """
    if not chunked:
        dropped_map = _new_dropped_map(numel, device) if scratch is None else scratch.zero_()
        fill_rows(dropped_map, rows, width, step, True)
        return dropped_map
    dropped_map = torch.empty(_padded_map_size(numel), dtype=torch.bool, device=device) if scratch is None else scratch
    dropped_map[numel:].zero_()
    window = row_window(dropped_map, width, step)
    for part, part_rows in zip(dropped_map[:numel].split(_CHUNK_UNITS), _chunk_rows(rows, width, step, numel)):
        part.zero_()
        if part_rows.numel():
            window.index_fill_(0, part_rows, True)
    return dropped_map


def _scale_rows(
    src: torch.Tensor, scale: float, rows: torch.Tensor, width: int, chunked: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``src * scale`` with the units of ``rows`` zeroed, in ``out`` (which may be ``src``) or a new
    tensor in ``src``'s layout.

    ``chunked``: a chunk of the multiply, then the rows that end in it, so that the fills find
    the output in cache; ``src`` and ``out`` share a contiguous layout.
    """
    if not chunked:
        out = src * scale if out is None else torch.mul(src, scale, out=out)
        fill_rows(storage_view(out), rows, width, out.stride()[-1], 0)
        return out
    out = torch.empty_like(src) if out is None else out
    step = out.stride()[-1]
    window = row_window(storage_view(out), width, step)
    src_parts, out_parts = storage_view(src).split(_CHUNK_UNITS), storage_view(out).split(_CHUNK_UNITS)
    for src_part, out_part, part_rows in zip(src_parts, out_parts, _chunk_rows(rows, width, step, out.numel())):
        torch.mul(src_part, scale, out=out_part)
        if part_rows.numel():
            window.index_fill_(0, part_rows, 0)
    return out


def _chunk_rows(rows: torch.Tensor, width: int, step: int, numel: int) -> tuple[torch.Tensor, ...]:
    """``rows`` (flat) split by the chunk of ``_CHUNK_UNITS`` units in which each seed's block ends.

    A seed's rows go with the chunk of its last unit: once that chunk is done, every unit they
    touch has been, and no later chunk writes them again. Needs seeds whose last units rise with
    the seeds (the valid region of a contiguous tensor).
    """
    last = rows[:, -1] + (width - 1) * step
    bounds = torch.arange(_CHUNK_UNITS, numel, _CHUNK_UNITS, device=rows.device)
    cuts = torch.searchsorted(last, bounds).mul_(rows.shape[1])
    return rows.reshape(-1).tensor_split(cuts.tolist())


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
    ctx.kind, ctx.batch = "planes", batch  # backward needs nothing else
    ctx.scale = _kept_scale(batch[0] * batch[1], pos.numel())
    ctx.save_for_backward(pos)
    if inplace:
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


def _scale_dropped(t: torch.Tensor, dropped: torch.Tensor, scale: float, inplace: bool) -> torch.Tensor:
    """``t * scale`` (rounded once) with the units of the per-channel ``bool`` mask ``dropped`` zeroed
    exactly, as the block rows are."""
    scaled = t.mul_(scale) if inplace else t * scale
    return scaled.masked_fill_(dropped, 0)


def _scale_shared(t: torch.Tensor, keep: torch.Tensor, scale: float, inplace: bool) -> torch.Tensor:
    """``t`` times the shared ``bool`` keep mask ``(N, 1, *spatial)`` and ``scale``, rounded once.

    float32 and float64 fold the scale into the mask (one pass over ``t``); half types multiply by
    the scalar first (in float32), then by the exact 0/1 mask.
    """
    if t.dtype in FACTOR_DTYPES:
        factor = keep.to(t.dtype).mul_(scale)
        return t.mul_(factor) if inplace else t * factor
    scaled = t.mul_(scale) if inplace else t * scale
    return scaled.mul_(keep.to(t.dtype))
