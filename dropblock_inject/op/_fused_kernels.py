"""The Triton kernels of :mod:`dropblock_inject.op.fused` (this module imports Triton).

Upper-case arguments follow Triton's convention: sizes and tile shapes, all ``tl.constexpr``.
"""

# ruff: noqa: N803

import triton
import triton.language as tl


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _popcount32(v):
    """Set bits of uint32 words (SWAR; libdevice's popc is not in the interpreter)."""
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return (v * 0x01010101) >> 24


@triton.jit
def _popcount(v):
    """Set bits of uint64 words, as two 32-bit halves (the GPU works 64-bit integers in halves anyway)."""
    return _popcount32(v.to(tl.uint32)) + _popcount32((v >> 32).to(tl.uint32))


@triton.jit
def _as_u64(words, WORD_BITS: tl.constexpr):
    """Stored words (int8/16/32/64 bit patterns) as uint64, without sign extension."""
    if WORD_BITS == 8:
        words = words.to(tl.uint8, bitcast=True)
    elif WORD_BITS == 16:
        words = words.to(tl.uint16, bitcast=True)
    elif WORD_BITS == 32:
        words = words.to(tl.uint32, bitcast=True)
    else:
        words = words.to(tl.uint64, bitcast=True)
    return words.to(tl.uint64)


@triton.jit
def _reach(i, h, KH: tl.constexpr, DEPTH: tl.constexpr, KD: tl.constexpr, SLICE_H: tl.constexpr,
           SLICE_SH: tl.constexpr):  # fmt: skip
    """``(rows, seed rows)``: whether seed row ``i`` reaches output row ``h``, ``h - KH < i <= h``.

    3-D (``DEPTH > 1``): rows and seed rows are flat ``(depth, height)`` indices over slices of
    ``SLICE_H`` rows and ``SLICE_SH`` seed rows, and the block spans ``KD`` slices as well.
    """
    if DEPTH == 1:
        return (i[None, :] <= h[:, None]) & (i[None, :] > h[:, None] - KH)
    d, hs = h // SLICE_H, h % SLICE_H
    di, hi = i // SLICE_SH, i % SLICE_SH
    depth = (di[None, :] <= d[:, None]) & (di[None, :] > d[:, None] - KD)
    return depth & (hi[None, :] <= hs[:, None]) & (hi[None, :] > hs[:, None] - KH)


@triton.jit
def _dropped_rows(words, reach, KW: tl.constexpr, PLANES_LAST: tl.constexpr):
    """Dropped columns of rows ``h``, from the seed-row words ``(planes, i)`` (``PLANES_LAST``:
    ``(i, planes)``, and the rows ``(h, planes)``: each thread then works whole planes, with no
    exchange between threads).

    Each seed row's word is spread over the block's width (``w | w << 1 | ...``); row ``h`` is
    the or of the spread words of the seed rows that reach it (``reach``, see :func:`_reach`).
    """
    spread = words
    for t in tl.static_range(1, KW):
        spread = spread | (words << t)
    if PLANES_LAST:
        rows = tl.reduce(tl.where(reach[:, :, None], spread[None, :, :], 0), 1, _bit_or)
    else:
        rows = tl.reduce(tl.where(reach[None, :, :], spread[:, None, :], 0), 2, _bit_or)
    return rows


@triton.jit
def _seed_words(seed, last, seeded, planes, n_planes, SH: tl.constexpr, SW: tl.constexpr, SH_P2: tl.constexpr,
                SW_P4: tl.constexpr, WIDE: tl.constexpr):  # fmt: skip
    """The seed-row words ``(SH_P2, planes)``: bit ``c`` is the seed in column ``c`` (uint64, or
    uint32 where the rows are at most 32 wide: ``WIDE`` False). The planes are the last axis, so
    that a thread draws and packs whole planes.

    One Philox call gives the 32-bit draws of 4 neighbouring positions; a position is a seed
    when ``seeded`` and its draw is at most ``last`` (uint32): below ``round(gamma * 2**32)``.
    """
    i = tl.arange(0, SH_P2)
    q = tl.arange(0, SW_P4)
    live = (i < SH)[:, None, None] & (planes < n_planes)[None, None, :] & seeded
    call = (planes[None, None, :] * SH + i[:, None, None]) * SW_P4 + q[None, :, None]
    r0, r1, r2, r3 = tl.randint4x(seed, call)
    col = 4 * q[None, :, None]
    word = tl.uint64 if WIDE else tl.uint32
    nib = ((r0.to(tl.uint32, bitcast=True) <= last) & live & (col < SW)).to(word)
    nib |= ((r1.to(tl.uint32, bitcast=True) <= last) & live & (col + 1 < SW)).to(word) << 1
    nib |= ((r2.to(tl.uint32, bitcast=True) <= last) & live & (col + 2 < SW)).to(word) << 2
    nib |= ((r3.to(tl.uint32, bitcast=True) <= last) & live & (col + 3 < SW)).to(word) << 3
    return tl.sum(nib << col.to(word), axis=1)  # distinct bits: the sum is an or


