"""Checkpoints of ``finetune``: read the weights to start from, and write the trained ones.

:func:`read_checkpoint` takes a bare state_dict or a training checkpoint that holds one;
:func:`load_weights` loads it into a model whose classifier head may have another number of
classes; :func:`write_outputs` saves the metrics and each run's weights into ``config.out``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dropblock_inject.errors import DropBlockInjectError
from dropblock_inject.models import create_model
from dropblock_inject.train.config import FinetuneConfig
from dropblock_inject.train.report import FinetuneResult

__all__ = ["CHECKPOINT_FILES", "OUTPUT_FILES", "CheckpointError", "initial_weights", "load_weights",
           "read_checkpoint", "write_file", "write_outputs"]  # fmt: skip

OUTPUT_FILES = {"metrics_csv": "metrics.csv", "metrics_json": "metrics.json"}
CHECKPOINT_FILES = {"dropblock": "model.pt", "none": "baseline.pt"}


class CheckpointError(DropBlockInjectError, ValueError):
    """A checkpoint cannot be read or does not fit the model (the message names the keys)."""


# -- reading -----------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state_dict in ``path`` (``torch.load(weights_only=True)``).

    Accepts a bare state_dict or one under ``"state_dict"``, ``"model"`` or ``"model_state_dict"``;
    a ``"module."`` prefix on every key (``DistributedDataParallel``) is removed.

    Raises:
        CheckpointError: The file is missing, unreadable, or holds no state_dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise CheckpointError(f"cannot read checkpoint {path!r}: {_first_line(e)}") from e
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path!r} holds no state_dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> str | None:
    """Load ``state`` into ``model`` strictly, except the classifier head when its size differs.

    The head (timm's ``pretrained_cfg["classifier"]``, else the last ``nn.Linear``) keeps the
    model's fresh initialisation when the checkpoint's head has another shape or is absent.

    Returns:
        A note saying that the head was re-initialised, or None.

    Raises:
        CheckpointError: Other keys are missing, unexpected or of another shape (named).
    """
    own = model.state_dict()
    head = _head_keys(model)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    reset = sorted(head & (set(missing) | set(mismatched)))
    if reset:
        reset = sorted(head)
        missing, mismatched = [k for k in missing if k not in head], [k for k in mismatched if k not in head]
    if missing or unexpected or mismatched:
        raise CheckpointError(_mismatch_message(model, source, missing, unexpected, mismatched, own, state))
    model.load_state_dict({k: v for k, v in state.items() if k not in reset}, strict=not reset)
    if not reset:
        return None
    return f"classifier head {', '.join(reset)} not taken from {source} (other shape or absent): initialised fresh"


def _head_keys(model: nn.Module) -> set[str]:
    cfg = getattr(model, "pretrained_cfg", None)
    names = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if not names:
        linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        names = linear[-1:]
    prefixes = tuple(f"{n}." for n in ([names] if isinstance(names, str) else names))
    return {k for k in model.state_dict() if prefixes and k.startswith(prefixes)}


def _mismatch_message(model, source, missing, unexpected, mismatched, own, state) -> str:
    def some(keys: list[str], show=str) -> str:
        head = ", ".join(show(k) for k in keys[:3])
        return head + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {some(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {some(unexpected)}")
    if mismatched:
        shapes = lambda k: f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)} in the model"  # noqa: E731
        parts.append(f"shape mismatches: {some(mismatched, shapes)}")
    return f"{source} does not fit {type(model).__name__}: " + "; ".join(parts) + " (another architecture?)"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def initial_weights(config: FinetuneConfig) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The weights to start from (None: the seeded initialisation) and where they come from, for printing."""
    if config.checkpoint:
        return read_checkpoint(config.checkpoint), f"weights from {config.checkpoint}"
    if not config.pretrained:
        return None, "random weights"
    try:
        hub = create_model(config.model, pretrained=True)
    except DropBlockInjectError:
        raise
    except Exception as e:  # network and hub errors come in many types
        raise CheckpointError(f"cannot get pretrained weights for {config.model!r}: {_first_line(e)}") from e
    return hub.state_dict(), "pretrained weights from the hub"


# -- writing -----------------------------------------------------------------------------------


def write_outputs(result: FinetuneResult) -> list[str]:
    """Write metrics and checkpoints into ``config.out``; touch no other file there."""
    out = result.config.out
    assert out is not None
    os.makedirs(out, exist_ok=True)
    rows = [row for r in result.runs for row in r.history]
    files = [write_file(out, OUTPUT_FILES["metrics_csv"], _csv_text(rows).encode())]
    text = json.dumps(result.to_dict(), indent=2, default=_json_default)
    files.append(write_file(out, OUTPUT_FILES["metrics_json"], text.encode()))
    for r in result.runs:
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in r.model.state_dict().items()}, buf)
        files.append(write_file(out, CHECKPOINT_FILES[r.name], buf.getvalue()))
    return files


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_file(folder: str, name: str, data: bytes) -> str:
    """Write ``data`` to ``folder/name`` through a temporary file, so a crash leaves no half file."""
    path = os.path.join(folder, name)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)
