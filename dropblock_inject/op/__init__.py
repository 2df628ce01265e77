"""The DropBlock op, its module and its geometry; depends on nothing else of the package."""

from dropblock_inject.op.functional import drop_block
from dropblock_inject.op.geometry import block_geometry
from dropblock_inject.op.module import DropBlock

__all__ = ["DropBlock", "block_geometry", "drop_block"]