@triton.jit
def _draw_planes(seed, last, seeded, n_planes, BP: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                 SH_P2: tl.constexpr, SW_P4: tl.constexpr, IN_MEMORY: tl.constexpr, WIDE: tl.constexpr):  # fmt: skip
    """The program's ``BP`` planes, the seed-row index and the planes' seed-row words (see :func:`_seed_words`).

    By value, ``last`` is the bit pattern of ``threshold - 1`` as int32 and ``seeded`` is
    ``threshold > 0`` (0 or 1), for the seed threshold ``round(gamma * 2**32)``
    (:func:`~dropblock_inject.op.fused.seed_threshold`): both always fit 32 bits, so the
    compiled kernel's argument types never change with the rate. With ``IN_MEMORY``, ``seed``
    and ``last`` point to one int64 each, the seed and the threshold (drawn and worked out on the
    device: a compiled graph's, or under CUDA graph capture), and ``seeded`` is unused.
    """
    if IN_MEMORY:
        seed = tl.load(seed)
        threshold = tl.load(last)
        seeded = threshold > 0
        last = (threshold - 1).to(tl.uint32)
    else:
        seeded = seeded != 0
        last = last.to(tl.uint32, bitcast=True)
    planes = tl.program_id(0) * BP + tl.arange(0, BP)
    words = _seed_words(seed, last, seeded, planes, n_planes, SH, SW, SH_P2, SW_P4, WIDE)
    return planes, tl.arange(0, SH_P2), words


@triton.jit
def _output_rows(words, i, H: tl.constexpr, H_P2: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                 DEPTH: tl.constexpr, KD: tl.constexpr, SLICE_H: tl.constexpr, SLICE_SH: tl.constexpr):  # fmt: skip
    """The output-row index and each output row's dropped columns ``(H_P2, planes)`` (0 past ``H``)."""
    h = tl.arange(0, H_P2)
    reach = _reach(i, h, KH, DEPTH, KD, SLICE_H, SLICE_SH)
    return h, tl.where((h < H)[:, None], _dropped_rows(words, reach, KW, True), 0)


@triton.jit(do_not_specialize=["seed", "last", "seeded"])
def seed_kernel(words_ptr, count_ptr, seed, last, seeded, n_planes, H: tl.constexpr, SH: tl.constexpr,
                SW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BP: tl.constexpr, H_P2: tl.constexpr,
                SH_P2: tl.constexpr, SW_P4: tl.constexpr, IN_MEMORY: tl.constexpr, DEPTH: tl.constexpr,
                KD: tl.constexpr, SLICE_H: tl.constexpr, SLICE_SH: tl.constexpr):  # fmt: skip
    """Draw the seeds of ``BP`` planes, store one word per seed row, add the dropped units to the count."""
    planes, i, words = _draw_planes(seed, last, seeded, n_planes, BP, SH, SW, SH_P2, SW_P4, IN_MEMORY, True)
    store = (i < SH)[:, None] & (planes < n_planes)[None, :]
    tl.store(words_ptr + planes[None, :] * SH + i[:, None], words.to(words_ptr.dtype.element_ty), mask=store)
    _, rows = _output_rows(words, i, H, H_P2, KH, KW, DEPTH, KD, SLICE_H, SLICE_SH)
    tl.atomic_add(count_ptr, tl.sum(tl.sum(_popcount(rows), axis=1), axis=0).to(tl.int64))


@triton.jit(do_not_specialize=["seed", "last", "seeded"])
def seed_rows_kernel(rows_ptr, count_ptr, seed, last, seeded, n_planes, H: tl.constexpr, SH: tl.constexpr,
                     SW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BP: tl.constexpr, H_P2: tl.constexpr,
                     SH_P2: tl.constexpr, SW_P4: tl.constexpr, IN_MEMORY: tl.constexpr, DEPTH: tl.constexpr,
                     KD: tl.constexpr, SLICE_H: tl.constexpr, SLICE_SH: tl.constexpr,
                     WIDE: tl.constexpr):  # fmt: skip
    """The seeds of ``BP`` planes (the draws of :func:`seed_kernel`), stored as the dropped columns of
    every output row (one word per row, for :func:`apply_flat_kernel`); the dropped units are added
    to the count. Rows up to 32 wide are worked in 32 bits (``WIDE`` is False).

    3-D inputs (``DEPTH`` slices of ``SLICE_H`` rows; ``KD`` the block's depth): ``H`` and ``SH``
    count the rows and seed rows of a whole volume, so the apply kernel sees ``(N, C, D * H, W)``."""
    planes, i, words = _draw_planes(seed, last, seeded, n_planes, BP, SH, SW, SH_P2, SW_P4, IN_MEMORY, WIDE)
    h, rows = _output_rows(words, i, H, H_P2, KH, KW, DEPTH, KD, SLICE_H, SLICE_SH)
    store = (h < H)[:, None] & (planes < n_planes)[None, :]
    tl.store(rows_ptr + planes[None, :] * H + h[:, None], rows.to(rows_ptr.dtype.element_ty), mask=store)
    count = _popcount(rows) if WIDE else _popcount32(rows)
    tl.atomic_add(count_ptr, tl.sum(tl.sum(count, axis=1), axis=0).to(tl.int64))


