"""DropBlock for ``torch.compile``: static shapes, a tensor rate, one dense pass over the input.

The eager op (:mod:`~dropblock_inject.op.functional`) gets its speed from data-dependent shapes
(as many indices as there are seeds), which a compiled graph cannot have. Here every tensor has a
size fixed by the input's shape, and the work is arranged so that Inductor emits one dense
kernel over ``x`` whose inner loop is a load, a table load, a multiply and a store:

1. Seeds: ``max_seeds`` geometric gaps (exact Bernoulli seeds, as in eager); draws past the grid
   are masked out.
2. Seed words: each row of a plane's seed grid becomes one integer whose bit ``c`` is the seed
   in column ``c`` (positions are distinct, so ``index_add`` of ``1 << c`` is an exact OR).
   The words are stored row-major with the plane index innermost, so the vertical dilation
   below is a handful of shifted, fully vectorised ORs of whole rows of planes.
3. Vertical dilation: the word of output row ``r`` is the OR of the seed rows whose blocks
   cover ``r`` (per leading spatial dimension: 1 for ``(H, W)``, 2 for ``(D, H, W)``).
4. Keep table: output column ``w`` is dropped iff the word has a bit in the window of seed
   columns whose blocks cover ``w``. A constant table ``keep[word, w]`` (0. or 1.) turns that into
   a contiguous load per row; wide seed grids use one 256-row table per byte of the word and
   multiply them. The dropped count comes from a count table (narrow grids) or a popcount of
   the horizontally dilated word (wide grids), so the rescale needs no pass over ``x``.

Seed grids wider than :data:`MAX_WORD_BITS` columns (maps wider than ~60) use a slower but
equally exact path that fills a dense ``bool`` map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dropblock_inject.op.geometry import BlockGeometry, max_seeds
from dropblock_inject.op.layout import contiguous_strides, is_dense, rescale, seed_batch
from dropblock_inject.op.sampling import block_rows, row_units, sample_seed_gaps

__all__ = ["MAX_WORD_BITS", "drop_block_traceable", "keep_mask", "seed_rate_tensor"]

MAX_WORD_BITS = 62  # highest bit index a dilated int64 row word may use
_TABLE_BITS = 10  # seed words up to this many columns use a single keep table (1024 rows)
_CHUNK_BITS = 8  # wider words: one table per byte
_SIMD_FLOATS = 8  # float32 lanes of an AVX2 vector: narrower rows are grouped
_NEWTON_STEPS = 40


def drop_block_traceable(
    x: torch.Tensor,
    rate: float | torch.Tensor,
    geom: BlockGeometry,
    shared_channels: bool,
    gamma: str,
    *,
    max_rate: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DropBlock with static shapes only, for ``torch.compile`` and a tensor ``rate``.

    The same seed distribution as the eager op: ``max_seeds`` geometric gaps for the largest
    rate ``max_rate``, so changing ``rate`` (a 0-d tensor) never changes a shape or recompiles.

    Args:
        x: Input ``(N, C, *spatial)``, ``spatial == geom.spatial``.
        rate: Drop rate (a float or a 0-d tensor, at most ``max_rate``).
        geom: Block geometry of ``x``.
        shared_channels: One mask per sample for all channels.
        gamma: ``"paper"`` or ``"calibrated"``.
        max_rate: Upper bound of ``rate`` (a float), which sizes the seed sample.
        generator: Optional ``torch.Generator``.

    Returns:
        A new tensor of the shape, dtype and memory format of ``x``.

    Example:
        >>> from dropblock_inject.op.geometry import block_geometry
        >>> x = torch.randn(4, 8, 14, 14)
        >>> y = drop_block_traceable(x, torch.tensor(0.1), block_geometry((14, 14), (7, 7)), False, "paper",
        ...                          max_rate=0.1)
        >>> y.shape, y.dtype
        (torch.Size([4, 8, 14, 14]), torch.float32)
    """
    if not is_dense(x):
        x = x.contiguous()
    batch, num_pos = seed_batch(x, geom, shared_channels)
    seed_rate = seed_rate_tensor(geom, rate, gamma) if isinstance(rate, torch.Tensor) else geom.seed_rate(rate, gamma)
    num_draws = max_seeds(num_pos, geom.seed_rate(max_rate, gamma))
    pos = sample_seed_gaps(num_draws, seed_rate, device=x.device, generator=generator)
    keep, dropped = keep_mask(pos, geom, batch)
    factor = keep.reshape(*batch, *geom.spatial) * rescale(keep.numel(), dropped)
    if x.dtype in (torch.float32, torch.float64):
        return x * factor
    return (x.float() * factor).to(x.dtype)  # half types: rescale in float32, round once


