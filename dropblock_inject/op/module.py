"""``DropBlock``: the ``nn.Module`` around :func:`~dropblock_inject.op.functional.drop_block`."""

from __future__ import annotations

import torch
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

__all__ = ["DropBlock"]


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

    Shape:
        Input ``(N, C, *spatial)`` with 2 or 3 spatial dimensions; output the same.

    Example:
        >>> m = DropBlock(drop_prob=0.1, block_size=7)
        >>> m(torch.randn(2, 8, 14, 14)).shape
        torch.Size([2, 8, 14, 14])
        >>> x = torch.randn(2, 8, 14, 14)
        >>> m.eval()(x) is x
        True
    """

    factor: torch.Tensor

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
    ) -> None:
        super().__init__()
        validate_args(drop_prob, block_size, gamma_scale, gamma, seed_region)
        self.drop_prob = float(drop_prob)
        self.block_size = block_size if isinstance(block_size, int) else tuple(block_size)
        self.gamma_scale = float(gamma_scale)
        self.shared_channels = bool(shared_channels)
        self.gamma = gamma
        self.seed_region = seed_region
        self.inplace = bool(inplace)
        self.register_buffer("factor", torch.ones((), dtype=torch.float32), persistent=False)
        self._factor_host: tuple[torch.Tensor, int, float] | None = None
        self._last_geometry: tuple[tuple, BlockGeometry] | None = None  # (key, geometry) of the last eager call

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
        target = self.target_rate
        if not self.training or target == 0.0:
            return x
        if torch.compiler.is_compiling():
            rate = self.factor * target
            geom = self._geometry(x)
            return drop_block_traceable(x, rate, geom, self.shared_channels, self.gamma, max_rate=target)
        rate = target * self.factor_value
        if rate <= 0.0:
            return x
        return drop_block_eager(x, rate, self._eager_geometry(x), self.shared_channels, self.gamma, None, self.inplace)

    def _geometry(self, x: torch.Tensor) -> BlockGeometry:
        return block_geometry(tuple(x.shape[2:]), _block_for(x, _as_block_tuple(self.block_size)), self.seed_region)

    def _eager_geometry(self, x: torch.Tensor) -> BlockGeometry:
        """:meth:`_geometry`, remembered for the last input shape (a site sees one shape per step)."""
        key = (x.shape, self.block_size, self.seed_region)
        last = self.__dict__.get("_last_geometry")
        if last is None or last[0] != key:
            last = self._last_geometry = (key, self._geometry(x))
        return last[1]

    def extra_repr(self) -> str:
        text = f"drop_prob={self.drop_prob}, block_size={self.block_size}"
        if self.gamma_scale != 1.0:
            text += f", gamma_scale={self.gamma_scale}"
        defaults = {"shared_channels": False, "gamma": "paper", "seed_region": "valid", "inplace": False}
        for name, default in defaults.items():
            if getattr(self, name) != default:
                text += f", {name}={getattr(self, name)!r}"
        return text
