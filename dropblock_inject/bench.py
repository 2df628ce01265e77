"""Benchmarks: ``python -m dropblock_inject.bench op`` (also ``dropblock-inject bench op``).

Every candidate runs interleaved with the others in one process, and each time is reported as a
ratio to the floor, an out-of-place elementwise multiply of the same tensor: machine noise moves
numerator and denominator together.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from dropblock_inject.op.functional import drop_block

__all__ = ["OP_SHAPES", "bench_inject", "bench_op", "time_interleaved"]

OP_SHAPES: tuple[tuple[tuple[int, ...], int], ...] = (
    ((32, 256, 56, 56), 7),
    ((32, 1024, 14, 14), 7),
    ((32, 2048, 7, 7), 3),
)


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, number: int = 3) -> dict[str, float]:
    """Median seconds per call of each function; the candidates take turns ``repeats`` times.

    In each turn a candidate runs once untimed (so the previous candidate's memory traffic and
    allocations do not land on it), then ``number`` timed calls whose mean is one sample.
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            fn()
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            samples[name].append((time.perf_counter() - t0) / number)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def _op_candidates(x: torch.Tensor, block: int, p: float) -> dict[str, Callable[[], object]]:
    fns: dict[str, Callable[[], object]] = {
        "floor x*2": lambda: x * 2.0,
        "ours per-channel": lambda: drop_block(x, p, block),
        "ours shared": lambda: drop_block(x, p, block, shared_channels=True),
    }
    try:
        from timm.layers import drop_block_2d

        fns["timm per-channel"] = lambda: drop_block_2d(x, p, block, couple_channels=False)
        fns["timm shared"] = lambda: drop_block_2d(x, p, block)
    except (ImportError, TypeError):  # pragma: no cover - old timm
        pass
    try:
        from torchvision.ops import drop_block2d

        fns["torchvision"] = lambda: drop_block2d(x, p, block)
    except ImportError:  # pragma: no cover
        pass
    return fns


def bench_op(
    shapes: Sequence[tuple[tuple[int, ...], int]] = OP_SHAPES,
    *,
    drop_prob: float = 0.1,
    repeats: int = 5,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    print_fn: Callable[[str], None] = print,
) -> list[dict[str, object]]:
    """Time the op against the floor and the timm/torchvision ops; prints one block per shape.

    Returns:
        One row per (shape, candidate): ``shape``, ``block``, ``name``, ``ms``, ``ratio``.
    """
    rows: list[dict[str, object]] = []
    print_fn(
        f"bench op: {device} {str(dtype).replace('torch.', '')}, threads={torch.get_num_threads()}, "
        f"p={drop_prob}, median of {repeats} interleaved turns, ratio = time / time(floor)"
    )
    for shape, block in shapes:
        x = torch.randn(shape, dtype=dtype, device=device)
        times = time_interleaved(_op_candidates(x, block, drop_prob), repeats)
        floor = times["floor x*2"]
        print_fn(f"{tuple(shape)} block {block}:")
        for name, t in times.items():
            rows.append({"shape": tuple(shape), "block": block, "name": name, "ms": t * 1e3, "ratio": t / floor})
            print_fn(f"  {name:<18} {t * 1e3:9.2f} ms  {t / floor:7.2f}x floor")
        ours = times["ours per-channel"]
        anchors = [n for n in ("timm per-channel", "torchvision") if n in times]
        if anchors:
            speedups = ", ".join(f"{times[n] / ours:.1f}x vs {n}" for n in anchors)
            print_fn(f"  ours per-channel is {speedups}")
    return rows


def bench_inject(
    names: Sequence[str], *, repeats: int = 5, print_fn: Callable[[str], None] = print
) -> list[dict[str, object]]:
    """Median seconds of ``plan`` and of ``inject`` (which plans again) on freshly built models."""
    from dropblock_inject.api import inject, plan
    from dropblock_inject.errors import NoSitesError
    from dropblock_inject.models import create_model

    rows: list[dict[str, object]] = []
    print_fn(f"bench inject: median of {repeats} on fresh models (model construction not timed)")
    for name in names:
        plan_t, inject_t, sites = [], [], 0
        for _ in range(repeats + 1):  # the first round warms the caches and is dropped
            model = create_model(name)
            t0 = time.perf_counter()
            try:
                sites = len(plan(model))
            except NoSitesError:
                print_fn(f"  {name:<28} no site ({time.perf_counter() - t0:.3f} s)")
                break
            t1 = time.perf_counter()
            inject(model)
            plan_t.append(t1 - t0)
            inject_t.append(time.perf_counter() - t1)
        if not inject_t:
            continue
        row = {"model": name, "sites": sites, "plan_s": statistics.median(plan_t[1:]),
               "inject_s": statistics.median(inject_t[1:])}  # fmt: skip
        rows.append(row)
        print_fn(f"  {name:<28} {sites:4d} sites  plan {row['plan_s']:.3f} s  inject {row['inject_s']:.3f} s")
    return rows


if __name__ == "__main__":  # python -m dropblock_inject.bench op
    import sys

    from dropblock_inject.cli import main

    raise SystemExit(main(["bench", *sys.argv[1:]]))
