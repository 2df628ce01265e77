"""``ablate``: does DropBlock help on my data? One model under several arms x seeds, paired, with intervals.

The job the command ``dropblock-inject ablate`` runs, usable from Python::

    result = ablate(AblationConfig(model="resnet18", data="path/to/images", seeds=5))
    print(result.table)

Every (arm, seed) pair is one run of the loop ``finetune`` uses (:mod:`~dropblock_inject.train.loop`):
seed s gives every arm the same initial weights, data order and augmentation, so the per-seed
differences between arms cancel most of the run-to-run noise. Each finished run is appended to
``out/runs.csv`` at once; calling again with the same settings skips the finished pairs, and
``shard="i/n"`` runs one share of the grid, for several jobs writing to one folder that
:func:`report` then summarises. The summary (:mod:`~dropblock_inject.train.stats`) says "better"
or "worse" only where the interval of the paired difference excludes 0.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from dropblock_inject.pipeline.plan import Plan
from dropblock_inject.train.arms import Arm, expand_arms, unavailable_reason
from dropblock_inject.train.config import AblationConfig, ConfigError, parse_shard
from dropblock_inject.train.distributed import broadcast, distributed
from dropblock_inject.train.loop import Setup, prepare, steps_per_epoch, train_run
from dropblock_inject.train.report import Reporter, RunResult
from dropblock_inject.train.stats import Summary, summarise
from dropblock_inject.train.store import AblationStore
from dropblock_inject.train.summary import format_summary, write_summary

__all__ = ["AblationReporter", "AblationResult", "ablate", "format_run", "report"]

RunFn = Callable[[Setup, Arm, int], RunResult]


class AblationReporter(Reporter):
    """Where :func:`ablate` sends its progress: a line per finished run, each arm's plan once, no epoch lines.

    Only rank 0 receives these calls.
    """

    def __init__(self) -> None:
        self.plans_shown: set[str] = set()

    def on_plan(self, run: str, plan: Plan) -> None:
        if run not in self.plans_shown:
            self.plans_shown.add(run)
            self.message(f"{run}: {plan}")

    def epoch_end(self, run: str, row: dict[str, Any]) -> None:
        """Epochs are not printed (they are in ``curves.csv``)."""

    def ablation_start(self, runs: int, finished: int, steps_per_run: int) -> None:
        """Before the first run: ``runs`` in this call's grid, ``finished`` of them already in the folder."""
        if finished:
            self.message(f"{finished} of {runs} runs already finished in the out folder: skipped")

    def run_start(self, arm: str, seed: int, index: int, runs: int) -> None:
        """Before run ``index`` (from 1) of the ``runs`` this call trains."""

    def run_end(self, row: dict[str, Any], index: int, runs: int) -> None:
        """After a run, with its row of ``runs.csv``."""
        self.message(format_run(row, index, runs))


def format_run(row: dict[str, Any], index: int, runs: int) -> str:
    """One finished run.

    Example:
        >>> format_run({"arm": "dropblock", "seed": 3, "val_acc": 0.9136, "val_loss": 0.312, "realised_drop": 0.0712,
        ...             "realised_by_stage": "8x8=0.0241 4x4=0.0905", "seconds": 21.4}, 4, 20)
        '[4/20] dropblock seed 3: acc 91.36%  loss 0.3120  realised drop 8x8=0.0241 4x4=0.0905  21.4 s'
    """
    realised = row["realised_by_stage"] or f"{row['realised_drop']:.4f}"
    return (f"[{index}/{runs}] {row['arm']} seed {row['seed']}: acc {100 * row['val_acc']:.2f}%  "
            f"loss {row['val_loss']:.4f}  realised drop {realised}  {row['seconds']:.1f} s")  # fmt: skip


@dataclass
class AblationResult:
    """What :func:`ablate` and :func:`report` return.

    Attributes:
        summary: The statistics of the runs summarised.
        table: The table as printed.
        rows: The runs summarised (rows of ``runs.csv``).
        ran: Runs this call trained.
        skipped: Runs of this call's grid found finished in the folder.
        unavailable: Arms that could not run, with the reason.
        files: The files written.
    """

    summary: Summary | None
    table: str
    rows: list[dict[str, Any]]
    ran: int = 0
    skipped: int = 0
    unavailable: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def ablate(
    config: AblationConfig | None = None, reporter: AblationReporter | None = None, *, run: RunFn = train_run
) -> AblationResult:
    """Train ``config.model`` under every arm for every seed (skipping finished runs) and summarise.

    Args:
        config: The settings (default: the paper's four arms on 20 embedded digits per class, 5 seeds).
        reporter: Receives progress and the lines to print (default: prints them).
        run: Trains one (arm, seed) pair (default: the ``finetune`` loop); tests pass a stand-in.

    Returns:
        The summary of this call's grid (all shards' runs of it found in the folder); a shard gets
        no summary (``report`` merges the shards).

    Raises:
        ConfigError: Bad settings, or ``out`` holds an ablation of another config.
        DropBlockInjectError: Unknown model, unusable data or checkpoint, no DropBlock site.

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> config = AblationConfig(model="tv:resnet18", input_size=32, epochs=1, batch_size=16, seeds=2,
        ...                         arms=["none", "dropblock"], limit_train_batches=2, limit_val_batches=1, out=out)
        >>> result = ablate(config, AblationReporter())  # doctest: +ELLIPSIS
        data: embedded digits ...
        ...
        Ablation: tv:resnet18 ...; 2 seeds (0-1), paired
        ...
        >>> result.ran, ablate(config, AblationReporter()).ran  # doctest: +ELLIPSIS
        data: ...
        (4, 0)
    """
    config = config or AblationConfig()
    reporter = reporter or AblationReporter()
    arms = expand_arms(config)
    unavailable = {a.name: why for a in arms if (why := unavailable_reason(a, config))}
    shard = parse_shard(config.shard) if config.shard else None
    with distributed(config.device) as (ctx, device):
        setup = prepare(config, reporter, device, ctx)
        for name, why in unavailable.items() if setup.main else ():
            reporter.message(f"arm {name} unavailable: {why}; the other arms run")
        store = AblationStore(config.out, shard)
        grid = _grid(config, [a for a in arms if a.name not in unavailable], shard)
        claimed = broadcast(_claim(store, config, setup) if setup.main else None, ctx)
        if isinstance(claimed, ConfigError):
            raise claimed
        digest, finished = claimed
        todo = [(arm, seed) for arm, seed in grid if (arm.name, seed) not in finished]
        result = _run_grid(setup, store, digest, grid, todo, run)
        if setup.main:
            result.unavailable = unavailable
            result = _conclude(setup, store, digest, grid, shard, result)
        if ctx.enabled:
            dist.barrier()
        return result