@triton.jit
def _scale(count_ptr, numel, C: tl.constexpr, SHARED: tl.constexpr):
    """``numel / kept`` (float32; 0 where nothing is kept) for the dropped count at ``count_ptr``:
    of units, or of mask units shared by the ``C`` channels (``SHARED``)."""
    dropped = tl.load(count_ptr)
    if SHARED:
        dropped = dropped * C
    kept = numel - dropped
    return tl.where(kept > 0, tl.cast(numel, tl.float64) / tl.maximum(kept, 1).to(tl.float64), 0.0).to(tl.float32)


@triton.jit
def apply_kernel(src_ptr, out_ptr, words_ptr, count_ptr, numel, n_planes, s_n, s_c, s_h, s_w, C: tl.constexpr,
                 H: tl.constexpr, W: tl.constexpr, SH: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                 WORD_BITS: tl.constexpr, BP: tl.constexpr, BH: tl.constexpr, BI: tl.constexpr,
                 W_P2: tl.constexpr, SHARED: tl.constexpr):  # fmt: skip
    """``out = src * keep * numel / kept`` on a tile of ``BP`` planes by ``BH`` rows (``SHARED``:
    one mask per sample, its words indexed by sample)."""
    planes = tl.program_id(0) * BP + tl.arange(0, BP)
    h0 = tl.program_id(1) * BH
    h = h0 + tl.arange(0, BH)
    i = tl.maximum(h0 - (KH - 1), 0) + tl.arange(0, BI)  # the seed rows that reach these rows
    load = (planes < n_planes)[:, None] & (i < SH)[None, :]
    masks = planes // C if SHARED else planes
    words = _as_u64(tl.load(words_ptr + masks[:, None] * SH + i[None, :], mask=load, other=0), WORD_BITS)
    rows = _dropped_rows(words, _reach(i, h, KH, 1, 1, H, SH), KW, False)
    w = tl.arange(0, W_P2)
    dropped = ((rows[:, :, None] >> w[None, None, :].to(tl.uint64)) & 1) != 0
    base = (planes // C).to(tl.int64) * s_n + (planes % C).to(tl.int64) * s_c
    offs = base[:, None, None] + (h * s_h)[None, :, None] + (w * s_w)[None, None, :]
    mask = (planes < n_planes)[:, None, None] & (h < H)[None, :, None] & (w < W)[None, None, :]
    scale = _scale(count_ptr, numel, C, SHARED)
    x = tl.load(src_ptr + offs, mask=mask)
    y = tl.where(dropped, 0.0, x.to(tl.float32) * scale)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def apply_flat_kernel(src_ptr, out_ptr, rows_ptr, count_ptr, numel, C: tl.constexpr, H: tl.constexpr,
                      W: tl.constexpr, CHANNELS_LAST: tl.constexpr, ROW_BITS: tl.constexpr, WIDE: tl.constexpr,
                      BLOCK: tl.constexpr, SHARED: tl.constexpr):  # fmt: skip
    """``out = src * keep * numel / kept`` on ``BLOCK`` consecutive units of memory.

    The units are taken in storage order (contiguous or channels_last; ``numel < 2**31``), so
    every load and store is a whole, aligned vector; each unit reads its row's word of dropped
    columns (from :func:`seed_rows_kernel`, cached: a plane's row is one word). ``SHARED``: one
    mask per sample, so the words are indexed by sample instead of plane.
    """
    f = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = f < numel
    if CHANNELS_LAST:
        c = f % C
        t = f // C
        w = t % W
        t = t // W
        h = t % H
        plane = t // H if SHARED else (t // H) * C + c
    else:
        plane = f // (H * W)
        r = f % (H * W)
        h = r // W
        w = r % W
        if SHARED:
            plane = plane // C
    word = _as_u64(tl.load(rows_ptr + plane * H + h, mask=mask, other=0), ROW_BITS)
    if WIDE:
        dropped = ((word >> w.to(tl.uint64)) & 1) != 0
    else:
        word = word.to(tl.uint32)
        dropped = ((word >> w.to(tl.uint32)) & 1) != 0
    scale = _scale(count_ptr, numel, C, SHARED)
    x = tl.load(src_ptr + f, mask=mask)
    y = tl.where(dropped, 0.0, x.to(tl.float32) * scale)
    tl.store(out_ptr + f, y.to(out_ptr.dtype.element_ty), mask=mask)
