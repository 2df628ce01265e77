"""Stage 2, analyse: feature sizes by fake-tensor propagation, and every candidate site.

A candidate site is a convolution whose output reaches an activation through per-channel or
norm layers only (``conv -> [norm | identity slot | DropBlock]* -> activation``), each link the
only user of the previous one. The DropBlock goes right before the activation: it becomes a
forward hook on the last module of the chain, or fills an identity slot (timm's ResNet
``drop_block``, the ``.drop`` of timm's fused ``BatchNormAct2d``).

No real FLOPs run: shapes come from ``FakeTensorMode``, so a model built on ``device="meta"``
works too. torch.fx is the first way in. Where a forward cannot be traced (torchvision detection,
HF encoders, ultralytics' Python loop over its layers, HF MobileNet's ``int()`` on shapes), the
module runs once on fake tensors with every call written down (:mod:`~dropblock_inject.pipeline.tape`),
and its frame of that run is read as a graph by the same site rules: the modules it calls that
trace are analysed as traced graphs, those that do not through their own frames of the same run.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import operator
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from dropblock_inject.errors import TraceError
from dropblock_inject.pipeline.layers import (
    activation_name,
    fused_has_activation,
    is_attention,
    is_channel_split,
    is_conv,
    is_dropblock,
    is_fused_norm_act,
    is_norm,
    is_residual_merge,
    is_slot,
)
from dropblock_inject.pipeline.markers import hosted_dropblock, is_injected
from dropblock_inject.pipeline.tape import Frame, TapeGraph, frame_graph, record
from dropblock_inject.pipeline.trace import LeafSpec, describe_target, node_module, trace

__all__ = ["Analysis", "Candidate", "Kind", "Rejected", "Role", "analyse", "input_size_of"]

_Graph = fx.GraphModule | TapeGraph  # a traced graph, or a frame of a recorded run
Kind = Literal["hook", "slot", "fused"]  # how a DropBlock is attached (see Candidate.host)
Role = Literal["main", "branch", "shortcut"]  # where the conv sits relative to a residual sum


@dataclass
class Candidate:
    """A place where DropBlock can go (or already is).

    Attributes:
        conv: Path of the convolution.
        norm: Path of the last norm of the chain, or None.
        act: The activation: a module path or a function name.
        host: Where the DropBlock goes: the module to hook, the identity slot to fill, or the
            fused norm-act module whose ``.drop`` to fill.
        kind: ``"hook"``, ``"slot"`` or ``"fused"``.
        call: Which call of the activation module this is (torchvision's ResNets call one ``relu``
            module at several places); 0 for activation functions.
        feature: Spatial size of the convolution's output.
        channels: Channels of the convolution's output.
        stride: Input size / feature size (first spatial dimension).
        dilation: The convolution's dilation, None for 1x1 convolutions (they inherit their stage's).
        existing: ``"ours"`` / a class name when a DropBlock already sits there, else None.
        order: Execution order among all candidates.
        role: ``"main"`` (conv -> norm -> act), or for conv -> norm -> add -> act: ``"branch"``
            (the residual branch's last conv, or parallel branches as in RepVGG) or ``"shortcut"``
            (a projection shortcut).
        channel_dim: 1 for ``(N, C, *spatial)`` outputs; -1 for the ``(N, *spatial, C)`` output of a
            ``Linear`` over the channels of a channels-last map (ConvNeXt's ``fc1``).
    """

    conv: str
    norm: str | None
    act: str
    host: str
    kind: Kind
    call: int
    feature: tuple[int, ...]
    channels: int
    stride: int
    dilation: int | None
    existing: Literal["ours"] | str | None = None
    order: int = 0
    role: Role = "main"
    channel_dim: Literal[1, -1] = 1


@dataclass
class Rejected:
    """A convolution output that is not a site, with the reason."""

    conv: str
    reason: str


@dataclass
class Analysis:
    """What :func:`analyse` found."""

    candidates: list[Candidate] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    roots: list[str] = field(default_factory=list)
    opaque: list[str] = field(default_factory=list)
    recorded: list[str] = field(default_factory=list)
    input_spatial: tuple[int, ...] = ()
    model_convs: int = 0
    model_attention: int = 0


class FakeShapeProp(fx.Interpreter):
    """Run a graph on fake tensors, keeping every node's fake value in ``node.meta["val"]``.

    Norms, activations and slots keep the shape of their input, so they are skipped (fake
    batch norm in training mode costs more than the whole rest of a ResNet).
    """

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        module = self.fetch_attr(target)
        if len(args) == 1 and isinstance(args[0], torch.Tensor) and _keeps_shape(module):
            return args[0]
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:
            raise TraceError(f"shape propagation failed at node {n.format_node()}: {type(e).__name__}: {e}") from e
        n.meta["val"] = result
        return result


def analyse(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    *,
    example_kwargs: dict[str, Any] | None = None,
    leaf_modules: Sequence[LeafSpec] = (),
) -> Analysis:
    """Find every candidate site of ``model`` at the size of ``example_inputs``.

    Args:
        model: The model (not modified; its train/eval mode is restored).
        example_inputs: Positional inputs; tensors are replaced by fake tensors of the same shape.
        example_kwargs: Keyword inputs (``{"pixel_values": x}``), treated the same way.
        leaf_modules: Extra leaves for the tracer.

    Returns:
        An :class:`Analysis`, candidates in execution order.
    """
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    args = tuple(_to_fake(fake_mode, a) for a in example_inputs)
    kwargs = {k: _to_fake(fake_mode, v) for k, v in (example_kwargs or {}).items()}
    result = Analysis(input_spatial=input_size_of(example_inputs, example_kwargs or {})[1:])
    result.model_convs = sum(1 for m in model.modules() if is_conv(m))
    result.model_attention = sum(1 for m in model.modules() if is_attention(m))
    with _quiet():
        _analyse_module(model, "", _Inputs(args, kwargs), _Context(fake_mode, leaf_modules, result, model))
    for i, c in enumerate(result.candidates):
        c.order = i
    return result


def input_size_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, ...]:
    """The size of one input, ``(C, H, W)`` or ``(C, D, H, W)``: of the first tensor (a batch), or of the
    first image of a list of images (torchvision detection); ``()`` without a tensor."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return tuple(value.shape[1:])
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            return tuple(value[0].shape)
    return ()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep torch's logs and warnings about the model's code off stderr while it is analysed.

    Tracing and fake-tensor runs hit ops that the analysis expects to fail (it then descends into
    the submodules); torch logs each such failure with a traceback (thousands of lines for LeViT)
    and warns about the model's Python. A real failure still surfaces, as one ``TraceError``.
    """
    loggers = [logging.getLogger("torch")]
    loggers += [lg for name, lg in logging.Logger.manager.loggerDict.items()
                if name.startswith("torch.") and isinstance(lg, logging.Logger)]  # fmt: skip
    saved = [(lg, lg.disabled) for lg in loggers]
    try:
        for lg in loggers:
            lg.disabled = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, disabled in saved:
            lg.disabled = disabled


def _to_fake(fake_mode: FakeTensorMode, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return fake_mode.from_tensor(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_fake(fake_mode, v) for v in value)
    if isinstance(value, dict):
        return {k: _to_fake(fake_mode, v) for k, v in value.items()}
    return value


@dataclass
class _Inputs:
    """A module's inputs: positional and keyword."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def positional(self, module: nn.Module) -> tuple[Any, ...] | None:
        """The inputs as ``forward``'s leading positional parameters, or None when the keywords name others."""
        if not self.kwargs:
            return self.args
        try:
            params = list(inspect.signature(module.forward).parameters.values())
        except (TypeError, ValueError):
            return None
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        names = [p.name for p in params if p.kind in kinds][len(self.args) : len(self.args) + len(self.kwargs)]
        if set(names) != set(self.kwargs):
            return None
        return self.args + tuple(self.kwargs[n] for n in names)


@dataclass
class _Context:
    """What every step of one analysis shares."""

    fake_mode: FakeTensorMode
    leaf_modules: Sequence[LeafSpec]
    result: Analysis
    root: nn.Module


def _analyse_module(module: nn.Module, path: str, inputs: _Inputs, ctx: _Context, frame: Frame | None = None) -> None:
    """Trace and propagate ``module``; where torch.fx fails, read its frame of a recorded run instead."""
    if is_conv(module):
        ctx.result.rejected.append(
            Rejected(path, "called directly by an untraceable parent (its chain is not followed)")
        )
        return
    gm = _traced(module, path, inputs, ctx)
    if gm is None:
        _analyse_run(module, path, inputs, ctx, frame)
        return
    ctx.result.roots.append(path or "<model>")
    _find_sites(gm, path, ctx)


def _traced(module: nn.Module, path: str, inputs: _Inputs, ctx: _Context) -> fx.GraphModule | None:
    """``module`` traced, every node's fake value in ``node.meta["val"]``; None where torch.fx cannot."""
    args = inputs.positional(module)
    if args is None:
        return None
    try:
        gm = trace(module, leaf_modules=ctx.leaf_modules, path=path, num_inputs=len(args))
        with ctx.fake_mode, _training_as(module, module.training):
            FakeShapeProp(gm).run(*args)
    except TraceError:
        return None
    return gm


def _analyse_run(module: nn.Module, path: str, inputs: _Inputs, ctx: _Context, frame: Frame | None) -> None:
    """Find the sites in what ``module`` called in one run: its frame of the run that called it, else (none, or
    one that an error cut short) a run of its own."""
    if frame is None or frame.stopped:
        frame = record(module, inputs.args, inputs.kwargs, ctx.fake_mode, path=path, leaf_modules=ctx.leaf_modules).root
    if frame is None or not frame.calls:
        ctx.result.opaque.append(path or "<model>")
        return
    ctx.result.recorded.append(path or "<model>")
    _find_sites(frame_graph(frame), frame.tape.path, ctx)


class _training_as:  # noqa: N801 - used as a context manager
    """Temporarily set a module tree's training flag; restores every submodule's own flag."""

    def __init__(self, module: nn.Module, training: bool) -> None:
        self.module, self.training = module, training

    def __enter__(self) -> None:
        self.saved = [(m, m.training) for m in self.module.modules()]
        self.module.train(self.training)

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.saved:
            m.training = flag


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _find_sites(gm: _Graph, path: str, ctx: _Context) -> None:
    """Walk the graph in execution order: conv chains, and opaque leaves that hide convolutions."""
    calls_seen: dict[str, int] = {}
    for node in gm.graph.nodes:
        module = node_module(gm, node)
        if module is None:
            continue
        node.meta["call_index"] = calls_seen.get(str(node.target), 0)
        calls_seen[str(node.target)] = node.meta["call_index"] + 1
    for node in gm.graph.nodes:
        module = node_module(gm, node)
        if module is None:
            continue
        if is_conv(module) and "val" in node.meta:
            _follow_chain(gm, node, module, path, ctx.result, ctx.root)
        elif _is_channels_last_pointwise(module, node, _join(path, str(node.target)), ctx.root):
            _follow_chain(gm, node, module, path, ctx.result, ctx.root, channel_dim=-1)
        elif _hides_convs(module) and node.meta["call_index"] == 0:
            inputs = _Inputs(*fx.map_arg((node.args, node.kwargs), lambda a: a.meta.get("val")))
            inputs = _Inputs(_to_fake(ctx.fake_mode, inputs.args), _to_fake(ctx.fake_mode, inputs.kwargs))
            _analyse_module(module, _join(path, str(node.target)), inputs, ctx, node.meta.get("frame"))


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)  # a stage's list of blocks is not a block


def _is_channels_last_pointwise(module: nn.Module, node: fx.Node, module_path: str, root: nn.Module) -> bool:
    """A ``Linear`` over the channels of an ``(N, *spatial, C)`` map inside a convolutional block.

    ConvNeXt, ConvNeXt V2, EdgeNeXt and MambaOut run their MLPs as ``Linear`` layers on a
    channels-last map: ``fc1`` is a pointwise convolution in all but name. Its block (the parent,
    or a grandparent that is not a container of blocks nor the model) must hold a spatial
    convolution, so a transformer's MLP on a token grid (Swin) is not taken for one.
    """
    val = node.meta.get("val")
    if not isinstance(module, nn.Linear) or not isinstance(val, torch.Tensor) or val.dim() not in (4, 5):
        return False
    parent = module_path.rpartition(".")[0]
    grandparent = parent.rpartition(".")[0]
    blocks = [root.get_submodule(parent)] if parent else []
    if grandparent and not isinstance(root.get_submodule(grandparent), _CONTAINERS):
        blocks.append(root.get_submodule(grandparent))
    return any(_holds_spatial_conv(b) for b in blocks)


def _holds_spatial_conv(module: nn.Module) -> bool:
    return any(is_conv(m) and max(_tuple(m.kernel_size)) > 1 for m in module.modules())


def _tuple(value: int | tuple[int, ...]) -> tuple[int, ...]:
    return value if isinstance(value, tuple) else (value,)


def _keeps_shape(module: nn.Module) -> bool:
    if is_norm(module) or is_fused_norm_act(module) or is_slot(module):
        return True
    return activation_name("call_module", None, module) is not None


def _hides_convs(module: nn.Module) -> bool:
    if is_conv(module) or is_norm(module) or is_fused_norm_act(module) or is_dropblock(module):
        return False
    return any(is_conv(m) for m in module.modules())


@dataclass
class _Chain:
    """The state of one walk from a convolution towards its activation."""

    node: fx.Node
    conv: nn.Module
    conv_path: str
    host: str
    kind: Kind = "hook"
    norm: str | None = None
    existing: str | None = None
    role: Role = "main"
    channel_dim: Literal[1, -1] = 1


def _follow_chain(
    gm: _Graph,
    conv_node: fx.Node,
    conv: nn.Module,
    path: str,
    result: Analysis,
    root: nn.Module,
    channel_dim: Literal[1, -1] = 1,
) -> None:
    """From a convolution, follow single-user norm/slot links (and residual sums) to an activation."""
    conv_path = _join(path, str(conv_node.target))
    chain = _Chain(conv_node, conv, conv_path, host=conv_path, channel_dim=channel_dim)
    node = conv_node
    while True:
        users = list(node.users)
        if len(users) != 1:
            reason = "output unused" if not users else f"output has {len(users)} users (fan-out)"
            result.rejected.append(Rejected(conv_path, reason))
            return
        user = users[0]
        module = node_module(gm, user)
        target_path = _join(path, str(user.target)) if module is not None else None
        if module is not None and is_fused_norm_act(module) and chain.role == "main":
            chain.norm = target_path
            if fused_has_activation(module):
                chain.existing = _existing(module.drop) or chain.existing
                chain.host, chain.kind = target_path, "fused"
                return _accept(result, chain, f"{target_path}.act", 0, root)
            chain.host, chain.kind = target_path, "hook"
        elif module is not None and is_dropblock(module) and chain.role == "main":
            chain.existing, chain.host, chain.kind = _existing(module), target_path, "slot"
        elif module is not None and is_slot(module) and chain.role == "main":
            chain.host, chain.kind = target_path, "slot"
        elif module is not None and is_norm(module) and chain.role == "main":
            chain.norm, chain.host, chain.kind = target_path, target_path, "hook"
        elif module is not None and is_slot(module) and not is_dropblock(module):
            pass  # an identity after a residual sum (timm's drop_path / attn placeholders)
        elif is_residual_merge(user.op, user.target):
            if chain.role == "main":
                chain.role = _residual_role(gm, conv_node, node, user)
        elif chain.role == "main" and is_channel_split(user, chain.node.meta["val"].dim(), chain.channel_dim):
            # A gated block (MambaOut: fc1 -> split -> act(g) * (i, conv(c))): the DropBlock goes on the
            # whole output before the split, the site's activation is the one part that has one.
            acts = _split_activations(gm, user, path)
            if len(acts) != 1:
                result.rejected.append(Rejected(conv_path, f"split into {len(acts)} activated parts, not one"))
                return
            return _accept(result, chain, *acts[0], root)
        else:
            act = activation_name(user.op, user.target, module)
            if act is not None and chain.norm is None and _feeds_norm(gm, user):
                result.rejected.append(Rejected(conv_path, "conv -> act -> norm (the norm comes after the activation)"))
                return
            if act is not None and (chain.role == "main" or chain.kind == "hook"):
                return _accept(result, chain, target_path or act, user.meta.get("call_index", 0), root)
            what = "a residual add" if chain.role != "main" else describe_target(user, module)
            result.rejected.append(Rejected(conv_path, f"goes to {what}, not an activation"))
            return
        node = user


def _split_activations(gm: _Graph, split: fx.Node, path: str) -> list[tuple[str, int]]:
    """The activations that the parts of a channel split feed directly (``getitem -> act``)."""
    acts = []
    for part in split.users:
        users = list(part.users)
        if part.op != "call_function" or part.target is not operator.getitem or len(users) != 1:
            continue
        module = node_module(gm, users[0])
        act = activation_name(users[0].op, users[0].target, module)
        if act is not None:
            where = _join(path, str(users[0].target)) if module is not None else act
            acts.append((where, users[0].meta.get("call_index", 0)))
    return acts


def _residual_role(gm: _Graph, conv_node: fx.Node, operand: fx.Node, add: fx.Node) -> Role:
    """``"shortcut"`` for a projection shortcut, ``"branch"`` for the residual branch's last conv.

    The shortcut's convolution reads the block input that the other operand of the sum was
    computed from through more layers; parallel branches (RepVGG) read the same input.
    """
    others = [a for a in add.all_input_nodes if a is not operand]
    source = conv_node.args[0] if conv_node.args and isinstance(conv_node.args[0], fx.Node) else None
    if source is None or not others:
        return "branch"
    other = others[0]
    if _conv_input(gm, other) is source:
        return "branch"
    return "shortcut" if _is_ancestor(source, other) else "branch"


def _conv_input(gm: _Graph, node: fx.Node) -> fx.Node | None:
    """The input of the convolution that ``node`` comes from through single-input layers, if any."""
    for _ in range(8):
        module = node_module(gm, node)
        if module is not None and is_conv(module):
            return node.args[0] if isinstance(node.args[0], fx.Node) else None
        inputs = node.all_input_nodes
        if len(inputs) != 1:
            return None
        node = inputs[0]
    return None


def _is_ancestor(candidate: fx.Node, node: fx.Node) -> bool:
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current is candidate:
            return True
        for parent in current.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return False


def _feeds_norm(gm: _Graph, node: fx.Node) -> bool:
    users = list(node.users)
    module = node_module(gm, users[0]) if len(users) == 1 else None
    return module is not None and (is_norm(module) or is_fused_norm_act(module))


def _existing(module: nn.Module) -> str | None:
    if not is_dropblock(module):
        return None
    return "ours" if is_injected(module) else type(module).__name__


def _accept(result: Analysis, chain: _Chain, act: str, call: int, root: nn.Module) -> None:
    val = chain.node.meta["val"]
    spatial_shape = val.shape[2:] if chain.channel_dim == 1 else val.shape[1:-1]
    feature = tuple(int(s) for s in spatial_shape)
    if all(s == 1 for s in feature):
        result.rejected.append(Rejected(chain.conv_path, "1x1 feature map (a pooled gate or head)"))
        return
    spatial = result.input_spatial
    stride = max(1, round(spatial[0] / feature[0])) if spatial and feature and feature[0] else 1
    conv = chain.conv
    pointwise = not is_conv(conv) or max(_tuple(conv.kernel_size)) == 1
    dilation = None if pointwise else int(conv.dilation[0])
    existing = chain.existing
    if chain.kind == "hook" and existing is None and hosted_dropblock(root.get_submodule(chain.host)) is not None:
        existing = "ours"
    channels = int(val.shape[chain.channel_dim])
    fields = (chain.conv_path, chain.norm, act, chain.host, chain.kind, call, feature, channels, stride)
    result.candidates.append(Candidate(*fields, dilation, existing, role=chain.role, channel_dim=chain.channel_dim))