def _grid(config: AblationConfig, arms: list[Arm], shard: tuple[int, int] | None) -> list[tuple[Arm, int]]:
    """Every (arm, seed), seed by seed (so that the pairs of a seed finish together); a shard's share of it."""
    grid = [(arm, seed) for seed in config.seed_list() for arm in arms]
    return grid if shard is None else grid[shard[0] - 1 :: shard[1]]


def _claim(store: AblationStore, config: AblationConfig, setup: Setup) -> Any:
    """(config hash, finished pairs), or the ConfigError to raise on every rank."""
    try:
        digest = store.claim(config.to_dict(), setup.splits.source)
    except ConfigError as e:
        return e
    return digest, store.finished(digest)


def _run_grid(setup: Setup, store: AblationStore, digest: str, grid: list, todo: list, run: RunFn) -> AblationResult:
    reporter, cfg = setup.reporter, setup.config
    if setup.main:
        reporter.ablation_start(len(grid), len(grid) - len(todo), cfg.epochs * steps_per_epoch(setup))
    for index, (arm, seed) in enumerate(todo, start=1):
        if setup.main:
            reporter.run_start(arm.name, seed, index, len(todo))
        result = run(setup, arm, seed)
        if setup.main:
            reporter.run_end(store.add(result, digest), index, len(todo))
    return AblationResult(None, "", [], ran=len(todo), skipped=len(grid) - len(todo))


def _conclude(setup: Setup, store: AblationStore, digest: str, grid: list, shard: tuple[int, int] | None,
              result: AblationResult) -> AblationResult:  # fmt: skip
    """Summarise the grid's runs and write the summary files; a shard only says how to merge."""
    if shard is not None:
        result.table = (f"shard {shard[0]}/{shard[1]}: {result.ran} runs trained, {result.skipped} already finished; "
                        f"when every shard is done: dropblock-inject ablate --report {store.folder}")  # fmt: skip
        setup.reporter.message(result.table)
        return result
    wanted = {(arm.name, seed) for arm, seed in grid}
    rows = [r for r in store.rows(digest) if (r["arm"], r["seed"]) in wanted]
    order = [arm.name for arm, _ in grid]
    return _summarise(store, rows, order, _description(setup.config, setup.splits.source), setup.reporter, result)


def report(folder: str | os.PathLike, reporter: Reporter | None = None) -> AblationResult:
    """Summarise every finished run in an ablation's folder (all shards), print the table and write
    the summary files.

    Raises:
        ConfigError: ``folder`` holds no ablation (no ``config.json``).
    """
    store = AblationStore(folder)
    saved = store.saved()
    if saved is None:
        raise ConfigError(f"{os.fspath(folder)!r} holds no ablation (no config.json): give the out folder of ablate")
    rows = store.rows(saved["config_hash"])
    if not rows:
        raise ConfigError(f"{os.fspath(folder)!r} holds no finished run yet")
    config = AblationConfig.from_dict(saved["config"])
    order = [a.name for a in expand_arms(config)] + [r["arm"] for r in rows]
    description = _description(config, saved["data"])
    return _summarise(store, rows, order, description, reporter or AblationReporter(), AblationResult(None, "", []))


def _summarise(store: AblationStore, rows: list[dict[str, Any]], order: list[str], description: str,
               reporter: Reporter, result: AblationResult) -> AblationResult:  # fmt: skip
    summary = summarise(rows, list(dict.fromkeys(order)))
    summary.unavailable = result.unavailable
    table = format_summary(summary, description)
    saved = store.saved() or {}
    extra = {"description": description, "config_hash": saved.get("config_hash"), "config": saved.get("config")}
    result.files = write_summary(store.folder, summary, table, rows, store.curves(rows), extra)
    result.summary, result.table, result.rows = summary, table, rows
    reporter.message(table)
    reporter.message(f"wrote {', '.join(result.files)}")
    return result


def _description(config: AblationConfig, data: str) -> str:
    return f"{config.model} on {data}; {config.input_size} px, {config.epochs} epochs"
