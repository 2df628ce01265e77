"""DropBlock for ``torch.compile``: static shapes, a tensor rate, one dense pass over the input.

The eager op (:mod:`~dropblock_inject.op.functional`) gets its speed from data-dependent shapes
(as many indices as there are seeds), which a compiled graph cannot have. Here every tensor has a
size fixed by the input's shape, and the work is arranged so that Inductor emits one dense
kernel over ``x`` whose inner loop is a load, a table load, a multiply and a store:

1. Seeds: ``max_seeds`` geometric gaps (exact Bernoulli seeds, as in eager); draws past the grid
   are masked out.
2. Seed words: each row of a plane's seed grid becomes one integer whose bit ``c`` is the seed
   in column ``c`` (positions are distinct, so a scatter-add of ``1 << c`` is an exact OR).
   The words are stored row-major with the plane index innermost, so the vertical dilation
   below is a handful of shifted, fully vectorised ORs of whole rows of planes.
3. Vertical dilation: the word of output row ``r`` is the OR of the seed rows whose blocks
   cover ``r`` (per leading spatial dimension: 1 for ``(H, W)``, 2 for ``(D, H, W)``).
4. Horizontal dilation and the multiply. For a contiguous input whose rows pack into whole
   SIMD vectors (:func:`lane_factor`: ``lcm(W, 8)`` bits fit an int64), the dropped bits of a few
   consecutive rows form one word, whose bytes index a ``(256, 8)`` table holding 0. and the
   rescale factor: one table row per vector of ``x``, no partial vectors, the division done
   once. Otherwise a constant table ``keep[word, w]`` (0. or 1.) gives a contiguous load per
   row; wide seed grids use one 256-row table per byte of the word and multiply them. The
   dropped count comes from a popcount of the dilated words, so the rescale needs no pass over
   ``x``.

Seed grids wider than :data:`MAX_WORD_BITS` columns (maps wider than ~60) use a slower but
equally exact path that fills a dense ``bool`` map.

Inductor's CPU code loads integer vectors through a stack copy (a store-forwarding stall per
load) and lowers ``index_add`` to atomic adds; the seed words are therefore scattered as float32
(exact small integers) with ``scatter_add``, which Inductor hands to one ATen call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dropblock_inject.op.fused_compiled import compiled_eligible, fused_drop_block_traceable
from dropblock_inject.op.geometry import BlockGeometry, max_seeds
from dropblock_inject.op.layout import FACTOR_DTYPES, as_dense, contiguous_strides, rescale, seed_batch
from dropblock_inject.op.sampling import block_rows, row_units, sample_seed_gaps

__all__ = [
    "MAX_WORD_BITS",
    "drop_block_traceable",
    "keep_mask",
    "lane_factor",
    "lane_group",
    "plane_factor",
    "seed_rate_tensor",
]

MAX_WORD_BITS = 62  # highest bit index a dilated int64 row word may use
_TABLE_BITS = 10  # seed words up to this many columns use a single keep table (1024 rows)
_CHUNK_BITS = 8  # wider words: one table per byte
_SIMD_FLOATS = 8  # float32 lanes of an AVX2 vector: narrower rows are grouped
_FLOAT_EXACT_BITS = 24  # float32 holds sums of distinct powers of two below 2**24 exactly
_MAX_CHUNK_BITS = 56  # lane_factor: the largest multiple of 8 that an int64 holds without its sign bit
_MAX_UNROLLED_ROWS = 64  # lane_factor: periods up to this many rows are built one row at a time
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
    seed_rate = seed_rate_tensor(geom, rate, gamma) if isinstance(rate, torch.Tensor) else geom.seed_rate(rate, gamma)
    if compiled_eligible(x, geom, shared_channels, generator):  # CUDA with DROPBLOCK_INJECT_FUSED_COMPILED=1
        return fused_drop_block_traceable(x, seed_rate, geom)
    x = as_dense(x)
    batch, num_pos = seed_batch(x, geom, shared_channels)
    num_draws = max_seeds(num_pos, geom.seed_rate(max_rate, gamma))
    pos = sample_seed_gaps(num_draws, seed_rate, device=x.device, generator=generator)
    planes = batch[0] * batch[1]
    if math.prod(geom.seed_grid) == 1:  # blocks cover the map: whole planes
        return _apply(x, plane_factor(pos, batch, geom, x.dim()))
    group = 0 if shared_channels or not x.is_contiguous() else lane_group(geom, planes)
    if group:
        factor = lane_factor(pos, geom, planes, group)
        # as_strided, not view: Inductor copies a reshape whose dimensions do not line up
        return _apply(x.view(factor.shape), factor).as_strided(x.shape, x.stride())
    keep, dropped = keep_mask(pos, geom, batch)
    return _apply(x, keep.reshape(*batch, *geom.spatial) * rescale(keep.numel(), dropped))


def _apply(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    if x.dtype in FACTOR_DTYPES:
        return x * factor
    return (x.float() * factor).to(x.dtype)  # half types: rescale in float32, round once


def plane_factor(pos: torch.Tensor, batch: tuple[int, int], geom: BlockGeometry, ndim: int) -> torch.Tensor:
    """The rescaled keep factor of whole planes, where a block covers the map.

    Every seed position is then a plane (a sample when ``C' = 1``), so the dense kernel
    multiplies by one factor per plane, loaded once per plane.

    Args:
        pos: Seed positions as for :func:`keep_mask`, flat over ``(N, C')``.
        batch: ``(N, C')``.
        geom: The block geometry (``prod(geom.seed_grid) == 1``).
        ndim: Dimensions of the input, 4 or 5.

    Returns:
        float32 ``(N, C', 1, ...)`` with ``ndim`` dimensions: 0. for a dropped plane, else the
        rescale factor.
    """
    planes = batch[0] * batch[1]
    real, index = _seed_index(pos, planes)
    dropped = torch.zeros(planes, dtype=torch.float32, device=pos.device).scatter_add(0, index, real.to(torch.float32))
    scale = rescale(planes * math.prod(geom.spatial), real.sum() * math.prod(geom.spatial))
    return ((1.0 - dropped) * scale).view(*batch, *([1] * (ndim - 2)))


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


def lane_group(geom: BlockGeometry, planes: int) -> int:
    """Rows per chunk of :func:`lane_factor`, or 0 where it does not apply.

    A chunk is the fewest whole rows that fill whole SIMD vectors (``lcm(W, 8)`` units), which
    must fit one int64 word (at most :data:`_MAX_CHUNK_BITS` bits) and tile the tensor's rows.
    """
    width = geom.spatial[-1]
    bits = math.lcm(width, _SIMD_FLOATS)
    rows = planes * math.prod(geom.spatial[:-1])
    if bits > _MAX_CHUNK_BITS or rows % (bits // width) or not _fits_row_words(geom):
        return 0
    return bits // width


def lane_factor(pos: torch.Tensor, geom: BlockGeometry, planes: int, group: int) -> torch.Tensor:
    """The rescaled keep mask of a contiguous ``(planes, *spatial)`` tensor, in SIMD-vector chunks.

    The dropped bits of ``group`` consecutive rows (of the tensor's flat order) are one int64
    word; its bytes index a ``(256, 8)`` table of ``0.`` and the rescale factor, so the dense
    kernel loads one table row per vector of 8 units, with no partial vectors whatever the row
    width. The words are gathered from the plane-innermost row words one period at a time (the
    fewest rows that are whole planes and whole chunks), so every load is vectorised over planes.

    Args:
        pos: Seed positions as for :func:`keep_mask`.
        geom: The block geometry.
        planes: ``N * C``.
        group: :func:`lane_group` of the geometry (non-zero).

    Returns:
        float32 ``(Q, T, B, 8)`` with ``Q * T * B * 8 == planes * prod(spatial)``, a permuted view:
        the factor of the unit at flat index ``((q * T + t) * B + b) * 8 + l``.
    """
    width, rows = geom.spatial[-1], math.prod(geom.spatial[:-1])
    period = math.lcm(rows, group)  # rows of `step` whole planes, in `period // group` whole chunks
    step = period // rows
    chunks, dropped = _chunk_words(pos, geom, planes, step, group)  # (T, Q)
    scale = rescale(planes * rows * width, dropped)
    nbytes = group * width // _SIMD_FLOATS
    index = (chunks[..., None] >> (torch.arange(nbytes, device=pos.device) * _SIMD_FLOATS)) & 255
    lanes = tuple(1 << lane for lane in range(_SIMD_FLOATS))
    return _keep_table(lanes, 0, _SIMD_FLOATS, pos.device, scale)[index].transpose(0, 1)


def _chunk_words(
    pos: torch.Tensor, geom: BlockGeometry, planes: int, step: int, group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 ``(T, Q)``: the dropped bits of rows ``t * group ... t * group + group - 1`` of period ``q``;
    and their number, a 0-d int64 tensor.

    A period is the ``rows * step`` rows of planes ``q * step ... q * step + step - 1``. Short
    periods are built one row at a time, each row the OR of the seed rows whose blocks cover it,
    taken straight from the scattered seed words (contiguous over ``q``, nothing padded and no
    dilated rows stored); long ones gather from the fully dilated words.
    """
    width, rows = geom.spatial[-1], math.prod(geom.spatial[:-1])
    period = rows * step
    if period > _MAX_UNROLLED_ROWS:
        cols = _dilate_columns(_dilated_rows(pos, geom, planes, step), geom).reshape(rows, step, planes // step)
        row = torch.arange(period, device=pos.device).view(-1, group)
        pieces = cols[row % rows, torch.div(row, rows, rounding_mode="floor")].to(torch.int64)  # (T, group, Q)
        chunks = (pieces << (torch.arange(group, device=pos.device)[:, None] * width)).sum(1)  # disjoint: sum == OR
        return chunks, _popcount(chunks).sum()
    words = _dilated_rows(pos, geom, planes, step, dims=len(geom.spatial) - 2)  # all but the last row dimension
    # blocks that start at their seed and stay inside the row (the valid region): spread the
    # seed bits of the packed rows once, instead of row by row (no bit crosses into the next row)
    packed = geom.block_start[-1] == 0 and geom.seed_grid[-1] + geom.block[-1] - 1 <= width
    chunks = []
    for t in range(period // group):
        word = None
        for j in range(group):
            s, row = divmod(t * group + j, rows)
            piece = _covered_row(words, geom, row, s)
            piece = (piece if packed else _dilate_columns(piece, geom)).to(torch.int64) << (j * width)
            word = piece if word is None else word | piece
        chunks.append(_spread(word, geom.block[-1]) if packed else word)
    stacked = torch.stack(chunks)
    return stacked, _popcount(stacked).sum()


def _covered_row(words: torch.Tensor, geom: BlockGeometry, row: int, s: int) -> torch.Tensor:
    """Seed bits covering row ``row`` (flat over ``spatial[:-1]``) of planes ``[s, :]`` of ``words``.

    ``words`` is dilated along every leading dimension but the last, which is still the seed grid.
    """
    *outer, h = _unravel_int(row, geom.spatial[:-1])
    k, start, grid = geom.block[-2], geom.block_start[-2], geom.seed_grid[-2]
    dtype = _word_dtype(geom)
    word = None
    for seed_row in range(max(h - start - k + 1, 0), min(h - start, grid - 1) + 1):
        tap = words[(*outer, seed_row, s)].to(dtype)
        word = tap if word is None else word | tap
    return word if word is not None else torch.zeros(words.shape[-1], dtype=dtype, device=words.device)


def _unravel_int(index: int, shape: tuple[int, ...]) -> list[int]:
    coords = []
    for size in reversed(shape):
        index, c = divmod(index, size)
        coords.append(c)
    return coords[::-1]


def _word_dtype(geom: BlockGeometry) -> torch.dtype:
    return torch.int32 if geom.seed_grid[-1] <= 31 else torch.int64


def _dilated_rows(
    pos: torch.Tensor, geom: BlockGeometry, planes: int, interleave: int = 1, dims: int | None = None
) -> torch.Tensor:
    """Seed words dilated along the leading spatial dimensions, ``(*spatial[:-1], interleave, Q)``.

    With ``dims``, only the first ``dims`` leading dimensions are dilated (and padded); the others
    keep their seed-grid size, and their words may be float32 (exact small integers).

    Bit ``c`` of a word is set iff a block anchored in seed column ``c`` covers that row. The
    words are stored with the plane index innermost (plane ``q * interleave + s`` at ``[..., s, q]``,
    ``Q = planes // interleave``), and scattered straight into a zero buffer padded for the
    dilation, so each dilation step is a few ORs of shifted, unmasked, fully vectorised rows of
    planes (a padding op would make Inductor mask every load).
    """
    grid, grid_w = geom.seed_grid, geom.seed_grid[-1]
    num_pos = planes * math.prod(grid)
    # index arithmetic in float64 (exact: positions are integers far below 2**53, and a correctly
    # rounded quotient by a small integer never crosses an integer): vectorised, unlike int64 division
    real, index = pos < num_pos, pos.clamp(max=num_pos - 1)
    word = _floor_div(index, grid_w)
    dtype = _word_dtype(geom)
    col = (index - word * grid_w).to(dtype)
    dims = len(grid) - 1 if dims is None else dims
    # scattered as float32 where that is exact: Inductor's CPU loads of float vectors are direct,
    # its loads of integer vectors go through a stack copy (a store-forwarding stall per load)
    scatter_dtype = torch.float32 if grid_w <= _FLOAT_EXACT_BITS else dtype
    bits = torch.where(real, torch.ones_like(col) << col, 0).to(scatter_dtype)
    pads = [_dilation_pads(*d) for d in zip(geom.spatial, geom.seed_grid, geom.block_start, geom.block)][:dims]
    pads += [(0, 0)] * (len(grid) - 1 - dims)
    padded = tuple(g + lo + hi for g, (lo, hi) in zip(grid, pads))
    rows = math.prod(grid[:-1])  # seed rows per plane
    plane = _floor_div(word, rows)
    rest, slot, stride = word - plane * rows, 0, 1
    for dim in reversed(range(len(grid) - 1)):  # the seed row's coordinates, shifted into the padding
        outer = _floor_div(rest, grid[dim])
        slot = slot + (rest - outer * grid[dim] + pads[dim][0]) * stride
        rest, stride = outer, stride * padded[dim]
    words = torch.zeros(math.prod(padded) * planes, dtype=scatter_dtype, device=pos.device)  # (*padded, planes)
    if interleave > 1:
        major = _floor_div(plane, interleave)
        plane = (plane - major * interleave) * (planes // interleave) + major
    # scatter_add, not index_add: Inductor lowers index_add to atomic adds, scatter_add to one aten call
    target = (slot * planes + plane).to(torch.int64)
    words = words.scatter_add(0, target, bits).view(*padded, interleave, planes // interleave)
    for dim, ((lo, _), size, start, k) in enumerate(zip(pads[:dims], geom.spatial, geom.block_start, geom.block)):
        out = words.narrow(dim, lo - start, size).to(dtype)
        for o in range(1, k):
            out = out | words.narrow(dim, lo - start - o, size).to(dtype)
        words = out
    return words


def _floor_div(value: torch.Tensor, divisor: int) -> torch.Tensor:
    return torch.floor(value / divisor)


def _dilation_pads(size: int, grid: int, start: int, k: int) -> tuple[int, int]:
    """Zeros before and after ``grid`` seed rows so that every output row's window is in range."""
    return max(start + k - 1, 0), max(size - start - grid, 0)


def _row_word_keep(pos: torch.Tensor, geom: BlockGeometry, planes: int) -> tuple[torch.Tensor, torch.Tensor]:
    grid_w = geom.seed_grid[-1]
    words = _dilated_rows(pos, geom, planes).view(*geom.spatial[:-1], planes).movedim(-1, 0)
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


def _dilate_columns(words: torch.Tensor, geom: BlockGeometry) -> torch.Tensor:
    """Bit ``w`` set iff column ``w`` is dropped (int32 up to 31 columns, else int64)."""
    k, start, width = geom.block[-1], geom.block_start[-1], geom.spatial[-1]
    if geom.seed_grid[-1] + k - 2 > 30:
        words = words.to(torch.int64)
    words = _spread(words, k)
    words = words << start if start >= 0 else words >> -start
    return words & ((1 << width) - 1)


def _spread(words: torch.Tensor, k: int) -> torch.Tensor:
    """OR of ``words << s`` for ``0 <= s < k``, by doubling."""
    cover = 1
    while cover < k:
        step = min(cover, k - cover)
        words = words | (words << step)
        cover += step
    return words


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


def _keep_table(
    windows: tuple[int, ...], lo: int, bits: int, device: torch.device, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``keep[v, w]``: 0. when the word bits ``v << lo`` hit column ``w``'s window, else 1 (or ``scale``).

    Written as a min-reduction over the ``bits`` bits so that Inductor materialises the small
    table (with the rescale factor folded in, when given) and the dense kernel loads from it,
    instead of re-deriving the bit test and the division per element.
    """
    shifts = torch.arange(bits, device=device)
    value_bits = (torch.arange(1 << bits, device=device)[:, None] >> shifts) & 1  # (V, bits)
    window_bits = (torch.tensor(windows, device=device)[:, None] >> (shifts + lo)) & 1  # (W, bits)
    keep = 1.0 - (value_bits[:, None, :] * window_bits).to(torch.float32)
    return (keep if scale is None else keep * scale).amin(-1)


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
