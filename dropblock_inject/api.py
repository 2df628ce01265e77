"""The public calls: ``plan`` (a dry run), ``inject`` (in place) and ``strip``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dropblock_inject.errors import DropBlockInjectError
from dropblock_inject.pipeline.analyse import analyse, input_size_of
from dropblock_inject.pipeline.plan import Plan, make_plan
from dropblock_inject.pipeline.rewrite import apply_plan, strip_model
from dropblock_inject.pipeline.rules import AUTO_SCOPES, Rules
from dropblock_inject.pipeline.trace import LeafSpec
from dropblock_inject.recipe import Recipe, attribute_path, resolve_rules

__all__ = ["inject", "plan", "strip"]


def plan(
    model: nn.Module,
    recipe: Recipe | Rules | str | Path | None = None,
    *,
    input_size: Sequence[int] | None = None,
    example_inputs: tuple[Any, ...] | torch.Tensor | dict[str, Any] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    drop_prob: float | None = None,
    stages: int | list[int] | None = None,
    block_size: int | tuple[int, ...] | None = None,
    leaf_modules: Sequence[LeafSpec] = (),
    model_name: str | None = None,
    **rules: Any,
) -> Plan:
    """The sites ``inject`` would patch, without touching the model (a dry run).

    Feature sizes come from fake tensors at the training resolution: ``input_size``, else the
    size the model states (timm's ``pretrained_cfg["input_size"]``, HF's ``config.image_size``,
    the ``min_size`` that torchvision's detection transform resizes to, ultralytics'
    ``args["imgsz"]``), else 3x224x224 (3x16x112x112 for 3-D convnets).

    Args:
        model: A timm, torchvision, HF transformers, segmentation_models_pytorch or ultralytics
            model (or any ``nn.Module`` with convolutions).
        recipe: ``None`` (the built-in default: the paper's ResNet-50 setup generalised: the
            last two stages, block 7, a quarter of the rate in the second-to-last), ``"auto"``
            (the shipped recipe for the model's family), a recipe name (``"resnet"``), a YAML
            path, a :class:`~dropblock_inject.Recipe` or :class:`~dropblock_inject.Rules`.
        input_size: ``(C, H, W)`` or ``(C, D, H, W)`` without the batch dimension.
        example_inputs: The model's positional inputs instead of ``input_size`` (a tuple, or one
            tensor), or its keyword inputs as a dict (``{"pixel_values": x}``).
        example_kwargs: Keyword inputs besides positional ``example_inputs``.
        drop_prob: Overrides the recipe's target rate.
        stages: Overrides the recipe's stages (an int N: the last N; a list of stage indices).
        block_size: Overrides the recipe's block size.
        leaf_modules: Module classes or path patterns the tracer must not enter.
        model_name: The model's name for ``recipe="auto"`` (timm models carry theirs).
        **rules: Any other :class:`Rules` field (``gamma``, ``include``, ``exclude``, ``overrides``,
            ``scope`` ...).

    Returns:
        A :class:`~dropblock_inject.pipeline.plan.Plan`; ``print(plan)`` shows a table.

    Raises:
        NoSitesError: No site, with what was found instead (also: the scope holds none).
        DropBlockInjectError: The scope names no submodule.
        TypeError: ``model`` is not an ``nn.Module``, or the inputs are of the wrong kind.

    Example:
        >>> import torchvision
        >>> p = plan(torchvision.models.resnet18())
        >>> len(p), sorted({s.stage for s in p})
        (4, [3, 4])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"plan() takes an nn.Module, got {type(model).__name__}")
    base = resolve_rules(recipe, model, model_name)
    chosen = base.replace(drop_prob=drop_prob, stages=stages, block_size=block_size, **rules)
    scope = _scope(model, chosen.scope)
    args, kwargs = _example_inputs(model, input_size, example_inputs, example_kwargs)
    analysis = analyse(model, args, example_kwargs=kwargs, leaf_modules=leaf_modules)
    size = input_size_of(args, kwargs)
    return make_plan(analysis, chosen, model=type(model).__name__, input_size=size, scope=scope)


def _scope(model: nn.Module, scope: str) -> str:
    """The module path whose sites form the stages ("" for the whole model)."""
    if scope == "all":
        return ""
    if scope == "auto":
        children = dict(model.named_children())
        return next((name for name in AUTO_SCOPES if name in children), "")
    try:
        model.get_submodule(scope)
    except AttributeError as e:
        children = ", ".join(name for name, _ in model.named_children())
        raise DropBlockInjectError(
            f"scope {scope!r} is not a submodule of {type(model).__name__} (its children: {children}); "
            f"pass a module path, 'auto' or 'all'"
        ) from e
    return scope


