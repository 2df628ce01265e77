"""Stage 1, trace: a torch.fx tracer that keeps convolutions, norms and activations as single nodes.

The graphs it produces are only *read* (to find sites and feature sizes); the model is never
replaced by a GraphModule, so a training flag baked into a graph by tracing is harmless here.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Sequence
from typing import Any

import torch.fx as fx
from torch import nn

from dropblock_inject.errors import TraceError
from dropblock_inject.pipeline.layers import (
    activation_name,
    autowrap_functions,
    is_conv,
    is_dropblock,
    is_fused_norm_act,
    is_norm,
    leaf_module_types,
)

__all__ = ["LeafSpec", "SurgeryTracer", "trace"]

LeafSpec = type[nn.Module] | str  # a module class, or an fnmatch pattern over module paths


class SurgeryTracer(fx.Tracer):
    """An ``fx.Tracer`` whose leaves are the layers a site is made of, plus registered no-trace modules.

    Leaves: everything ``torch.nn`` defines, convolutions, norms (``FrozenBatchNorm2d``, timm's
    ``LayerNorm2d`` ...), timm's fused norm-act modules, activations, DropBlocks, timm's registered
    no-trace modules (read when the tracer is made, so late registrations count) and the user's
    ``leaf_modules`` (classes, or fnmatch patterns over module paths).

    Args:
        leaf_modules: Extra leaves: module classes or module-path patterns.
    """

    def __init__(self, leaf_modules: Sequence[LeafSpec] = ()) -> None:
        super().__init__(autowrap_functions=autowrap_functions(), param_shapes_constant=True)
        self._leaf_types = leaf_module_types() + tuple(s for s in leaf_modules if isinstance(s, type))
        self._leaf_patterns = tuple(s for s in leaf_modules if isinstance(s, str))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_conv(m) or is_norm(m) or is_fused_norm_act(m) or is_dropblock(m):
            return True
        if activation_name("call_module", None, m) is not None or isinstance(m, self._leaf_types):
            return True
        if any(fnmatch.fnmatchcase(module_qualified_name, p) for p in self._leaf_patterns):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(
    module: nn.Module, *, leaf_modules: Sequence[LeafSpec] = (), path: str = "", num_inputs: int | None = None
) -> fx.GraphModule:
    """Trace ``module`` into a GraphModule for analysis (the module itself is left untouched).

    Args:
        module: The module to trace.
        leaf_modules: Extra leaves (see :class:`SurgeryTracer`).
        path: The module's path in the whole model, for error messages.
        num_inputs: How many positional inputs the caller passes; the other ``forward``
            parameters that have defaults are traced with those defaults (so ``mask=None`` is
            ``None``, not a proxy that takes the ``is not None`` branch).

    Raises:
        TraceError: Tracing failed; the message names the module and what to pass.

    Example:
        >>> gm = trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'call_module', 'call_module', 'call_module', 'output']
    """
    tracer = SurgeryTracer(leaf_modules)
    try:
        graph = tracer.trace(module, concrete_args=_defaults_after(module, num_inputs))
    except Exception as e:
        where = path or type(module).__name__
        raise TraceError(
            f"could not trace {where} ({type(module).__name__}): {type(e).__name__}: {e}. "
            f"Pass leaf_modules=[...] with the untraceable submodule's class or path to keep it opaque."
        ) from e
    return fx.GraphModule(tracer.root, graph, class_name=type(module).__name__)


def _defaults_after(module: nn.Module, num_inputs: int | None) -> dict[str, Any] | None:
    """The defaults of ``forward``'s parameters past the first ``num_inputs`` positional ones."""
    if num_inputs is None:
        return None
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    rest = positional[num_inputs:]
    if not rest or any(p.default is inspect.Parameter.empty for p in rest):
        return None
    return {p.name: p.default for p in rest}


def node_module(gm: fx.GraphModule | Any, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls, else None (``gm``: anything with ``get_submodule``)."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def describe_target(node: fx.Node, module: Any) -> str:
    """A short human name for what a node does (``BatchNorm2d``, ``add``, ``cat``)."""
    if module is not None:
        return type(module).__name__
    return getattr(node.target, "__name__", str(node.target))
