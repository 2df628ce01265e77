"""Block geometry and seed rates (gamma) of DropBlock.

Everything here is plain Python on shapes: which seed positions exist, which units a seed's
block covers, and the seed rate ``gamma`` that makes the op drop a given fraction of units.

Conventions (one spatial dimension; the others are alike and independent):

* ``size`` is the feature size ``S``; the block ``k`` is clipped to it (``k = min(block, S)``).
* ``seed_region="valid"`` (the paper): seeds lie on the ``S - k + 1`` positions where the whole
  block fits; the block of seed ``s`` covers ``[s, s + k - 1]``.
* ``seed_region="full"`` (the tutorial's variant): seeds lie on all ``S`` positions; the block
  of seed ``s`` covers ``[s - k // 2, s - k // 2 + k - 1]``, truncated at the edges.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

GAMMA_MODES = ("paper", "calibrated")
SEED_REGIONS = ("valid", "full")
T = TypeVar("T")


def compile_safe_cache(maxsize: int) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """``functools.lru_cache`` that steps aside while ``torch.compile`` traces the caller.

    Dynamo cannot trace through a cache wrapper (it warns and traces the function itself), so
    under compilation the plain function runs; its results are constants of the graph anyway.
    """

    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args: Any) -> T:
            return fn(*args) if torch.compiler.is_compiling() else cached(*args)

        return call

    return decorate


@dataclass(frozen=True)
class BlockGeometry:
    """Where seeds may fall and what their blocks cover, for one feature-map size.

    Attributes:
        spatial: The feature size, ``(H, W)`` or ``(D, H, W)``.
        block: The block size per dimension, already clipped to ``spatial``.
        seed_region: ``"valid"`` or ``"full"`` (see the module docstring).
    """

    spatial: tuple[int, ...]
    block: tuple[int, ...]
    seed_region: str
    # derived in __post_init__ (every eager call reads them: worked out once per geometry)
    seed_grid: tuple[int, ...] = field(init=False, repr=False, compare=False)
    """Number of seed positions per spatial dimension."""
    block_start: tuple[int, ...] = field(init=False, repr=False, compare=False)
    """Offset of a block's first unit relative to its seed, per dimension."""
    paper_slope: float = field(init=False, repr=False, compare=False)
    """``gamma / rate`` of Eq. 1 (before clipping at 1); no valid-region factor for ``"full"``."""

    def __post_init__(self) -> None:
        full = self.seed_region == "full"
        grid = self.spatial if full else tuple(s - k + 1 for s, k in zip(self.spatial, self.block))
        start = tuple(-(k // 2) if full else 0 for k in self.block)
        units = math.prod(self.block) * (1 if full else math.prod(grid))
        slope = (1.0 if full else math.prod(self.spatial)) / units
        object.__setattr__(self, "seed_grid", grid)
        object.__setattr__(self, "block_start", start)
        object.__setattr__(self, "paper_slope", slope)

    @property
    def coverage(self) -> tuple[tuple[int, float], ...]:
        """Histogram of how many seed positions cover a unit: ``((n, weight), ...)``.

        ``weight`` is the fraction of units covered by exactly ``n`` seed positions; a unit
        is kept with probability ``(1 - gamma) ** n``.
        """
        return _coverage(self)

    def expected_drop(self, gamma: float) -> float:
        """Expected fraction of dropped units for seed rate ``gamma`` (overlaps and edges counted)."""
        q = 1.0 - gamma
        return min(max(1.0 - sum(w * q**n for n, w in self.coverage), 0.0), 1.0)

    def paper_gamma(self, rate: float) -> float:
        """Eq. 1 of the paper: ``rate / prod(block) * prod(spatial) / prod(seed_grid)``, at most 1."""
        return min(rate * self.paper_slope, 1.0)

    def calibrated_gamma(self, rate: float) -> float:
        """The seed rate whose expected dropped fraction is exactly ``rate``."""
        return _solve_calibrated(self, rate)

    def seed_rate(self, rate: float, mode: str) -> float:
        """``gamma`` for a target drop ``rate`` under ``mode`` (``"paper"`` or ``"calibrated"``)."""
        return self.calibrated_gamma(rate) if mode == "calibrated" else self.paper_gamma(rate)


@compile_safe_cache(maxsize=1024)
def _coverage(geom: BlockGeometry) -> tuple[tuple[int, float], ...]:
    hist = Counter({1: 1})
    for size, k, grid, start in zip(geom.spatial, geom.block, geom.seed_grid, geom.block_start):
        per_dim = Counter(_covering_seeds(i, k, grid, start) for i in range(size))
        combined: Counter[int] = Counter()
        for (a, ca), (b, cb) in itertools.product(hist.items(), per_dim.items()):
            combined[a * b] += ca * cb
        hist = combined
    total = math.prod(geom.spatial)
    return tuple(sorted((n, c / total) for n, c in hist.items()))


def _covering_seeds(i: int, k: int, grid: int, start: int) -> int:
    """Number of seeds ``s`` in ``[0, grid)`` whose block ``[s + start, s + start + k - 1]`` holds ``i``."""
    lo = max(i - start - k + 1, 0)
    hi = min(i - start, grid - 1)
    return max(hi - lo + 1, 0)


@compile_safe_cache(maxsize=4096)
def _solve_calibrated(geom: BlockGeometry, rate: float) -> float:
    """Bisection on ``expected_drop(gamma) == rate`` (monotone in gamma); cached."""
    if rate <= 0.0:
        return 0.0
    if rate >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if geom.expected_drop(mid) < rate:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@compile_safe_cache(maxsize=1024)
def block_geometry(spatial: tuple[int, ...], block_size: tuple[int, ...], seed_region: str = "valid") -> BlockGeometry:
    """The (cached) geometry of ``block_size`` blocks on a ``spatial`` map, the block clipped to it.

    Example:
        >>> block_geometry((14, 14), (7, 7)).seed_grid
        (8, 8)
    """
    block = tuple(min(k, s) for k, s in zip(block_size, spatial))
    return BlockGeometry(tuple(spatial), block, seed_region)


def max_seeds(num_positions: int, gamma: float) -> int:
    """A static bound on the number of Bernoulli(gamma) seeds among ``num_positions``.

    The binomial count exceeds it with probability below 1e-14 (8 standard deviations plus
    a margin), so a fixed-size sample of this many seeds is exact for every practical purpose.
    """
    mean = num_positions * gamma
    bound = mean + 8.0 * math.sqrt(mean * (1.0 - gamma)) + 16.0
    return int(min(math.ceil(bound), num_positions + 1))
