"""Shared fixtures: every test starts from the same global RNG state."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def drop_fraction(out: torch.Tensor) -> float:
    """Fraction of exactly-zero units (inputs in the op tests are all non-zero)."""
    return (out == 0).float().mean().item()
