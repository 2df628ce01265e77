"""Block geometry and seed rates: Eq. 1, coverage counts and the calibrated solver."""

from __future__ import annotations

import math

import pytest

from dropblock_inject.op.geometry import block_geometry, max_seeds


class TestBlockGeometry:
    def test_valid_grid_and_clipping(self) -> None:
        assert block_geometry((14, 14), (7, 7)).seed_grid == (8, 8)
        assert block_geometry((13, 9), (4, 4)).seed_grid == (10, 6)
        geom = block_geometry((5, 9), (7, 7))  # the block is clipped per dimension
        assert geom.block == (5, 7)
        assert geom.seed_grid == (1, 3)

    def test_full_region_grid(self) -> None:
        geom = block_geometry((14, 14), (7, 7), "full")
        assert geom.seed_grid == (14, 14)
        assert geom.block_start == (-3, -3)
        assert block_geometry((8, 8), (4, 4), "full").block_start == (-2, -2)

    @pytest.mark.parametrize("region", ["valid", "full"])
    @pytest.mark.parametrize(
        ("spatial", "block"), [((14, 14), (7, 7)), ((7, 7), (3, 3)), ((13, 9), (4, 2)), ((8, 14, 14), (5, 5, 5))]
    )
    def test_coverage_weights_sum_to_one_and_count_every_block_unit(self, spatial, block, region) -> None:
        geom = block_geometry(spatial, block, region)
        assert sum(w for _, w in geom.coverage) == pytest.approx(1.0)
        assert all(n >= 1 for n, _ in geom.coverage)
        # the mean number of seeds covering a unit = (#seed positions * units per block, inside the map) / #units
        if region == "valid":
            mean = sum(n * w for n, w in geom.coverage)
            assert mean == pytest.approx(math.prod(geom.seed_grid) * math.prod(geom.block) / math.prod(spatial))

    def test_paper_gamma_is_eq1(self) -> None:
        geom = block_geometry((14, 14), (7, 7))
        assert geom.paper_gamma(0.1) == pytest.approx(0.1 / 49 * 196 / 64)
        assert block_geometry((14, 14), (7, 7), "full").paper_gamma(0.1) == pytest.approx(0.1 / 49)
        assert block_geometry((7, 7), (7, 7)).paper_gamma(0.1) == pytest.approx(0.1)  # SpatialDropout
        assert block_geometry((7, 7), (1, 1)).paper_gamma(0.3) == pytest.approx(0.3)  # dropout
        assert block_geometry((7, 7), (7, 7)).paper_gamma(1.0) == 1.0

    @pytest.mark.parametrize(
        ("spatial", "block"), [((56, 56), (7, 7)), ((14, 14), (7, 7)), ((7, 7), (3, 3)), ((13, 9), (4, 4))]
    )
    @pytest.mark.parametrize("rate", [0.05, 0.1, 0.3])
    def test_calibrated_gamma_solves_the_expected_drop(self, spatial, block, rate) -> None:
        geom = block_geometry(spatial, block)
        gamma = geom.calibrated_gamma(rate)
        assert geom.expected_drop(gamma) == pytest.approx(rate, rel=1e-9)
        assert gamma > geom.paper_gamma(rate) * 0.99  # Eq. 1 ignores overlaps: it under-drops

    def test_expected_drop_is_monotone(self) -> None:
        geom = block_geometry((14, 14), (5, 5))
        values = [geom.expected_drop(g / 100) for g in range(101)]
        assert values == sorted(values)
        assert values[0] == 0.0
        assert values[-1] == pytest.approx(1.0)

    def test_max_seeds_bounds_the_count(self) -> None:
        assert max_seeds(1000, 0.01) > 10 + 8 * math.sqrt(10)
        assert max_seeds(10, 1.0) == 11
