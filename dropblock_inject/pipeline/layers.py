"""What the pipeline knows about layer types: convolutions, norms, activations, identity slots.

Only generic layer kinds live here (``BatchNorm2d``, timm's fused ``BatchNormAct2d``, ``F.relu``);
per-architecture knowledge belongs in ``recipes/``.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dropblock_inject.op.module import DropBlock

__all__ = [
    "activation_name",
    "is_attention",
    "is_channel_split",
    "is_conv",
    "is_fused_norm_act",
    "is_norm",
    "is_slot",
    "leaf_module_types",
]

_ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.RReLU, nn.Softplus, nn.Tanh,
)  # fmt: skip
_ACTIVATION_FUNCTIONS: set[Callable[..., Any]] = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.leaky_relu_, F.elu, F.elu_, F.selu,
    F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.softplus, torch.tanh, F.rrelu, F.prelu,
}  # fmt: skip
_ACTIVATION_METHODS = {"relu", "relu_", "tanh", "tanh_"}
_ACTIVATION_CLASS_NAMES = {"Swish", "SwishMe", "Mish", "MishMe", "HardSwish", "HardSwishMe", "GELU", "GELUTanh",
                           "QuickGELU", "PReLU", "Tanh", "ReLU6", "StarReLU", "SquaredReLU"}  # fmt: skip
_GATE_CLASS_NAMES = {"Sigmoid", "HardSigmoid", "HardSigmoidMe", "GateSigmoid"}
# Libraries whose activation modules are recognised by where they come from (timm's, HF transformers'
# ACT2FN classes such as GELUActivation), except gates and identities.
_ACTIVATION_PACKAGES = ("timm.layers.activations", "transformers.activations")
_GATE_OR_IDENTITY = re.compile("sigmoid|linear|identity")


def is_conv(module: nn.Module) -> bool:
    """A spatial convolution (``Conv2d``/``Conv3d`` and subclasses such as timm's ``Conv2dSame``)."""
    return isinstance(module, (nn.Conv2d, nn.Conv3d))


def is_attention(module: nn.Module) -> bool:
    """An attention layer (``nn.MultiheadAttention``, or a class named ``*Attention*``): a transformer block's."""
    return isinstance(module, nn.MultiheadAttention) or "attention" in type(module).__name__.lower()


def is_norm(module: nn.Module) -> bool:
    """A per-channel or normalisation layer that may sit between a convolution and its activation."""
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)):
        return True
    named_like_one = "norm" in type(module).__name__.lower()
    return named_like_one and not is_fused_norm_act(module) and not _has_conv(module) and not _has_linear(module)


def is_fused_norm_act(module: nn.Module) -> bool:
    """timm's fused norm + activation leaves (``BatchNormAct2d``, ``GroupNormAct``, ``LayerNormAct2d``,
    ``FrozenBatchNormAct2d``): a norm with ``.act`` and an identity-slot ``.drop`` child.

    Recognised as a norm by class, not by the attribute names alone: a timm MLP also has ``act``
    and ``drop`` children.
    """
    norm_like = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) or (
        "NormAct" in type(module).__name__
    )
    return (
        norm_like
        and isinstance(getattr(module, "drop", None), nn.Module)
        and isinstance(getattr(module, "act", None), nn.Module)
    )


def fused_has_activation(module: nn.Module) -> bool:
    """A fused norm-act whose activation is real (``apply_act=False`` leaves an ``Identity``)."""
    return not isinstance(module.act, nn.Identity)


def is_slot(module: nn.Module) -> bool:
    """An identity-like placeholder or an existing DropBlock between norm and activation."""
    if isinstance(module, (nn.Identity, DropBlock)):
        return True
    return type(module).__name__ in {"DropBlock2d", "DropBlock3d"}


def is_dropblock(module: nn.Module) -> bool:
    """Ours or another library's DropBlock."""
    return isinstance(module, DropBlock) or type(module).__name__ in {"DropBlock2d", "DropBlock3d"}


def activation_name(node_op: str, target: Any, module: nn.Module | None) -> str | None:
    """The activation's name when a graph node is an activation, else None (gates are not)."""
    if node_op == "call_module" and module is not None:
        name = type(module).__name__
        if name in _GATE_CLASS_NAMES:
            return None
        if isinstance(module, _ACTIVATION_MODULES) or name in _ACTIVATION_CLASS_NAMES:
            return name
        if type(module).__module__.startswith(_ACTIVATION_PACKAGES) and not _GATE_OR_IDENTITY.search(name.lower()):
            return name
        return None
    if node_op == "call_function":
        if target in _ACTIVATION_FUNCTIONS:
            return getattr(target, "__name__", str(target))
        module_name = getattr(target, "__module__", "") or ""
        fn_name = getattr(target, "__name__", "")
        if module_name.startswith("timm.layers.activations") and "sigmoid" not in fn_name:
            return fn_name
        return None
    if node_op == "call_method" and target in _ACTIVATION_METHODS:
        return str(target)
    return None


def is_residual_merge(node_op: str, target: Any) -> bool:
    """An elementwise add (a residual sum)."""
    return (node_op == "call_function" and target in {operator.add, operator.iadd, torch.add}) or (
        node_op == "call_method" and target in {"add", "add_"}
    )


def is_channel_split(node: Any, ndim: int, channel_dim: int) -> bool:
    """``torch.split`` / ``chunk`` (function or method) of a map along its channel dimension."""
    function = node.op == "call_function" and node.target in {torch.split, torch.chunk, torch.tensor_split}
    method = node.op == "call_method" and node.target in {"split", "chunk", "tensor_split"}
    if not (function or method):
        return False
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
    return isinstance(dim, int) and dim % ndim == channel_dim % ndim


def _has_conv(module: nn.Module) -> bool:
    return any(is_conv(m) for m in module.modules())


def _has_linear(module: nn.Module) -> bool:
    """Holds a ``Linear`` (an MLP named after its norm, such as timm's ``GlobalResponseNormMlp``)."""
    return any(isinstance(m, nn.Linear) for m in module.modules())


def leaf_module_types() -> tuple[type[nn.Module], ...]:
    """Module types traced as single nodes besides ``torch.nn``'s (read at call time)."""
    types: list[type[nn.Module]] = [DropBlock]
    try:
        from timm.layers import get_notrace_modules

        types.extend(get_notrace_modules())
    except ImportError:  # pragma: no cover - timm is a dependency
        pass
    try:
        from torchvision.ops import DropBlock2d, DropBlock3d, FrozenBatchNorm2d, StochasticDepth

        types.extend([FrozenBatchNorm2d, StochasticDepth, DropBlock2d, DropBlock3d])
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def autowrap_functions() -> tuple[Callable[..., Any], ...]:
    """Functions kept as single call nodes (timm's registered no-trace functions)."""
    try:
        from timm.layers import get_notrace_functions

        return tuple(get_notrace_functions())
    except ImportError:  # pragma: no cover
        return ()
