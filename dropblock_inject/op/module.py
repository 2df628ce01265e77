"""``DropBlock``: the ``nn.Module`` around :func:`~dropblock_inject.op.functional.drop_block`."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from dropblock_inject.op.functional import (
    BlockSize,
    _as_block_tuple,
    _block_for,
    drop_block_eager,
    drop_block_traceable,
    validate_args,
)
from dropblock_inject.op.geometry import BlockGeometry, block_geometry

__all__ = ["DropBlock", "traced_drop_block"]


@fx.wrap
def traced_drop_block(
    x: torch.Tensor,
    factor: torch.Tensor | float,
    target_rate: float,
    block_size: tuple[int, ...],
    shared_channels: bool,
    gamma: str,
    seed_region: str,
    training: bool,
    channel_dim: int = 1,
) -> torch.Tensor:
    """What a traced root :class:`DropBlock` calls: DropBlock at ``target_rate * factor`` when ``training``.

    A ``torch.fx`` leaf (like torchvision's ``drop_block2d``), so a graph that holds it can be
    traced again.
    """
    rate = target_rate * float(factor)
    if not training or rate <= 0.0:
        return x
    nc = x.movedim(-1, 1) if channel_dim != 1 else x
    geom = block_geometry(tuple(nc.shape[2:]), _block_for(nc, block_size), seed_region)
    out = drop_block_eager(nc, rate, geom, shared_channels, gamma, None, False)
    return out.movedim(1, -1) if channel_dim != 1 else out


class DropBlock(nn.Module):
    """DropBlock for ``(N, C, H, W)`` and ``(N, C, D, H, W)`` inputs; identity in eval.

    ``drop_prob`` is the target rate. A schedule (:class:`~dropblock_inject.DropBlockSchedule`)
    ramps it through ``factor``, a non-persistent 0-d buffer: the module drops
    ``drop_prob * gamma_scale * factor``. Changing ``factor`` adds no ``state_dict`` key and does
    not make a compiled model recompile. :meth:`set_factor` (what the schedule calls) also keeps
    a host copy, so an eager call on a CUDA model never waits to read the buffer; a buffer
    changed in place otherwise is read back once, at the next call.

    Args:
        drop_prob: Target fraction of dropped units, in ``[0, 1]``.
        block_size: Block side or one size per spatial dimension; clipped to the feature size.
        gamma_scale: Multiplies the rate (e.g. 0.25 for ResNet group 3 in the TF reference).
        shared_channels: One mask per sample shared by all channels (not the paper's default).
        gamma: ``"paper"`` (Eq. 1) or ``"calibrated"`` (exact expected drop rate).
        seed_region: ``"valid"`` (the paper) or ``"full"``.
        inplace: Modify the input in place.
        channel_dim: ``1`` for ``(N, C, *spatial)`` inputs, ``-1`` for channels-last
            ``(N, *spatial, C)`` ones (ConvNeXt's MLP); the op runs on the ``(N, C, *spatial)``
            view of the same memory.

    Shape:
        Input ``(N, C, *spatial)`` (or ``(N, *spatial, C)`` with ``channel_dim=-1``) with 2 or 3
        spatial dimensions; output the same.

    Example:
        >>> m = DropBlock(drop_prob=0.1, block_size=7)
        >>> m(torch.randn(2, 8, 14, 14)).shape
        torch.Size([2, 8, 14, 14])
        >>> x = torch.randn(2, 8, 14, 14)
        >>> m.eval()(x) is x
        True
    """

    factor: torch.Tensor
    injected: bool = False  # set by ``inject`` on the modules it inserts (``strip`` removes only those)
    channel_dim: int = 1  # class default: modules pickled before the option existed

    def __init__(
        self,
        drop_prob: float = 0.1,
        block_size: BlockSize = 7,
        *,
        gamma_scale: float = 1.0,
        shared_channels: bool = False,
        gamma: str = "paper",
        seed_region: str = "valid",
        inplace: bool = False,
        channel_dim: int = 1,
    ) -> None:
        super().__init__()
        validate_args(drop_prob, block_size, gamma_scale, gamma, seed_region)
        if channel_dim not in (1, -1) or isinstance(channel_dim, bool):
            raise ValueError(f"channel_dim must be 1 (N, C, H, W) or -1 (N, H, W, C), got {channel_dim!r}")
        self.drop_prob = float(drop_prob)
        self.block_size = block_size
        self.gamma_scale = float(gamma_scale)
        self.shared_channels = bool(shared_channels)
        self.gamma = gamma
        self.seed_region = seed_region
        self.inplace = bool(inplace)
        self.channel_dim = channel_dim
        self.register_buffer("factor", torch.ones((), dtype=torch.float32), persistent=False)
        self._factor_host: tuple[torch.Tensor, int, float] | None = None
        self._last_geometry: tuple[tuple, BlockGeometry] | None = None  # (key, geometry) of the last eager call

    @property
    def block_size(self) -> tuple[int, ...]:
        """The block: one side for every spatial dimension, or one per dimension (clipped to the map
        at run time). Set it to an int or a tuple; it reads back as a tuple."""
        return self._block_size

    @block_size.setter
    def block_size(self, value: BlockSize) -> None:
        self._block_size = _as_block_tuple(value)

    def __setstate__(self, state: dict) -> None:
        if "block_size" in state:  # pickled before block_size became a property
            state["_block_size"] = _as_block_tuple(state.pop("block_size"))
        super().__setstate__(state)

    def set_factor(self, value: float) -> None:
        """Set the schedule's ``factor`` (the buffer, and a host copy that spares a device sync per call)."""
        self.factor.fill_(value)
        self._factor_host = (self.factor, self.factor._version, float(value))

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_factor_host"] = None  # a copy's buffer starts its own version count
        return state

    @property
    def factor_value(self) -> float:
        """``factor`` as a Python float; read from the device only when the buffer changed outside
        :meth:`set_factor` (a CUDA buffer read would stall the stream at every call)."""
        host = self.__dict__.get("_factor_host")  # absent in modules pickled before it existed
        factor = self._buffers["factor"]
        if host is None or host[0] is not factor or host[1] != factor._version:
            host = self._factor_host = (factor, factor._version, float(factor))
        return host[2]

    @property
    def target_rate(self) -> float:
        """The rate at the end of the schedule: ``drop_prob * gamma_scale``."""
        return self.drop_prob * self.gamma_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Drop blocks of ``x`` in training mode; return ``x`` itself otherwise."""
        if isinstance(x, fx.Proxy):
            return self._traced_call(x)
        target = self.target_rate
        if not self.training or target == 0.0:
            return x
        if self.channel_dim != 1:
            return self._forward(x.movedim(-1, 1), target).movedim(1, -1)
        return self._forward(x, target)

    def _forward(self, x: torch.Tensor, target: float) -> torch.Tensor:
        """The op on ``(N, C, *spatial)`` at ``target * factor``."""
        if torch.compiler.is_compiling():
            rate = self.factor * target
            geom = self._geometry(x)
            return drop_block_traceable(x, rate, geom, self.shared_channels, self.gamma, max_rate=target)
        rate = target * self.factor_value
        if rate <= 0.0:
            return x
        return drop_block_eager(x, rate, self._eager_geometry(x), self.shared_channels, self.gamma, None, self.inplace)

    def _traced_call(self, x: fx.Proxy) -> fx.Proxy:
        """One graph node for any ``torch.fx`` tracer, whatever the mode and rate at trace time.

        Inside a traced model it is a ``call_module`` node: the graph calls this module, which
        honours its training flag and the schedule's ``factor`` at run time. Traced as the root it
        becomes a call of :func:`traced_drop_block` with the settings, the ``factor`` buffer and
        the training flag of the trace (the root's own ``forward`` cannot be a node of its graph).
        """
        tracer = x.tracer
        try:
            path = tracer.path_of_module(self)
        except NameError:  # not a submodule of the traced root
            path = ""
        if path:
            return tracer.create_proxy("call_module", path, (x,), {})
        factor = tracer.create_proxy("get_attr", "factor", (), {}) if tracer.root is self else self.factor_value
        args = (x, factor, self.target_rate, self._block_size, self.shared_channels, self.gamma, self.seed_region,
                self.training, self.channel_dim)  # fmt: skip
        return tracer.create_proxy("call_function", traced_drop_block, args, {})

    def __prepare_scriptable__(self) -> nn.Module:
        raise RuntimeError(
            "torch.jit.script cannot compile DropBlock (its forward dispatches in Python to the eager, "
            "compiled and fused kernels). To script a model for inference, remove the DropBlocks first: "
            "dropblock_inject.strip(model) (in eval mode they compute nothing), or use torch.export."
        )

    def _geometry(self, x: torch.Tensor) -> BlockGeometry:
        return block_geometry(tuple(x.shape[2:]), _block_for(x, self._block_size), self.seed_region)

    def _eager_geometry(self, x: torch.Tensor) -> BlockGeometry:
        """:meth:`_geometry`, remembered for the last input shape (a site sees one shape per step)."""
        key = (x.shape, self._block_size, self.seed_region)
        last = self.__dict__.get("_last_geometry")
        if last is None or last[0] != key:
            last = self._last_geometry = (key, self._geometry(x))
        return last[1]

    def extra_repr(self) -> str:
        block = self._block_size
        text = f"drop_prob={self.drop_prob}, block_size={block[0] if len(set(block)) == 1 else block}"
        if self.gamma_scale != 1.0:
            text += f", gamma_scale={self.gamma_scale}"
        defaults = {"shared_channels": False, "gamma": "paper", "seed_region": "valid", "inplace": False,
                    "channel_dim": 1}  # fmt: skip
        for name, default in defaults.items():
            if getattr(self, name) != default:
                text += f", {name}={getattr(self, name)!r}"
        return text
