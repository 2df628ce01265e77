"""The fused CUDA kernels inside a ``torch.compile`` graph, as a ``torch.library`` custom op.

With ``DROPBLOCK_INJECT_FUSED_COMPILED=1`` (``COMPILED``) a compiled model calls the kernels of
:mod:`~dropblock_inject.op.fused` for the inputs they take
(:func:`~dropblock_inject.op.fused.fused_eligible`), as ``dropblock_inject::fused_drop_block``
(backward: ``dropblock_inject::fused_drop_block_backward``); by default, and for other inputs,
compiled graphs take the traceable op (:mod:`~dropblock_inject.op.traceable`).

Alone, the custom op is the faster: its kernels take less time than the traceable op's. In a
model it is the slower, because Inductor cannot fuse into it, while it fuses the traceable op's
multiply with the neighbouring kernels; so compiled models take the traceable op by default (the
kernel and training-step figures are in docs/performance.md).
The seed is drawn by the graph's own random generator and the seed threshold worked out from the
rate tensor on the device, so a schedule that changes the rate recompiles nothing and a CUDA graph
(``mode="reduce-overhead"``) draws new blocks at every replay.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from dropblock_inject.op.fused import _kernel_set, _Launch, _launch_for, _stored_words, device_scalars, fused_eligible
from dropblock_inject.op.geometry import BlockGeometry, block_geometry
from dropblock_inject.op.layout import as_dense

__all__ = ["COMPILED", "compiled_eligible", "fused_drop_block_traceable"]

COMPILED = os.environ.get("DROPBLOCK_INJECT_FUSED_COMPILED", "0") != "0"  # off: see the module docstring
_COMPILED_DEVICE = "cuda"  # the tests run it on CPU tensors under Triton's interpreter


def compiled_eligible(x: torch.Tensor, geom: BlockGeometry, shared: bool, generator: torch.Generator | None) -> bool:
    """Whether a compiled graph runs :func:`fused_drop_block_traceable` for ``x`` (CUDA, ``COMPILED``,
    4-D, per-channel masks)."""
    eligible = not shared and x.dim() == 4 and generator is None
    return COMPILED and eligible and fused_eligible(x, geom, False, device_type=_COMPILED_DEVICE)


def fused_drop_block_traceable(x: torch.Tensor, gamma: float | torch.Tensor, geom: BlockGeometry) -> torch.Tensor:
    """The fused kernels inside a ``torch.compile`` graph, as one custom op (no graph break).

    The seed is drawn by the graph's own random generator and the threshold worked out from a
    tensor ``gamma`` on the device, so a schedule that changes the rate recompiles nothing and a
    CUDA graph (``mode="reduce-overhead"``) draws new blocks at every replay.

    Args:
        x: As for :func:`fused_drop_block`.
        gamma: Seed rate on the valid region (a float or a 0-d tensor).
        geom: The block geometry of ``x``'s spatial size.

    Returns:
        ``x * keep * numel / kept``, a new tensor in ``x``'s dtype and memory format.
    """
    threshold, seed = device_scalars(gamma, x.device)
    # the kernel set is an argument, not read inside: it fixes the words' size, which a cached
    # compiled graph (in this process or on disk) must not take from another setting
    return torch.ops.dropblock_inject.fused_drop_block(x, threshold, seed, list(geom.block), _kernel_set())[0]


def _launch(x: torch.Tensor, block: Sequence[int], kernels: str) -> tuple[torch.Tensor, _Launch]:
    x = as_dense(x)
    return x, _launch_for(tuple(x.shape), block_geometry(tuple(x.shape[2:]), tuple(block)), kernels, False)


@torch.library.custom_op("dropblock_inject::fused_drop_block", mutates_args=())
def _fused_op(
    x: torch.Tensor, threshold: torch.Tensor, seed: torch.Tensor, block: Sequence[int], kernels: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, launch = _launch(x, block, kernels)
    out = torch.empty_like(x)
    words, count = launch.run(x, out, threshold, seed)
    return out, words, count


@_fused_op.register_fake
def _(x: torch.Tensor, threshold: torch.Tensor, seed: torch.Tensor, block: Sequence[int], kernels: str):
    # the planes may be symbolic (dynamic shapes); the map size fixes the kernels, so it is not
    x = as_dense(x)
    spatial = (int(x.shape[2]), int(x.shape[3]))
    per_plane, dtype = _stored_words(block_geometry(spatial, tuple(int(k) for k in block)), kernels)
    words = x.new_empty(x.shape[0] * x.shape[1] * per_plane, dtype=dtype)
    return torch.empty_like(x), words, x.new_empty(1, dtype=torch.int64)


@torch.library.custom_op("dropblock_inject::fused_drop_block_backward", mutates_args=())
def _fused_backward_op(
    grad: torch.Tensor, words: torch.Tensor, count: torch.Tensor, block: Sequence[int], kernels: str
) -> torch.Tensor:
    grad, launch = _launch(grad, block, kernels)
    return launch.run_backward(grad, words, count)


@_fused_backward_op.register_fake
def _(grad: torch.Tensor, words: torch.Tensor, count: torch.Tensor, block: Sequence[int], kernels: str) -> torch.Tensor:
    return torch.empty_like(as_dense(grad))


def _setup_backward(ctx, inputs: tuple, output: tuple) -> None:
    ctx.block, ctx.kernels = inputs[3], inputs[4]
    ctx.save_for_backward(output[1], output[2])


def _backward(ctx, grad: torch.Tensor, _words: torch.Tensor, _count: torch.Tensor) -> tuple:
    words, count = ctx.saved_tensors
    return _fused_backward_op(grad, words, count, ctx.block, ctx.kernels), None, None, None, None


_fused_op.register_autograd(_backward, setup_context=_setup_backward)
