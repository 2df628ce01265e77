"""A fused DropBlock for CUDA in Triton: two launches per call, no host sync.

Used by the eager op for 4-D and 5-D inputs on a CUDA device when Triton is installed (it ships
with PyTorch's CUDA wheels), with per-channel masks or masks shared by a sample's channels (whose
seeds are drawn per sample and whose words the apply kernel indexes by sample):

* ``seed_rows_kernel`` draws a tile of planes' seeds with Philox (``tl.randint4x``, keyed by one
  integer seed per call and the seed position), turns them into each output row's dropped
  columns (the seed-row words spread over the block's width, or-ed over its height), stores one
  word per output row (of the fewest bits that hold a row: 16 for 14 columns) and adds their
  popcounts to the call's dropped count. Each thread works whole planes (the planes are the
  tile's last axis), so no data moves between threads.
* ``apply_flat_kernel`` walks the input in storage order (contiguous or channels_last) with whole
  vectors and writes ``x * keep * numel / kept`` in one pass, each unit reading its row's word.
  Backward is the same kernel on the gradient: it keeps the row words and the count.

The first pair of kernels, ``KERNELS = "tiles"`` (``DROPBLOCK_INJECT_FUSED_KERNELS=tiles``), draws
the same seeds but stores one word per seed row (``seed_kernel``) and rebuilds the rows in tiles
of planes by rows (``apply_kernel``). It gives the very same output. The flat pair is the default
because it was the faster at every shape timed but one (docs/performance.md).

Under ``torch.compile`` a model takes the traceable op of :mod:`~dropblock_inject.op.traceable`,
which Inductor fuses with its neighbours; ``DROPBLOCK_INJECT_FUSED_COMPILED=1`` makes it call
these kernels as a custom op instead (:mod:`~dropblock_inject.op.fused_compiled`).

A plane's rows must fit one word and its rows one tile (``H, W <= 64``). 3-D inputs
``(N, C, D, H, W)`` take the flat set with ``D * H <= 64``: the seed kernel dilates over the depth
slices too, and the apply kernel sees ``(N, C, D * H, W)``. Other inputs take the ATen path of
:mod:`dropblock_inject.op.functional`. ``DROPBLOCK_INJECT_FUSED=0`` turns this off.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from collections.abc import Iterator

import torch

from dropblock_inject.op.geometry import BlockGeometry
from dropblock_inject.op.layout import as_dense, is_dense

WORD_BITS = 64
TILE_UNITS = 2048  # units of the input per program of the apply kernel
APPLY_WARPS = 4
SEED_TILE = 4096  # (row, seed row, plane) triples per program of the seed kernel: 32 planes at 14x14/7
SEED_WARPS = 1  # one warp: a thread per plane at 14x14/7, and four times the programs of 4 warps
DIRECT_LAUNCH = True  # launch a compiled kernel directly after its first launch (see _Launch)
CHANNELS_LAST_PLANES = 8  # channels_last: channels per apply tile at least (adjacent in memory)
KERNEL_SETS = ("tiles", "flat")  # seed words + tiled apply; row words + storage-order apply
KERNELS = os.environ.get("DROPBLOCK_INJECT_FUSED_KERNELS", "flat")
FLAT_BLOCK = 1024  # units per program of apply_flat_kernel (faster than 2048: docs/performance.md)
COUNT_POOL = 256  # zeroed counts made at once for eager calls: one fill launch per this many calls
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_POSITIONS = 2**30  # seed positions per call (Philox offsets are 32-bit)
_MAX_NUMEL = 2**31  # units per call (apply_flat_kernel indexes in 32 bits)


@torch.compiler.assume_constant_result  # a compiled graph takes the answer as a constant
def triton_available() -> bool:
    """True when Triton imports and ``DROPBLOCK_INJECT_FUSED`` is not ``0`` (found out once)."""
    if not _TRITON_AVAILABLE:
        _TRITON_AVAILABLE.append(os.environ.get("DROPBLOCK_INJECT_FUSED", "1") != "0" and _triton_imports())
    return _TRITON_AVAILABLE[0]


_TRITON_AVAILABLE: list[bool] = []  # not functools.cache: Dynamo warns when it traces through one


def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fused_eligible(x: torch.Tensor, geom: BlockGeometry, shared: bool, *, device_type: str = "cuda") -> bool:
    """Whether :func:`fused_drop_block` handles ``x``: valid region, 4-D with ``H, W <= 64``, or 5-D
    with ``D * H, W <= 64``; per-channel or ``shared`` masks alike."""
    if geom.seed_region != "valid" or x.dim() not in (4, 5) or x.dtype not in _DTYPES:
        return False
    if not (x.is_cuda if device_type == "cuda" else x.device.type == device_type):  # is_cuda: no device object
        return False
    n, c, *spatial = x.shape
    return (
        math.prod(spatial[:-1]) <= WORD_BITS
        and spatial[-1] <= WORD_BITS
        and 0 < x.numel() < _MAX_NUMEL
        and n * c * math.prod(geom.seed_grid) < _MAX_POSITIONS
        and is_dense(x)
        and triton_available()
    )


def fused_drop_block(
    x: torch.Tensor,
    gamma: float,
    geom: BlockGeometry,
    generator: torch.Generator | None = None,
    inplace: bool = False,
    *,
    shared: bool = False,
    host_seed_in_capture: bool = False,
) -> torch.Tensor:
    """DropBlock of a dense 4-D or 5-D tensor with seed rate ``gamma``, in two Triton launches.

    The Philox seed is drawn on the host, except during CUDA graph capture: there the seed is
    drawn on the device (by the generator, the default CUDA one if None) and the kernels read it
    from memory, so every replay drops new blocks (at the rate of the capture).

    Args:
        x: ``(N, C, H, W)`` or ``(N, C, D, H, W)``, contiguous or channels_last(_3d), ``H, W <= 64``
            (3-D: ``D * H <= 64``; see :func:`fused_eligible`).
        gamma: Seed rate on the valid region.
        geom: The block geometry of ``x``'s spatial size.
        generator: Draws the call's Philox seed (the default CPU generator if None).
        inplace: Write the result into ``x``.
        shared: One mask per sample, shared by its channels (else one per channel).
        host_seed_in_capture: Draw the seed on the host during capture too, so that every replay
            drops the same blocks: only for timing the kernels alone.

    Returns:
        ``x * keep * numel / kept`` in ``x``'s dtype and memory format.

    Raises:
        RuntimeError: A CPU ``generator`` during CUDA graph capture (a replay could not draw from it).
    """
    capturing = _capturing(x)
    if capturing and not host_seed_in_capture:
        if generator is not None and generator.device.type == "cpu":
            raise RuntimeError(
                "DropBlock under CUDA graph capture draws its seed on the GPU at every replay, which a CPU "
                "generator cannot do: pass a CUDA generator (registered with the graph) or none."
            )
        threshold, seed = device_scalars(gamma, x.device, generator)
    else:
        threshold, seed = seed_threshold(gamma), _draw_seed(generator)
    # outside capture the count comes from a pool zeroed ahead (a replay would reuse its slot)
    return _FusedDropBlock.apply(x, threshold, seed, geom, inplace, shared, not capturing)


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _on_device_of(x: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    """Make ``x``'s GPU the current device while launching: Triton launches on the current device's
    stream (torch's own ops follow their tensors), so a model on ``cuda:1`` needs no ``set_device``."""
    index = x.get_device()  # -1 off CUDA
    if index < 0 or index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(index)


class _FusedDropBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, threshold, seed, geom, inplace, shared, pooled):
        launch = _launch_for(tuple(x.shape), geom, _kernel_set(x.dim()), shared)
        out = x if inplace else torch.empty_like(x)
        words, count = launch.run(x, out, threshold, seed, _zeroed_count(x.device) if pooled else None)
        ctx.launch = launch
        ctx.save_for_backward(words, count)
        if inplace:
            ctx.mark_dirty(x)
        return out

    @staticmethod
    def backward(ctx, grad):
        words, count = ctx.saved_tensors
        return ctx.launch.run_backward(grad, words, count), None, None, None, None, None, None