def inject(
    model: nn.Module, recipe: Plan | Recipe | Rules | str | Path | None = None, **overrides: Any
) -> nn.Module:
    """Insert DropBlock before the activations of the deep stages of ``model``, in place.

    The model keeps its class, methods, attributes, ``state_dict`` keys and Parameter objects;
    in eval mode it computes exactly what it computed before. Sites that already hold a
    DropBlock (ours, or timm's ``drop_block_rate``) are left as they are. Ramp the rate with
    :class:`~dropblock_inject.DropBlockSchedule`; undo with :func:`strip`.

    Args:
        model: The model to patch.
        recipe: The rules (see :func:`plan`), or a :class:`~dropblock_inject.pipeline.plan.Plan`
            that :func:`plan` made for this model: its sites are applied as they are, without
            analysing the model again (print it first, patch exactly what was printed).
        **overrides: The keyword arguments of :func:`plan` (not with a ``Plan``).

    Returns:
        The same ``model`` object.

    Raises:
        NoSitesError: No site (the model is unchanged).
        VerificationError: A check after the rewrite failed (the model was restored).
        TypeError: ``overrides`` given with a ``Plan``.
        DropBlockInjectError: The ``Plan`` was made for another model.

    Example:
        >>> import torchvision
        >>> m = inject(torchvision.models.resnet18(), drop_prob=0.1)
        >>> type(m.layer4[0].bn1.dropblock).__name__
        'DropBlock'
        >>> m2 = torchvision.models.resnet18()
        >>> p = plan(m2, drop_prob=0.1)
        >>> inject(m2, p) is m2
        True
    """
    if isinstance(recipe, Plan):
        if overrides:
            raise TypeError(f"inject(model, plan) applies the plan as it is; got overrides {sorted(overrides)}: "
                            f"pass them to plan() instead")  # fmt: skip
        _check_plan_fits(model, recipe)
        chosen = recipe
    else:
        chosen = plan(model, recipe, **overrides)
    apply_plan(model, chosen)
    return model


def _check_plan_fits(model: nn.Module, chosen: Plan) -> None:
    names = {name for name, _ in model.named_modules()}
    missing = sorted({s.host for s in chosen if s.status == "new" and s.host not in names})
    if chosen.model != type(model).__name__ or missing:
        raise DropBlockInjectError(
            f"this plan was made for a {chosen.model}, not for this {type(model).__name__}"
            + (f" (it has no {missing[:3]})" if missing else "")
            + ": call plan() on the model you inject"
        )


def strip(model: nn.Module) -> nn.Module:
    """Remove every DropBlock that :func:`inject` inserted, in place, and return the model.

    Example:
        >>> import torchvision
        >>> m = strip(inject(torchvision.models.resnet18()))
        >>> hasattr(m.layer4[0].bn1, "dropblock")
        False
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"strip() takes an nn.Module, got {type(model).__name__}")
    strip_model(model)
    return model


def _example_inputs(
    model: nn.Module,
    input_size: Sequence[int] | None,
    example_inputs: tuple[Any, ...] | torch.Tensor | dict[str, Any] | None,
    example_kwargs: dict[str, Any] | None,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword inputs for the analysis: the user's, else one batch at the model's size."""
    if example_kwargs is not None and not (isinstance(example_kwargs, dict) and all(map(_is_name, example_kwargs))):
        what = list(example_kwargs) if isinstance(example_kwargs, dict) else type(example_kwargs).__name__
        raise TypeError(f"keyword inputs must be a dict keyed by parameter names, got {what}")
    if isinstance(example_inputs, dict):
        if example_kwargs is not None:
            raise TypeError("example_inputs is a dict of keyword inputs: pass it or example_kwargs, not both")
        return _example_inputs(model, input_size, None, example_inputs)
    if example_inputs is not None or example_kwargs:
        args = () if example_inputs is None else example_inputs
        return (args if isinstance(args, tuple) else (args,)), dict(example_kwargs or {})
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    size = tuple(input_size) if input_size is not None else _default_input_size(model)
    if len(size) not in (3, 4) or not all(isinstance(s, int) and s > 0 for s in size):
        raise DropBlockInjectError(f"input_size must be (C, H, W) or (C, D, H, W) of positive ints, got {input_size!r}")
    return (torch.empty((2, *size), device=device),), {}


def _is_name(key: object) -> bool:
    return isinstance(key, str) and key.isidentifier()


def _default_input_size(model: nn.Module) -> tuple[int, ...]:
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))), None)
    channels = first.in_channels if first is not None else 3
    for attribute, form in SIZE_ATTRIBUTES.items():
        size = _size_from(attribute_path(model, attribute), form, channels)
        if size:
            return size
    if isinstance(first, nn.Conv3d):
        return (channels, 16, 112, 112)
    return (channels, 224, 224)


# Where a model states the input size it is trained at (the first found wins), and what the value is: timm's
# pretrained config holds (C, H, W); HF's config.image_size and ultralytics' imgsz a side or (H, W); the
# min_size of torchvision's detection transform the sides it resizes images to (the last one in eval).
SIZE_ATTRIBUTES = {"pretrained_cfg.input_size": "chw", "default_cfg.input_size": "chw", "config.image_size": "hw",
                   "args.imgsz": "hw", "transform.min_size": "sides"}  # fmt: skip


def _size_from(value: Any, form: str, channels: int) -> tuple[int, ...] | None:
    """``(C, H, W)`` (or ``(C, D, H, W)``) from a stated size of the given form, None if it is not one."""
    sides = list(value) if isinstance(value, (list, tuple)) else [value]
    if not sides or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sides):
        return None
    if form == "chw":
        return tuple(sides) if len(sides) in (3, 4) else None
    if form == "sides":
        return (channels, sides[-1], sides[-1])
    return (channels, sides[0], sides[-1]) if len(sides) <= 2 else None
