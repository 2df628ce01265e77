"""``finetune``: train a timm or torchvision classifier with DropBlock injected and ramped.

The job the command ``dropblock-inject finetune`` runs, usable from Python::

    result = finetune(FinetuneConfig(model="resnet18", data="path/to/images", epochs=10))
    print(result.runs[0].val_accuracy)

It builds the model (random weights, the hub's with ``pretrained``, or a ``checkpoint`` file whose
classifier head may have another number of classes), injects DropBlock with
:func:`dropblock_inject.inject`, ramps it with :class:`dropblock_inject.DropBlockSchedule` over
the whole run (the paper's schedule, or the ``schedule:`` of the ``recipe``), and trains with
AdamW or SGD under a cosine learning rate (:mod:`~dropblock_inject.train.loop`).
``compare`` trains the same model without DropBlock from the same seed: one seed, so the
difference it shows is one draw; :func:`~dropblock_inject.train.ablate` measures it over seeds.
Under ``torchrun`` it trains with ``DistributedDataParallel``: every rank starts from the same
weights and draws its own DropBlock masks; rank 0 reports and writes the files.

Nothing here prints directly: progress goes to a :class:`Reporter` (the command line passes one
that draws progress bars).
"""

from __future__ import annotations

import torch.distributed as dist

from dropblock_inject.train.arms import Arm
from dropblock_inject.train.checkpoints import write_outputs
from dropblock_inject.train.config import FinetuneConfig
from dropblock_inject.train.distributed import distributed
from dropblock_inject.train.loop import prepare, train_run
from dropblock_inject.train.report import RUN_LABELS, FinetuneResult, Reporter, format_comparison

__all__ = ["finetune"]


def finetune(config: FinetuneConfig | None = None, reporter: Reporter | None = None) -> FinetuneResult:
    """Train ``config.model`` with DropBlock (and without it, with ``config.compare``).

    Under ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment) it joins the process group,
    shards the data with ``DistributedSampler`` and trains with ``DistributedDataParallel``.

    Args:
        config: The settings (default: the embedded digits, ``resnet10t`` at 64 px).
        reporter: Receives progress and the lines to print (default: :class:`Reporter`, prints).

    Returns:
        The runs' metrics and models, and the files written to ``config.out`` (rank 0).

    Raises:
        DropBlockInjectError: Unknown model, unusable data or checkpoint, no DropBlock site.

    Example:
        >>> config = FinetuneConfig(model="tv:resnet18", input_size=32, epochs=1, batch_size=16,
        ...                         limit_train_batches=2, limit_val_batches=1)
        >>> result = finetune(config)  # doctest: +ELLIPSIS
        data: embedded digits (UCI, CC BY 4.0): 1438 train / 359 val images, 8x8 -> 32x32
        ...
        held-out accuracy with DropBlock: ...% (.../32 images)
        >>> run = result.runs[0]
        >>> run.name, len(run.history), run.val_count, hasattr(run.model.layer3[0].bn1, "dropblock")
        ('dropblock', 1, 32, False)
    """
    config = config or FinetuneConfig()
    reporter = reporter or Reporter()
    with distributed(config.device) as (ctx, device):
        setup = prepare(config, reporter, device, ctx)
        runs = [train_run(setup, Arm(name), config.seed) for name in (("dropblock", "none") if config.compare
                                                                       else ("dropblock",))]  # fmt: skip
        result = FinetuneResult(config, setup.splits.classes, setup.splits.source, runs, notes=setup.notes)
        if setup.main:
            _report(result, reporter)
        if ctx.enabled:
            dist.barrier()
        return result


def _report(result: FinetuneResult, reporter: Reporter) -> None:
    if result.config.compare:
        reporter.message(format_comparison(result.runs))
        reporter.message("one seed each: the difference is one draw; `dropblock-inject ablate` measures it over seeds")
    for r in result.runs:
        accuracy = f"{100 * r.val_accuracy:.2f}% ({r.val_correct}/{r.val_count} images)"
        reporter.message(f"held-out accuracy {RUN_LABELS[r.name]}: {accuracy}")
    if result.config.out:
        result.files = write_outputs(result)
        reporter.message(f"wrote {', '.join(result.files)}")
