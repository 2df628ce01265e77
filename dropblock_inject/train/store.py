"""The results folder of an ablation: its config, one row per finished run, and per-epoch curves.

- ``config.json``: the settings and their hash. A folder holds one experiment: another config is
  refused, naming the fields that differ. Which arms and seeds run is not part of it, so a
  second call with more seeds or arms adds runs to the same experiment.
- ``runs.csv`` (``runs.shard-I-of-N.csv`` for a shard): one row per (arm, seed), appended when
  the run finishes, in a single write followed by ``fsync``; a row cut short by a crash has no
  line end and is dropped (and cut off before the next append).
- ``curves.csv`` (or its shard's): the run's epochs, written just before its row; rows of runs
  without a row in ``runs*.csv`` are ignored.

Every process writes only its own files, so shards can share one folder.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from dropblock_inject.train.checkpoints import write_file
from dropblock_inject.train.config import ConfigError
from dropblock_inject.train.report import RunResult

__all__ = ["CURVE_COLUMNS", "EXECUTION_FIELDS", "RUN_COLUMNS", "AblationStore", "config_hash"]

RUN_COLUMNS = ("run_id", "config_hash", "arm", "seed", "init_hash", "val_acc", "val_loss", "val_correct", "val_count",
               "train_loss", "seconds", "realised_drop", "realised_by_stage", "finished")  # fmt: skip
CURVE_COLUMNS = ("run_id", "arm", "seed", "epoch", "train_loss", "val_loss", "val_acc", "drop_rate", "realised_drop",
                 "realised_by_stage", "lr", "seconds")  # fmt: skip
EXECUTION_FIELDS = ("out", "device", "workers", "shard", "arms", "seeds", "seed", "drop_probs", "block_sizes")
"""Settings that say where, how and which runs happen, not what a run is: outside the config hash."""
CONFIG_FILE = "config.json"


def config_hash(config: Mapping[str, Any]) -> str:
    """A short hash of the settings that decide a run's result (every field but :data:`EXECUTION_FIELDS`).

    Example:
        >>> config_hash({"epochs": 3, "out": "a"}) == config_hash({"epochs": 3, "out": "b"})
        True
    """
    fields = {k: v for k, v in config.items() if k not in EXECUTION_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]


class AblationStore:
    """An ablation's folder; ``shard`` ``(i, n)`` names this process's files."""

    def __init__(self, folder: str | os.PathLike, shard: tuple[int, int] | None = None) -> None:
        self.folder = os.fspath(folder)
        suffix = f".shard-{shard[0]}-of-{shard[1]}" if shard else ""
        self.runs_file = os.path.join(self.folder, f"runs{suffix}.csv")
        self.curves_file = os.path.join(self.folder, f"curves{suffix}.csv")

    def claim(self, config: Mapping[str, Any], data: str) -> str:
        """Check that the folder holds this experiment (or none) and record it; returns its hash.

        Raises:
            ConfigError: The folder holds another config (the message names the fields that differ),
                or is a file.
        """
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise ConfigError(f"out {self.folder!r} exists and is not a folder")
        digest = config_hash(config)
        saved = self.saved()
        if saved is not None and saved["config_hash"] != digest:
            raise ConfigError(_difference(self.folder, saved["config"], config))
        os.makedirs(self.folder, exist_ok=True)
        if saved is None:
            doc = {"config_hash": digest, "config": dict(config), "data": data}
            write_file(self.folder, CONFIG_FILE, json.dumps(doc, indent=2, default=str).encode())
        for path in (self.runs_file, self.curves_file):
            _cut_torn_tail(path)
        return digest

    def saved(self) -> dict[str, Any] | None:
        """What ``config.json`` holds (``config_hash``, ``config``, ``data``), or None."""
        path = os.path.join(self.folder, CONFIG_FILE)
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {path}: {e}; remove it or use another out folder") from e

    def add(self, result: RunResult, digest: str) -> dict[str, Any]:
        """Append ``result``'s curves, then its row (the row last: a run counts once its row is whole)."""
        run_id = uuid.uuid4().hex[:12]
        curves = [{**row, "run_id": run_id, "arm": result.name, "seed": result.seed} for row in result.history]
        _append(self.curves_file, CURVE_COLUMNS, curves)
        last = result.history[-1]
        row = {
            "run_id": run_id, "config_hash": digest, "arm": result.name, "seed": result.seed,
            "init_hash": result.init_hash, "val_acc": result.val_accuracy, "val_loss": result.val_loss,
            "val_correct": result.val_correct, "val_count": result.val_count, "train_loss": last["train_loss"],
            "seconds": round(result.seconds, 3), "realised_drop": last["realised_drop"],
            "realised_by_stage": last["realised_by_stage"], "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }  # fmt: skip
        _append(self.runs_file, RUN_COLUMNS, [row])
        return row

    def rows(self, digest: str | None = None) -> list[dict[str, Any]]:
        """Every finished run in the folder (all shards), the last row of each (arm, seed); only those
        of ``digest`` when given."""
        latest: dict[tuple[str, int], dict[str, Any]] = {}
        for row in self._read("runs"):
            if digest is None or row["config_hash"] == digest:
                latest[(row["arm"], int(row["seed"]))] = _typed(row)
        return list(latest.values())

    def finished(self, digest: str) -> set[tuple[str, int]]:
        """The (arm, seed) pairs that have a row."""
        return {(r["arm"], r["seed"]) for r in self.rows(digest)}

    def curves(self, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The epochs of the runs ``rows``."""
        ids = {r["run_id"] for r in rows}
        return [_typed(r) for r in self._read("curves") if r["run_id"] in ids]

    def _read(self, kind: str) -> list[dict[str, str]]:
        rows = []
        for path in sorted(glob.glob(os.path.join(glob.escape(self.folder), f"{kind}*.csv"))):
            with open(path, encoding="utf-8", newline="") as f:
                text = f.read()
            whole = text[: text.rfind("\n") + 1]  # a row without its line end was cut short
            rows += [r for r in csv.DictReader(io.StringIO(whole)) if None not in r.values()]
        return rows


def _difference(folder: str, saved: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    keys = [k for k in {**saved, **config} if k not in EXECUTION_FIELDS and saved.get(k) != _jsonish(config.get(k))]
    parts = [f"{k} {saved.get(k)!r} there, {config.get(k)!r} here" for k in keys]
    return (f"out {folder!r} holds an ablation of another config ({'; '.join(parts)}): use another out folder, "
            f"or the same settings to resume it")  # fmt: skip


def _jsonish(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists)."""
    return json.loads(json.dumps(value, default=str))


def _typed(row: Mapping[str, str]) -> dict[str, Any]:
    """A CSV row with its numbers as numbers."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key in ("seed", "epoch", "val_correct", "val_count"):
            out[key] = int(value)
        elif key in ("val_acc", "val_loss", "train_loss", "seconds", "realised_drop", "drop_rate", "lr"):
            out[key] = float(value)
        else:
            out[key] = value
    return out


def _append(path: str, columns: Sequence[str], rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` (and the header, to a new file) in one write, then ``fsync``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size == 0:
            writer.writeheader()
        writer.writerows(rows)
        data = buf.getvalue().encode()
        if os.write(fd, data) != len(data):
            raise OSError(f"short write to {path}")
        os.fsync(fd)
    finally:
        os.close(fd)


def _cut_torn_tail(path: str) -> None:
    """Cut a row that a crash left without its line end, so the next row starts on a line of its own."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