def _zeroed_count(device: torch.device) -> torch.Tensor:
    """A zeroed 1-element int64 count for one call on ``device``'s current stream, taken from a
    pool of ``COUNT_POOL`` zeroed at once, so that a call launches no fill of its own.

    Each slot serves one call (a count saved for backward must outlive later calls). A pool is
    zeroed on the stream whose calls take its slots, so each is zero in stream order. Slots lie
    16 bytes apart: a kernel launched directly keeps the pointer alignment of its first launch.
    Not for CUDA graph capture, where a replay would add to the same slot again.
    """
    index = device.index if device.type == "cuda" else -1
    # the raw stream, as Triton's launcher reads it: cheaper than torch.cuda.current_stream()
    key = (index, torch._C._cuda_getCurrentRawStream(index) if index >= 0 else 0)
    slot = next(_COUNT_POOLS.get(key, _NO_SLOTS), None)
    if slot is None:
        with torch.inference_mode(False):  # a pool made in inference mode still serves autograd later
            slots = iter(torch.zeros(2 * COUNT_POOL, dtype=torch.int64, device=device)[::2].split(1))
        _COUNT_POOLS[key] = slots
        slot = next(slots)
    return slot


_COUNT_POOLS: dict[tuple[int, int], Iterator[torch.Tensor]] = {}  # (device index, stream): slots left
_NO_SLOTS: Iterator[torch.Tensor] = iter(())


