"""Shared fixtures: every test starts from the same global RNG state."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Any

import pytest
import torch
import torch.nn.functional as F

# ultralytics writes its settings file when imported, under HOME unless told otherwise
if "YOLO_CONFIG_DIR" not in os.environ:
    os.environ["YOLO_CONFIG_DIR"] = tempfile.mkdtemp(prefix="yolo-config-")
    atexit.register(shutil.rmtree, os.environ["YOLO_CONFIG_DIR"], True)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def drop_fraction(out: torch.Tensor) -> float:
    """Fraction of exactly-zero units (inputs in the op tests are all non-zero)."""
    return (out == 0).float().mean().item()


def is_union_of_blocks(dropped: torch.Tensor, block: tuple[int, ...]) -> bool:
    """True when every dropped unit lies in a fully dropped block that fits in the map.

    ``dropped``: ``(P, *spatial)`` float 0/1. A window is "full" when all its units are dropped
    (a min-pool); dilating the full windows back must give the dropped map exactly.
    """
    pool = F.max_pool2d if dropped.dim() == 3 else F.max_pool3d
    full = -pool(-dropped, block, stride=1)
    pad = [p for k in reversed(block) for p in (k - 1, k - 1)]
    return torch.equal(pool(F.pad(full, pad), block, stride=1), dropped)


def output_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model's output (nested dicts, lists, tuples, HF model outputs), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in output_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in output_tensors(v)]
    return []
