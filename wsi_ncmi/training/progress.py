"""Where a run stands in its schedule: its length in optimizer steps and epochs, and the fraction done.

``run_length(trainer)`` → (optimizer steps of the whole run, epochs): what both tracks' lr schedules are sized
with (warm-up and milestones given in epochs become steps). ``training_progress`` is the fraction of training
done at a batch, for aggregators whose behaviour follows it (``MILAggregator.set_progress``).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["run_length", "training_progress"]


def run_length(trainer: Any) -> tuple[int, int]:
    """(``trainer.estimated_stepping_batches``, ``max_epochs``); epochs 1 when unset or -1, (1, 1) with no trainer."""
    if trainer is None:
        return 1, 1
    total = int(trainer.estimated_stepping_batches)
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
    return total, epochs


def training_progress(trainer: Any, current_epoch: int, global_step: int, batch_idx: int) -> float:
    """Fraction of training done in [0, 1]: by epochs (and batches of this one) when ``max_epochs`` is set,
    else by optimizer steps."""
    n_batches = trainer.num_training_batches
    if trainer.max_epochs is not None and trainer.max_epochs > 0 and math.isfinite(n_batches) and n_batches > 0:
        return min(1.0, (current_epoch + batch_idx / n_batches) / trainer.max_epochs)
    total = max(1, int(trainer.estimated_stepping_batches))
    return min(1.0, global_step / total)
