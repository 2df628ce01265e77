"""dropblock_inject: paper-faithful DropBlock, scheduled, injected into any convnet in one call.

Example:
    >>> import torch
    >>> import dropblock_inject as dbi
    >>> m = dbi.DropBlock(drop_prob=0.1, block_size=7)
    >>> dbi.drop_block(torch.randn(2, 4, 14, 14), 0.1, 7).shape
    torch.Size([2, 4, 14, 14])
"""

from dropblock_inject.api import inject, plan, strip
from dropblock_inject.errors import DropBlockInjectError, NoSitesError, RecipeError, TraceError, VerificationError
from dropblock_inject.op import DropBlock, block_geometry, drop_block
from dropblock_inject.pipeline.plan import Plan, Site
from dropblock_inject.pipeline.rules import Rules
from dropblock_inject.recipe import Recipe, list_recipes, load_recipe, recipe_for
from dropblock_inject.schedule import DropBlockSchedule

__version__ = "0.1.0"

_TRAINING = ("AblationConfig", "AblationResult", "FinetuneConfig", "ablate", "finetune")


def __getattr__(name: str) -> object:
    """The training side (``ablate``, ``finetune`` and their configs), imported on first use."""
    if name in _TRAINING:
        import dropblock_inject.train as train

        return getattr(train, name)
    raise AttributeError(f"module 'dropblock_inject' has no attribute {name!r}")


__all__ = [
    "AblationConfig",
    "AblationResult",
    "DropBlock",
    "DropBlockInjectError",
    "DropBlockSchedule",
    "FinetuneConfig",
    "NoSitesError",
    "Plan",
    "Recipe",
    "RecipeError",
    "Rules",
    "Site",
    "TraceError",
    "VerificationError",
    "__version__",
    "ablate",
    "block_geometry",
    "drop_block",
    "finetune",
    "inject",
    "list_recipes",
    "load_recipe",
    "plan",
    "recipe_for",
    "strip",
]
