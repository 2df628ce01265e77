"""Build a model from a name, for the command line: a timm name, ``tv:<builder>``, or ``module:callable``."""

from __future__ import annotations

import difflib
import importlib

from torch import nn

from dropblock_inject.errors import DropBlockInjectError

__all__ = ["create_model"]


def create_model(name: str, *, pretrained: bool = False, **kwargs: object) -> nn.Module:
    """Build ``name`` with random weights (or the hub's, with ``pretrained=True``).

    Args:
        name: ``resnet50`` (timm), ``tv:resnet50`` (torchvision; detection and video builders
            too, e.g. ``tv:fasterrcnn_resnet50_fpn``, ``tv:r3d_18``; ``tv:<builder>.backbone`` is
            a detection model's backbone alone) or ``package.module:callable``.
        pretrained: Load the hub's weights (needs network access).
        **kwargs: Passed to the builder.

    Raises:
        DropBlockInjectError: Unknown name; the message lists close matches.

    Example:
        >>> type(create_model("tv:resnet18")).__name__
        'ResNet'
    """
    if name.startswith("tv:"):
        builder, dot, part = name[3:].partition(".")
        model = _torchvision(builder, pretrained, kwargs)
        if dot and (part != "backbone" or not isinstance(getattr(model, "backbone", None), nn.Module)):
            raise DropBlockInjectError(f"{name!r}: only '.backbone' of a detection model can follow the builder")
        return model.backbone if dot else model
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)(**kwargs)
        except (ImportError, AttributeError) as e:
            raise DropBlockInjectError(f"cannot import {name!r}: {e}") from e
    import timm

    if name not in timm.list_models(name) and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise DropBlockInjectError(f"unknown timm model {name!r}; close matches: {close}. torchvision: tv:<name>")
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def _torchvision(builder: str, pretrained: bool, kwargs: dict) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models()
    if builder not in names:
        close = difflib.get_close_matches(builder, names, n=5)
        raise DropBlockInjectError(f"unknown torchvision model {builder!r}; close matches: {close}")
    weights = "DEFAULT" if pretrained else None
    extra = {} if pretrained or "weights_backbone" not in _params(builder) else {"weights_backbone": None}
    return torchvision.models.get_model(builder, weights=weights, **extra, **kwargs)


def _params(builder: str) -> set[str]:
    import inspect

    import torchvision

    return set(inspect.signature(torchvision.models.get_model_builder(builder)).parameters)
