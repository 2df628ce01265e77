"""Sparse seed sampling and block indices.

Seeds are rare (``gamma`` is a fraction of a percent at the usual settings), so instead of one
random number per seed position we draw the gaps between consecutive seeds. The gaps of a
Bernoulli(gamma) process over positions ``0, 1, 2, ...`` are i.i.d. Geometric(gamma), so the
cumulative sums of geometric draws are *exactly* the seed positions of independent
Bernoulli(gamma) trials. ``max_seeds`` draws suffice with probability ``1 - 1e-14``.

A seed position is a flat index into the seed grid ``(N, C', *seed_grid)`` (``C' = 1`` when the
mask is shared across channels). Block indices are flat indices into a dense tensor's storage,
computed from its strides, so they work for contiguous and channels_last layouts alike.
"""

from __future__ import annotations

import math

import torch

from dropblock_inject.op.geometry import BlockGeometry, compile_safe_cache

GEOMETRIC_MAX_DRAWS = 4096  # seed_positions: larger samples take the vectorised path


def sample_seed_gaps(
    num_draws: int,
    gamma: float | torch.Tensor,
    *,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sorted seed positions of a Bernoulli(gamma) process, as float64 of shape ``(num_draws,)``.

    Positions past the end of the grid mean "no more seeds"; callers cut or mask them.
    """
    u = uniform53(num_draws, device=device, generator=generator)
    if isinstance(gamma, torch.Tensor):
        log_q = torch.log1p(-gamma.to(torch.float64).clamp(1e-300, 1.0)).clamp(max=-1e-300)
        gaps = torch.floor(torch.log1p(-u) / log_q)
    else:
        log_q = min(math.log1p(-min(max(gamma, 1e-300), 1.0)) if gamma < 1.0 else -math.inf, -1e-300)
        gaps = u.neg_().log1p_().mul_(1.0 / log_q).floor_()
    # positions = cumsum(gaps + 1) - 1 = cumsum(gaps) + arange
    return gaps.cumsum_(0).add_(torch.arange(num_draws, dtype=torch.float64, device=device))


def uniform53(num: int, *, device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """``num`` uniform float64 draws on ``[0, 1)`` with 53 random bits each.

    Eager ``torch.rand`` gives those. Inductor draws ``torch.rand(dtype=torch.float64)`` as
    float32 (24 bits), which would quantise the geometric gaps' distribution and cut its tail,
    so under ``torch.compile`` the draws are 53-bit integers scaled by ``2**-53`` (exact, and as
    fast there).
    """
    # the generator goes in only when there is one: torch.rand/randint with a generator argument,
    # even None, reject symbolic sizes, so a compiled model that meets a new batch size (dynamic
    # shapes) would fail to trace
    drawn_by = {} if generator is None else {"generator": generator}
    if torch.compiler.is_compiling():
        bits = torch.randint(0, 2**53, (num,), dtype=torch.int64, device=device, **drawn_by)
        return bits.to(torch.float64) * 2.0**-53
    return torch.rand(num, dtype=torch.float64, device=device, **drawn_by)


def seed_positions(
    num_positions: int,
    num_draws: int,
    gamma: float,
    *,
    device: torch.device,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """The seed positions (sorted, all ``< num_positions``) of one eager call, as int64 or, with
    ``dtype=torch.float64``, as the sampler's exact float64 integers (no conversion pass).

    Up to :data:`GEOMETRIC_MAX_DRAWS` draws come from ``Tensor.geometric_`` (one serial kernel
    that returns ``gap + 1`` directly, in float64 so that a zero uniform gives ``inf``, "no more
    seeds"); larger samples take the vectorised :func:`sample_seed_gaps`. Both are exact. On a
    busy training step every extra small kernel costs tens of microseconds of cold caches, so
    the short path matters more than its hot-loop timing suggests.
    """
    if 0.0 < gamma < 1.0 and num_draws <= GEOMETRIC_MAX_DRAWS:
        ends = torch.empty(num_draws, dtype=torch.float64, device=device)
        ends = ends.geometric_(gamma, generator=generator).cumsum_(0)  # position + 1
        count = int(torch.searchsorted(ends, float(num_positions), right=True))
        return ends[:count].to(dtype).sub_(1)
    pos = sample_seed_gaps(num_draws, gamma, device=device, generator=generator)
    count = int(torch.searchsorted(pos, float(num_positions)))
    return pos[:count].to(dtype)


def block_rows(
    pos: torch.Tensor,
    geom: BlockGeometry,
    batch_dims: tuple[int, int],
    strides: tuple[int, ...],
) -> tuple[torch.Tensor, int]:
    """The blocks of seeds ``pos`` as rows along the last spatial dimension.

    Args:
        pos: Seed positions ``(K,)``, flat over ``(N, C', *seed_grid)``: int64, or float64 holding
            integers below ``2**52`` (:func:`seed_positions` with ``dtype=torch.float64``), whose
            arithmetic is the faster on CPU.
        geom: The block geometry.
        batch_dims: ``(N, C')``.
        strides: Strides of the dense target tensor, ``(sN, sC, *spatial strides)``; ``sC`` is
            ignored when ``C' == 1``.

    Returns:
        ``(rows, width)``: int64 ``rows`` of shape ``(K, R)`` holding the storage index of the
        first unit of each block row, and the number of units per row (the block's last side;
        1 for ``seed_region="full"``, where rows are single units because edges truncate them).
        Rows repeat where blocks overlap or are truncated.
    """
    grid = (*batch_dims, *geom.seed_grid)
    if batch_dims[1] == 1:
        strides = (strides[0], 0, *strides[2:])
    if geom.seed_region == "valid":
        base = _ravel_to_storage(pos, grid, strides).to(torch.int64)
        offsets = _block_offsets((*geom.block[:-1], 1), tuple(strides[2:]), pos.device)
        return base[:, None] + offsets, geom.block[-1]
    coords = _unravel(pos.to(torch.int64), grid)
    base = coords[0] * strides[0] + coords[1] * strides[1]
    return _truncated_block_indices(base, coords[2:], geom, strides[2:]), 1


def fill_rows(flat: torch.Tensor, rows: torch.Tensor, width: int, step: int, value: float | bool) -> None:
    """Set ``width`` units, ``step`` apart, from each of ``rows`` in the 1-D storage view ``flat``.

    One ``index_fill_`` on an overlapping window view ``(len - (width - 1) * step, width)``: a
    row is one index instead of ``width``, which makes it faster than filling units.
    """
    row_window(flat, width, step).index_fill_(0, rows.reshape(-1), value)


def row_window(flat: torch.Tensor, width: int, step: int) -> torch.Tensor:
    """The overlapping view of :func:`fill_rows`: index ``i`` is the row of ``width`` units from unit ``i``."""
    if width == 1:
        return flat
    return flat.as_strided((flat.numel() - (width - 1) * step, width), (1, step), flat.storage_offset())


def row_units(rows: torch.Tensor, width: int, step: int) -> torch.Tensor:
    """Storage indices of every unit of ``rows``, shape ``(K, R * width)``."""
    if width == 1:
        return rows
    units = rows[..., None] + torch.arange(width, device=rows.device) * step
    return units.reshape(rows.shape[0], -1)


def _ravel_to_storage(pos: torch.Tensor, grid: tuple[int, ...], strides: tuple[int, ...]) -> torch.Tensor:
    """``sum(coord_d * strides[d])`` of the row-major coordinates of ``pos`` in ``grid``.

    With ``q_0 = pos`` and ``q_{j+1} = q_j // G_j`` (innermost dimension first), the coordinate
    is ``c_j = q_j - G_j * q_{j+1}``, so the sum telescopes to
    ``q_0 * s_0 + sum_{j>=1} q_j * (s_j - G_{j-1} * s_{j-1})``: one division per dimension, and
    none for dimensions that coalesce (``s_j == G_{j-1} * s_{j-1}``, e.g. N and C of a
    contiguous tensor).
    """
    sizes, steps = _coalesce(grid, strides)
    base = pos if steps[0] == 1 else pos * steps[0]
    q = pos
    for j in range(1, len(sizes)):
        q = floor_div(q, sizes[j - 1])
        base = base.add(q, alpha=steps[j] - sizes[j - 1] * steps[j - 1])  # one kernel, not two
    return base


def floor_div(q: torch.Tensor, size: int) -> torch.Tensor:
    """``q // size``. float64 integers below ``2**52`` divide exactly (a correctly rounded quotient
    never crosses the next integer there), and several times faster than int64 on CPU."""
    if q.is_floating_point():
        return torch.div(q, size).floor_()
    return torch.div(q, size, rounding_mode="floor")


def _coalesce(grid: tuple[int, ...], strides: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """Innermost-first sizes and strides of ``grid``, size-1 and mergeable dimensions folded."""
    sizes: list[int] = []
    steps: list[int] = []
    for size, stride in zip(reversed(grid), reversed(strides)):
        if size == 1:
            continue
        if sizes and stride == sizes[-1] * steps[-1]:
            sizes[-1] *= size
        else:
            sizes.append(size)
            steps.append(stride)
    return (sizes or [1]), (steps or [1])


@compile_safe_cache(maxsize=256)
def _block_offsets(block: tuple[int, ...], strides: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Flat offsets ``(prod(block),)`` of a block's units from its first unit."""
    offsets = torch.zeros((), dtype=torch.int64, device=device)
    for d, (k, stride) in enumerate(zip(block, strides)):
        shape = [1] * len(block)
        shape[d] = k
        offsets = offsets + (torch.arange(k, device=device) * stride).view(shape)
    return offsets.reshape(-1)


def _truncated_block_indices(
    base: torch.Tensor, seeds: list[torch.Tensor], geom: BlockGeometry, strides: tuple[int, ...]
) -> torch.Tensor:
    """Indices of blocks centred on ``seeds`` and clipped to the map (``seed_region="full"``).

    A coordinate clamped to the edge still lies inside its block, so clamping only repeats
    units of the same block; ``index_fill_`` does not mind duplicates.
    """
    ndim = len(geom.block)
    index = base.view(-1, *([1] * ndim))
    for d, (seed, size, k, start, stride) in enumerate(zip(seeds, geom.spatial, geom.block, geom.block_start, strides)):
        span = (seed[:, None] + (start + torch.arange(k, device=base.device))).clamp(0, size - 1)
        shape = [-1] + [1] * ndim
        shape[1 + d] = k
        index = index + (span * stride).view(shape)
    return index.reshape(base.shape[0], math.prod(geom.block))


def _unravel(flat: torch.Tensor, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Row-major coordinates of flat indices (``torch.unravel_index`` without the tuple cost)."""
    coords = []
    for size in reversed(shape[1:]):
        coords.append(flat % size)
        flat = torch.div(flat, size, rounding_mode="floor")
    coords.append(flat)
    return coords[::-1]
