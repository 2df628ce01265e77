"""Stage 1, the other way in: a tape of one forward, for modules that torch.fx cannot trace.

HF encoders take ``**kwargs`` behind decorators, ultralytics loops over an ``nn.Sequential`` in
Python, HF MobileNet calls ``int()`` on shapes: torch.fx gives up on such forwards, but they run.
:func:`record` runs a module once, in eval mode without gradients, on fake tensors at the size of
the analysis (no FLOPs; once on real tensors of the same shapes where fake tensors stop the run
before any call). Hooks on every submodule and a ``TorchFunctionMode`` see each module call, torch
function and Tensor method; each call that returns a tensor is written down with the calls whose
outputs it read, matched by tensor identity (a module is called on the very tensor object that the
previous call returned). Calls are grouped by the module call they ran in (a :class:`Frame`).
Leaves are the tracer's (:class:`~dropblock_inject.pipeline.trace.SurgeryTracer`): nothing inside
them is written down. Containers (``Sequential``, ``ModuleList``) are transparent, so the members of
a list that Python loops over appear in the frame of the module that loops.

:func:`frame_graph` turns a frame into an ``fx.Graph`` shaped like a trace (``call_module``,
``call_function``, ``call_method`` nodes, ``getitem`` for the parts of a tuple, every value in
``node.meta["val"]``), so the analysis applies the same site rules to it. The module keeps every
attribute, buffer and hook it had: what the run cached on it (ultralytics' anchors, HF's output
hooks) is undone.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

from dropblock_inject.pipeline.trace import LeafSpec, SurgeryTracer

__all__ = ["Call", "Frame", "Tape", "TapeGraph", "frame_graph", "record"]

# Normalisations: on fake tensors the recorder returns a new tensor of the input's shape instead of running them.
_NORMS = {F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, torch.batch_norm, torch.layer_norm,
          torch.group_norm, torch.instance_norm}  # fmt: skip
# Tensor methods that a trace records as the operator (``x[i]`` is ``operator.getitem`` there).
_OPERATORS: dict[str, Callable[..., Any]] = {
    "__getitem__": operator.getitem, "__add__": operator.add, "__iadd__": operator.iadd, "__mul__": operator.mul,
}  # fmt: skip


@dataclass
class Call:
    """One call of the run that returned a tensor: a module, a torch function or a Tensor method.

    Attributes:
        op: ``"call_module"``, ``"call_function"`` or ``"call_method"`` (as in a traced graph).
        target: The module's path in the recorded module, the function, or the method's name.
        args: Positional arguments, tensors as they were passed.
        kwargs: Keyword arguments.
        output: What it returned.
        frame: For a module that is neither a leaf nor a container: the calls it made.
    """

    op: str
    target: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any = None
    frame: Frame | None = None


@dataclass
class Frame:
    """The calls one module call made itself (its leaves, the modules it called, its functions)."""

    tape: Tape
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    calls: list[Call] = field(default_factory=list)
    output: Any = None
    stopped: bool = False  # an error ended the call (the frame holds the calls up to it)


@dataclass
class Tape:
    """One recorded run: the module that ran, its path in the model, and its outermost frame."""

    module: nn.Module
    path: str
    root: Frame | None = None
    error: str = ""


class TapeGraph:
    """A frame as a graph, with ``get_submodule`` of the recorded module (what the site rules read)."""

    def __init__(self, graph: fx.Graph, module: nn.Module) -> None:
        self.graph, self.module = graph, module

    def get_submodule(self, target: str) -> nn.Module:
        return self.module.get_submodule(target)


def record(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    fake_mode: FakeTensorMode,
    *,
    path: str = "",
    leaf_modules: Sequence[LeafSpec] = (),
) -> Tape:
    """Run ``module`` once and write down its calls.

    Args:
        module: The module to run (left as it was: attributes, buffers, hooks, training flags).
        args: Its positional inputs (fake tensors of ``fake_mode``, or real ones).
        kwargs: Its keyword inputs.
        fake_mode: The fake-tensor mode of the analysis.
        path: The module's path in the whole model (for leaf patterns and messages).
        leaf_modules: Extra leaves (see :class:`~dropblock_inject.pipeline.trace.SurgeryTracer`).

    Returns:
        A :class:`Tape`; ``tape.root`` is None when the run stopped before it began. A run that
        raises after some submodules ran (a data-dependent op on fake tensors, as in detection
        heads) keeps the calls made so far, and ``tape.error`` says what stopped it; one that
        stops before any submodule runs is run again on real tensors of the same shapes.
    """
    tape = Tape(module, path)
    _run(tape, args, kwargs, fake_mode, leaf_modules)
    if not _recorded(tape) and not any(p.is_meta for p in module.parameters()):
        _run(tape, _to_real(args), _to_real(kwargs), None, leaf_modules)
    return tape


def _recorded(tape: Tape) -> bool:
    """Whether the run reached a submodule (data-dependent Python on fake tensors can stop it before)."""
    return tape.root is not None and any(call.op == "call_module" for call in tape.root.calls)


def _run(
    tape: Tape, args: tuple[Any, ...], kwargs: dict[str, Any], fake_mode: FakeTensorMode | None,
    leaf_modules: Sequence[LeafSpec],
) -> None:  # fmt: skip
    recorder = _Recorder(tape, leaf_modules, fake=fake_mode is not None)
    saved = _ModuleState(tape.module)
    handles = recorder.attach()
    tape.root, tape.error = None, ""
    try:
        with torch.no_grad(), fake_mode or _no_mode(), recorder:
            tape.module.eval()
            tape.module(*args, **kwargs)
    except Exception as e:
        tape.error = f"{type(e).__name__}: {e}"
    finally:
        for handle in handles:
            handle.remove()
        saved.restore()


class _no_mode:  # noqa: N801 - used as a context manager
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class _ModuleState:
    """Every attribute of every submodule, and the contents of their dicts (buffers, hooks), to put back."""

    def __init__(self, module: nn.Module) -> None:
        self.saved = [(m, dict(vars(m))) for m in module.modules()]
        self.dicts = [(d, dict(d)) for _, attrs in self.saved for d in attrs.values() if isinstance(d, dict)]

    def restore(self) -> None:
        for d, contents in self.dicts:
            d.clear()
            d.update(contents)
        for m, attrs in self.saved:
            vars(m).clear()
            vars(m).update(attrs)


class _Recorder(TorchFunctionMode):
    """Hooks and a function mode that write the calls of one run into frames."""

    def __init__(self, tape: Tape, leaf_modules: Sequence[LeafSpec], fake: bool) -> None:
        super().__init__()
        self.tape, self.tracer, self.fake = tape, SurgeryTracer(leaf_modules), fake
        self.paths = {id(m): name for name, m in tape.module.named_modules()}
        self.frames: list[Frame] = []
        # (leaf | container | frame | inside (a leaf), the call, the exception being handled when it began)
        self.stack: list[tuple[str, Call, BaseException | None]] = []
        self.in_leaf = 0

    def attach(self) -> list[Any]:
        handles = []
        for m in self.tape.module.modules():
            handles.append(m.register_forward_pre_hook(self._before, with_kwargs=True))
            handles.append(m.register_forward_hook(self._after, with_kwargs=True, always_call=True))
        return handles

    def _kind(self, module: nn.Module) -> str:
        name = self.paths[id(module)]
        if module is not self.tape.module and self.tracer.is_leaf_module(module, _join(self.tape.path, name)):
            return "leaf"
        forward = getattr(type(module), "forward", None)
        if module is not self.tape.module and forward in (nn.Sequential.forward, nn.Module.forward):
            return "container"
        return "frame"

    def _before(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kind = "inside" if self.in_leaf else self._kind(module)
        call = Call("call_module", self.paths[id(module)], args, dict(kwargs))
        self.in_leaf += kind in ("inside", "leaf")
        if kind == "frame":
            call.frame = Frame(self.tape, args, dict(kwargs))
            if self.frames:
                self._add(call)
            else:
                self.tape.root = call.frame
            self.frames.append(call.frame)
        self.stack.append((kind, call, sys.exc_info()[1]))

    def _after(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        kind, call, handled = self.stack.pop()
        call.output = output
        self.in_leaf -= kind in ("inside", "leaf")
        if kind == "leaf":
            self._add(call)
        elif kind == "frame":
            # After an error, torch runs this hook in its except block: a new exception is the one raised inside.
            raised = sys.exc_info()[1]
            frame = self.frames.pop()
            frame.output, frame.stopped = output, raised is not None and raised is not handled

    def _add(self, call: Call) -> None:
        if self.frames and (call.op == "call_module" or _has_tensor(call.output)):
            self.frames[-1].calls.append(call)

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        # a norm keeps its input's shape, and on fake tensors it costs more than a convolution
        output = torch.empty_like(args[0]) if self.fake and func in _NORMS else func(*args, **kwargs)
        if not self.in_leaf and self.frames:
            op, target = _function_target(func)
            self._add(Call(op, target, args, kwargs, output))
        return output


def _function_target(func: Callable[..., Any]) -> tuple[str, Any]:
    """``("call_method", name)`` for a Tensor method, else ``("call_function", func)``, as a trace names them."""
    name = getattr(func, "__name__", "")
    if name and func in (getattr(torch.Tensor, name, None), getattr(torch._C.TensorBase, name, None)):
        return ("call_function", _OPERATORS[name]) if name in _OPERATORS else ("call_method", name)
    return "call_function", func


def frame_graph(frame: Frame) -> TapeGraph:
    """The frame as an ``fx.Graph``: a placeholder per input tensor, a node per call, edges by tensor identity,
    and an ``output`` node that reads what the module returned.

    A ``call_module`` node of a module with its own frame carries it in ``node.meta["frame"]``.
    """
    graph = fx.Graph()
    producers: dict[int, fx.Node] = {}
    for i, value in enumerate(_tensors((frame.args, frame.kwargs))):
        node = graph.placeholder(f"input_{i}")
        node.meta["val"] = value
        producers[id(value)] = node
    for call in frame.calls:
        args, kwargs = _linked(call.args, producers), _linked(call.kwargs, producers)
        node = graph.create_node(call.op, call.target, args, kwargs)
        node.meta["val"], node.meta["frame"] = call.output, call.frame
        _produce(graph, node, call.output, producers)
    graph.output(_linked(frame.output, producers))
    return TapeGraph(graph, frame.tape.module)


def _produce(graph: fx.Graph, node: fx.Node, output: Any, producers: dict[int, fx.Node]) -> None:
    """Map each output tensor to ``node`` (one tensor) or to a ``getitem`` node per part."""
    if isinstance(output, torch.Tensor):
        producers[id(output)] = node
        return
    for i, value in enumerate(_tensors(output)):
        part = graph.create_node("call_function", operator.getitem, (node, i), {})
        part.meta["val"] = value
        producers[id(value)] = part


def _linked(value: Any, producers: dict[int, fx.Node]) -> Any:
    """``value`` with each tensor that a call of the frame returned replaced by that call's node."""
    if isinstance(value, torch.Tensor):
        return producers.get(id(value), value)
    if isinstance(value, (list, tuple)):
        return type(value)(_linked(v, producers) for v in value) if type(value) in (list, tuple) else value
    if isinstance(value, dict):
        return {k: _linked(v, producers) for k, v in value.items()}
    return value


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in ``value`` (nested lists, tuples and dicts, HF model outputs included), in order."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _has_tensor(value: Any) -> bool:
    return next(_tensors(value), None) is not None


def _to_real(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        make = torch.randn if value.is_floating_point() else torch.zeros
        return make(value.shape, dtype=value.dtype, device=value.device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_real(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_real(v) for k, v in value.items()}
    return value


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name