def seed_threshold(gamma: float) -> int:
    """A seed position is a seed when its 32-bit Philox draw is below ``round(gamma * 2**32)``."""
    return round(min(max(gamma, 0.0), 1.0) * 2**32)


def device_scalars(
    gamma: float | torch.Tensor, device: torch.device, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`seed_threshold` and a Philox seed as 1-element int64 tensors on ``device``, made by
    device ops only (what CUDA graph capture and a compiled graph need); ``gamma`` may be a tensor."""
    if isinstance(gamma, torch.Tensor):
        threshold = (gamma.to(torch.float64).clamp(0.0, 1.0) * 2.0**32).round().to(torch.int64).reshape(1)
    else:
        threshold = torch.full((1,), seed_threshold(gamma), dtype=torch.int64, device=device)
    return threshold, _device_seed(device, generator)


def _device_seed(device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """A Philox seed in ``[0, _SEED_END)`` as a 1-element int64 tensor drawn on ``device``."""
    return torch.randint(0, _SEED_END, (1,), generator=generator, device=device)


_SEED_END = 2**31 - 1  # seeds lie in [0, _SEED_END): Triton always types them int32
_SEED_BUFFERS = threading.local()  # a 0-d CPU int64 per thread, refilled by each draw


def _draw_seed(generator: torch.Generator | None) -> int:
    """The call's Philox seed, drawn on the host (by ``generator``, on its device)."""
    if generator is not None and generator.device.type != "cpu":
        return int(_device_seed(generator.device, generator))
    buf = getattr(_SEED_BUFFERS, "buf", None)
    if buf is None:
        buf = _SEED_BUFFERS.buf = torch.empty((), dtype=torch.int64)
    return int(buf.random_(0, _SEED_END, generator=generator))


def _by_value(threshold: int) -> tuple[int, int]:
    """A seed threshold in ``[0, 2**32]`` as the seed kernels take it by value: the bit pattern of
    ``threshold - 1`` as a signed 32-bit integer, and ``threshold > 0``. Both always fit 32 bits,
    so Triton types them alike at every rate (a compiled kernel is launched directly)."""
    last = (threshold - 1) & 0xFFFFFFFF
    return last - (1 << 32) if last >= 1 << 31 else last, int(threshold > 0)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


_WORD_DTYPES = {8: torch.uint8, 16: torch.int16, 32: torch.int32, 64: torch.int64}


def _kernel_set(ndim: int = 4) -> str:
    """``KERNELS``, checked; 3-D inputs (``ndim`` 5) always take the flat set, the only one with depth."""
    if KERNELS not in KERNEL_SETS:
        raise ValueError(f"DROPBLOCK_INJECT_FUSED_KERNELS must be one of {KERNEL_SETS}, got {KERNELS!r}")
    return KERNELS if ndim == 4 else "flat"


def _stored_words(geom: BlockGeometry, kernels: str) -> tuple[int, torch.dtype]:
    """Words per plane that a seed kernel stores, and their dtype: one per seed row (``tiles``) or
    one per output row (``flat``), of the fewest bits that hold the row's columns."""
    grid = geom.spatial if kernels == "flat" else geom.seed_grid  # 3-D: rows of all the depth slices
    rows, bits = math.prod(grid[:-1]), grid[-1]
    return rows, _WORD_DTYPES[next(b for b in _WORD_DTYPES if b >= bits)]


@functools.lru_cache(maxsize=256)
def _launch_for(shape: tuple[int, ...], geom: BlockGeometry, kernels: str, shared: bool) -> _Launch:
    # no defaults: lru_cache keys f(a, b, c) and f(a, b, c, False) apart, so every caller passes all four
    return _Launch(shape, geom, kernels, shared)


class _Launch:
    """The tiling and constants of one input shape, shared by its seed, apply and backward launches.

    Triton's ``kernel[grid](...)`` works out the specialisation of every argument at each call,
    which costs more CPU time than the kernels take on the GPU at these sizes. After the first
    launch for a key (the shape, here, plus strides, dtype and device) the compiled kernel is
    launched directly. The key fixes every argument Triton specialises on, except the pointers,
    which must then be 16-byte aligned (fresh allocations are), and the seed and rate, which are
    never specialised (``do_not_specialize``) and always int32 by value (:func:`_by_value`), so
    their types hold too.
    """

    def __init__(
        self, shape: tuple[int, ...], geom: BlockGeometry, kernels: str = "flat", shared: bool = False
    ) -> None:
        n, c = shape[:2]
        # 3-D: depth slices of rows; the kernels see a volume's rows as one plane's (D * H rows)
        one_slice = (1,) * (5 - len(shape))  # a 2-D input is one slice deep
        (d, h, w), (sd, sh, sw), (kd, kh, kw) = ((*one_slice, *g) for g in (shape[2:], geom.seed_grid, geom.block))
        rows, seed_rows = d * h, sd * sh
        self.n_planes, self.numel, self.flat = n * c, math.prod(shape), kernels == "flat"
        self.n_masks, self.shared = n if shared else n * c, shared  # planes of seeds: one per sample if shared
        self.seed_kernel = "seed_rows_kernel" if self.flat else "seed_kernel"
        self.apply_kernel = "apply_flat_kernel" if self.flat else "apply_kernel"
        self.words_per_plane, self.word_dtype = _stored_words(geom, kernels)
        self.wide = w > 32  # flat: rows up to 32 wide are worked in 32 bits
        h_p2, sh_p2 = _pow2(rows), _pow2(seed_rows)
        seed_bp = max(1, SEED_TILE // (h_p2 * sh_p2))
        self.seed_grid = (-(-self.n_masks // seed_bp), 1, 1)  # 3-D: a compiled kernel reads all three
        consts = dict(H=rows, SH=seed_rows, SW=sw, KH=kh, KW=kw, BP=seed_bp, H_P2=h_p2, SH_P2=sh_p2,
                      SW_P4=_pow2(-(-sw // 4)))  # fmt: skip
        depth = dict(DEPTH=d, KD=kd, SLICE_H=h, SLICE_SH=sh)
        wide = {"WIDE": self.wide} if self.flat else {}
        self._draw_consts = {mem: {**consts, "IN_MEMORY": mem, **depth, **wide} for mem in (False, True)}
        self._apply_shape = (c, rows, w, seed_rows, kh, kw)
        self._apply_tilings: dict[bool, tuple[tuple[int, int, int], dict]] = {}
        self.apply_warps = APPLY_WARPS
        self._compiled: dict[tuple, object] = {}

    def run(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        threshold: int | torch.Tensor,
        seed: int | torch.Tensor,
        count: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both launches of a forward call on ``x``'s GPU (``out`` may be ``x``); returns what
        backward needs: the stored words and the count (see :meth:`draw`)."""
        with _on_device_of(x):
            words, count = self.draw(threshold, seed, x.device, count)
            self.apply(x, out, words, count)
        return words, count

    def run_backward(self, grad: torch.Tensor, words: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """The gradient of a forward call: ``grad * keep * numel / kept`` in a new tensor."""
        grad = as_dense(grad)
        out = torch.empty_like(grad)
        with _on_device_of(grad):
            self.apply(grad, out, words, count)
        return out

    def draw(
        self,
        threshold: int | torch.Tensor,
        seed: int | torch.Tensor,
        device: torch.device,
        count: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored words (per seed row, or per output row for ``flat``) and the dropped count
        (1-element int64), for a seed ``threshold`` (:func:`seed_threshold`) and a Philox seed: two
        integers, or two 1-element int64 tensors on the device (a compiled graph's). The count is
        added to ``count`` where given (zeroed, see :func:`_zeroed_count`), else to a new one."""
        words = torch.empty(self.n_masks * self.words_per_plane, dtype=self.word_dtype, device=device)
        if count is None:
            count = torch.zeros(1, dtype=torch.int64, device=device)
        in_memory = isinstance(seed, torch.Tensor)
        rate = (threshold, 0) if in_memory else _by_value(threshold)
        args = (words, count, seed, *rate, self.n_masks)
        consts = self.draw_consts(in_memory)
        key = ("seed", device.index, in_memory)
        self._launch(self.seed_kernel, self.seed_grid, key, args, consts, {"num_warps": SEED_WARPS})
        return words, count

    def draw_consts(self, in_memory: bool) -> dict:
        """The seed kernel's constants, with seed and threshold passed by value or in memory."""
        return self._draw_consts[in_memory]

    def apply(self, src: torch.Tensor, out: torch.Tensor, words: torch.Tensor, count: torch.Tensor) -> None:
        """``out = src * keep * numel / kept`` (``out`` may be ``src``, else it has ``src``'s strides)."""
        aligned = src.data_ptr() % 16 == 0 and out.data_ptr() % 16 == 0
        key = ("apply", src.device.index, src.dtype, src.stride()) if aligned else None
        grid, consts = self.apply_tiling(channels_last=not src.is_contiguous())
        args = (src, out, words, count, self.numel)
        if not self.flat:
            args += (self.n_planes, *src.stride())
        self._launch(self.apply_kernel, grid, key, args, consts, {"num_warps": self.apply_warps})

    def apply_tiling(self, channels_last: bool) -> tuple[tuple[int, int, int], dict]:
        """Grid and constants of the apply kernel (of the flat set: blocks of ``FLAT_BLOCK`` units
        in storage order; else tiles of ``TILE_UNITS`` units, whole rows).

        In channels_last memory the channels of one position are adjacent, so a tile there
        spans at least ``CHANNELS_LAST_PLANES`` channels (fewer rows instead).
        """
        tiling = self._apply_tilings.get(channels_last)
        if tiling is not None:
            return tiling
        c, h, w, sh, kh, kw = self._apply_shape
        word_bits = self.word_dtype.itemsize * 8
        if self.flat:
            consts = dict(C=c, H=h, W=w, CHANNELS_LAST=channels_last, ROW_BITS=word_bits, WIDE=self.wide,
                          BLOCK=FLAT_BLOCK, SHARED=self.shared)  # fmt: skip
            tiling = ((-(-self.numel // FLAT_BLOCK), 1, 1), consts)
        else:
            w_p2, min_planes = _pow2(w), CHANNELS_LAST_PLANES if channels_last else 1
            bh = min(_pow2(h), max(1, TILE_UNITS // (w_p2 * min_planes)))
            bp = max(min_planes, TILE_UNITS // (bh * w_p2))
            consts = dict(C=c, H=h, W=w, SH=sh, KH=kh, KW=kw, WORD_BITS=word_bits, BP=bp, BH=bh,
                          BI=_pow2(min(bh + kh - 1, sh)), W_P2=w_p2, SHARED=self.shared)  # fmt: skip
            tiling = ((-(-self.n_planes // bp), -(-h // bh), 1), consts)
        self._apply_tilings[channels_last] = tiling
        return tiling

    def _launch(self, name: str, grid: tuple[int, ...], key: tuple | None, args: tuple, consts: dict, options: dict):
        compiled = self._compiled.get(key) if key is not None else None
        if compiled is not None:
            compiled[grid](*args, *consts.values())
            return
        result = getattr(_kernels(), name)[grid](*args, **consts, **options)
        if key is not None and DIRECT_LAUNCH and hasattr(result, "launch_metadata"):  # not the interpreter's
            self._compiled[key] = result


def _kernels():
    from dropblock_inject.op import _fused_kernels  # imports Triton: only where fused_eligible held

    return _fused_kernels
