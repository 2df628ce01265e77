"""How an injected DropBlock is attached to a model: the one place ``analyse`` and ``rewrite`` share.

``rewrite`` attaches; ``analyse`` recognises what an earlier ``inject`` attached (so a second
``inject`` skips those sites). Both read the names and tests here, never each other's attributes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dropblock_inject.op.module import DropBlock

__all__ = ["HOSTED_ATTR", "REPLACED_ATTR", "dropblock_hook", "hosted_dropblock", "injected_modules", "is_injected"]

HOSTED_ATTR = "dropblock"  # the DropBlock child of a module whose output it drops (through a forward hook)
REPLACED_ATTR = "_dropblock_replaced"  # on a DropBlock that fills a slot: the module it stands in for


def is_injected(module: nn.Module) -> bool:
    """Whether ``module`` is a DropBlock that ``inject`` put there (not one the user placed)."""
    return isinstance(module, DropBlock) and module.injected


def hosted_dropblock(host: nn.Module) -> DropBlock | None:
    """The injected DropBlock that ``host`` carries for its output, if any."""
    child = host._modules.get(HOSTED_ATTR)
    return child if is_injected(child) else None


def dropblock_hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    """Forward hook: pass the module's output through its hosted DropBlock.

    A module-level function, so ``copy.deepcopy``, pickling and ``torch.save`` of the whole
    model keep it.
    """
    return module._modules[HOSTED_ATTR](output)


def injected_modules(model: nn.Module) -> list[DropBlock]:
    """The DropBlocks ``inject`` put into ``model``, in ``model.modules()`` order."""
    return [m for m in model.modules() if is_injected(m)]