def keep_mask(pos: torch.Tensor, geom: BlockGeometry, batch: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The keep mask of seed positions ``pos`` and its number of dropped units.

    Args:
        pos: Sorted seed positions, float64 ``(K,)``, flat over ``(N, C', *seed_grid)``; those
            ``>= N * C' * prod(seed_grid)`` are not seeds.
        geom: The block geometry.
        batch: ``(N, C')``.

    Returns:
        ``(keep, dropped)``: float32 ``(N * C', *spatial)`` of 0. (dropped) and 1. (kept), and the
        number of zeros as a 0-d int64 tensor.
    """
    planes = batch[0] * batch[1]
    if _fits_row_words(geom):
        return _row_word_keep(pos, geom, planes)
    return _dense_keep(pos, geom, planes)


def _seed_index(pos: torch.Tensor, num_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which draws are seeds (``pos < num_pos``), and every draw as an in-range int64 position."""
    return pos < num_pos, pos.clamp(max=num_pos - 1).to(torch.int64)


def _fits_row_words(geom: BlockGeometry) -> bool:
    grid_w, k = geom.seed_grid[-1], geom.block[-1]
    return grid_w + k - 2 <= MAX_WORD_BITS


def _row_word_keep(pos: torch.Tensor, geom: BlockGeometry, planes: int) -> tuple[torch.Tensor, torch.Tensor]:
    grid, grid_w = geom.seed_grid, geom.seed_grid[-1]
    num_pos = planes * math.prod(grid)
    rows = math.prod(grid[:-1])  # seed rows per plane
    real, index = _seed_index(pos, num_pos)
    word = torch.div(index, grid_w, rounding_mode="floor")
    col = index - word * grid_w
    plane = torch.div(word, rows, rounding_mode="floor")
    dtype = torch.int32 if grid_w <= 31 else torch.int64
    bits = torch.where(real, torch.ones_like(col) << col, 0).to(dtype)
    words = torch.zeros(planes * rows, dtype=dtype, device=pos.device)
    words = words.index_add(0, (word - plane * rows) * planes + plane, bits).view(*grid[:-1], planes)
    for dim in range(len(grid) - 1):
        words = _dilate(words, dim, geom.spatial[dim], geom.block_start[dim], geom.block[dim])
    words = words.movedim(-1, 0)  # (planes, *spatial[:-1])
    windows = _column_windows(geom)
    dropped = _popcount(_dilate_columns(words, geom)).sum()
    if grid_w <= _TABLE_BITS:
        return _narrow_or_single_table(words, windows, geom), dropped
    keep = None
    for lo in range(0, grid_w, _CHUNK_BITS):
        table = _keep_table(windows, lo, min(_CHUNK_BITS, grid_w - lo), pos.device)
        part = table[(words >> lo) & ((1 << _CHUNK_BITS) - 1)]
        keep = part if keep is None else keep * part
    return keep, dropped


def _narrow_or_single_table(words: torch.Tensor, windows: tuple[int, ...], geom: BlockGeometry) -> torch.Tensor:
    """``keep`` from one table; rows narrower than a SIMD vector are looked up ``g`` rows at a time.

    A 7-wide row would leave Inductor one partial vector per row (and a poor loop order); the
    ``g`` rows' words are concatenated into one index of a table whose rows are ``g * W`` wide.
    """
    grid_w, width = geom.seed_grid[-1], geom.spatial[-1]
    group = -(-_SIMD_FLOATS // width)
    if width >= _SIMD_FLOATS or group * grid_w > _TABLE_BITS:
        return _keep_table(windows, 0, grid_w, words.device)[words]
    planes, rows = words.shape[0], math.prod(words.shape[1:])
    padded = words.reshape(planes, rows).contiguous()  # words are plane-innermost: one small copy
    if rows % group:
        padded = F.pad(padded, (0, group - rows % group))
    padded = padded.view(planes, -1, group)
    index = padded[..., 0]
    for j in range(1, group):
        index = index | (padded[..., j] << (j * grid_w))
    grouped = tuple(m << (j * grid_w) for j in range(group) for m in windows)
    keep = _keep_table(grouped, 0, group * grid_w, words.device)[index]
    return keep.reshape(planes, -1)[:, : rows * width].reshape(planes, *geom.spatial)


def _dilate(words: torch.Tensor, dim: int, size: int, start: int, k: int) -> torch.Tensor:
    """Output ``i`` along ``dim`` is the OR of the seed rows ``i - start - o``, ``0 <= o < k``."""
    grid = words.shape[dim]
    lo, hi = max(start + k - 1, 0), max(size - start - grid, 0)
    padded = F.pad(words, [0, 0] * (words.dim() - dim - 1) + [lo, hi])
    out = padded.narrow(dim, lo - start, size)
    for o in range(1, k):
        out = out | padded.narrow(dim, lo - start - o, size)
    return out


def _dilate_columns(words: torch.Tensor, geom: BlockGeometry) -> torch.Tensor:
    """Bit ``w`` set iff column ``w`` is dropped (int32 up to 31 columns, else int64)."""
    k, start, width = geom.block[-1], geom.block_start[-1], geom.spatial[-1]
    if geom.seed_grid[-1] + k - 2 > 30:
        words = words.to(torch.int64)
    cover = 1
    while cover < k:  # OR of shifts 0..k-1 by doubling
        step = min(cover, k - cover)
        words = words | (words << step)
        cover += step
    words = words << start if start >= 0 else words >> -start
    return words & ((1 << width) - 1)


def _popcount(v: torch.Tensor) -> torch.Tensor:
    """Set bits of non-negative int32 or int64 words (SWAR, no multiply)."""
    wide = v.dtype == torch.int64
    m1, m2, m4 = (
        (0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F) if wide else (0x55555555, 0x33333333, 0x0F0F0F0F)
    )
    v = v - ((v >> 1) & m1)
    v = (v & m2) + ((v >> 2) & m2)
    v = (v + (v >> 4)) & m4
    v = v + (v >> 8)
    v = v + (v >> 16)
    if wide:
        v = v + (v >> 32)
    return v & 0x7F


def _column_windows(geom: BlockGeometry) -> tuple[int, ...]:
    """Per output column, the bit mask of the seed columns whose blocks cover it."""
    k, start, grid_w = geom.block[-1], geom.block_start[-1], geom.seed_grid[-1]
    masks = []
    for w in range(geom.spatial[-1]):
        lo, hi = max(w - start - k + 1, 0), min(w - start, grid_w - 1)
        masks.append(((1 << (hi - lo + 1)) - 1) << lo if hi >= lo else 0)
    return tuple(masks)


def _keep_table(windows: tuple[int, ...], lo: int, bits: int, device: torch.device) -> torch.Tensor:
    """``keep[v, w]``: 0. when the word bits ``v << lo`` hit column ``w``'s window, else 1.

    Written as a min-reduction over the ``bits`` bits so that Inductor materialises the small
    table and the dense kernel loads from it, instead of re-deriving the bit test per element.
    """
    shifts = torch.arange(bits, device=device)
    value_bits = (torch.arange(1 << bits, device=device)[:, None] >> shifts) & 1  # (V, bits)
    window_bits = (torch.tensor(windows, device=device)[:, None] >> (shifts + lo)) & 1  # (W, bits)
    return (1.0 - (value_bits[:, None, :] * window_bits).to(torch.float32)).amin(-1)


def _dense_keep(pos: torch.Tensor, geom: BlockGeometry, planes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The general path: ``index_fill`` the dropped units into a dense ``bool`` map."""
    num_pos = planes * math.prod(geom.seed_grid)
    numel = planes * math.prod(geom.spatial)
    real, index = _seed_index(pos, num_pos)
    strides = contiguous_strides((planes, 1, *geom.spatial))
    rows, width = block_rows(index, geom, (planes, 1), strides)
    units = torch.where(real[:, None], row_units(rows, width, strides[-1]), numel).reshape(-1)
    dropped = torch.zeros(numel + 1, dtype=torch.bool, device=pos.device).index_fill(0, units, True)[:numel]
    return (~dropped).to(torch.float32).view(planes, *geom.spatial), dropped.sum()


def seed_rate_tensor(geom: BlockGeometry, rate: torch.Tensor, mode: str) -> torch.Tensor:
    """``geom.seed_rate`` for a tensor rate, in tensor ops only (Newton for ``"calibrated"``)."""
    rate = rate.to(torch.float64).clamp(0.0, 1.0)
    if mode != "calibrated":
        return (rate * geom.paper_slope).clamp(max=1.0)
    n = torch.tensor([c[0] for c in geom.coverage], dtype=torch.float64, device=rate.device)
    w = torch.tensor([c[1] for c in geom.coverage], dtype=torch.float64, device=rate.device)
    keep = 1.0 - rate.clamp(max=1.0 - 1e-12)
    # Newton on lambda = -log(1 - gamma): f(lambda) = sum(w * exp(-n * lambda)) - keep is convex
    # and decreasing, so the iterates rise monotonically from 0 to the root, never past it.
    lam = torch.zeros_like(rate)
    for _ in range(_NEWTON_STEPS):
        e = w * torch.exp(-n * lam)
        lam = lam + (e.sum() - keep) / (n * e).sum()
    return -torch.expm1(-lam)
