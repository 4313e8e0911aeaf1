"""The run folder's ``metrics.csv``: a CSV logger that survives ``--ckpt_path last`` and ``test`` runs.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` as soon as it opens the folder, so resuming a fit
(or running ``wsi-ncmi test`` in the run folder) erased every epoch logged before. ``RunCSVLogger`` keeps the
file and appends to it, and :class:`TrimLogOnFitStart` makes the file match the training state when a fit
starts:

* fresh fit (epoch 0): earlier rows are dropped, so the file describes this run only (as before);
* resumed fit at epoch ``e``: rows of epochs ``>= e`` (a partly logged epoch that is about to be redone) are
  dropped, rows of the finished epochs are kept, and the new epochs are appended with their columns merged.

``validate`` / ``test`` runs log to ``<run>/<subcommand>/metrics.csv`` (see ``wsi_ncmi.training.cli``),
never into the training log. Only global rank 0 touches the file.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from wsi_ncmi.data.atomic import atomic_output

__all__ = ["RunCSVLogger", "TrimLogOnFitStart", "trim_metrics_csv"]

logger = logging.getLogger(__name__)


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def trim_metrics_csv(path: str | os.PathLike, first_dropped_epoch: int) -> int:
    """Drop the rows of ``path`` whose ``epoch`` is ``>= first_dropped_epoch`` (rows without an epoch are kept);
    atomic rewrite; returns the number of rows dropped (0 when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return 0
    fields, rows = _read_rows(path)
    kept = []
    for row in rows:
        epoch = row.get("epoch") or ""
        try:
            drop = epoch != "" and int(float(epoch)) >= first_dropped_epoch
        except ValueError:
            drop = False
        if not drop:
            kept.append(row)
    dropped = len(rows) - len(kept)
    if dropped:
        with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)
    return dropped


class _AppendingWriter(ExperimentWriter):
    """Lightning's writer without the deletion of an existing ``metrics.csv``; its header is taken over so new
    rows are appended under the union of old and new columns."""

    def _check_log_dir_exists(self) -> None:  # Lightning's version deletes metrics.csv
        path = Path(self.metrics_file_path)
        if path.is_file():
            with path.open(newline="") as fh:  # only the header row is needed
                self.metrics_keys = sorted(next(csv.reader(fh), []))

    def reload_header(self) -> None:
        """Take the header again from the file (after :func:`trim_metrics_csv` or an outside change)."""
        self.metrics_keys = []
        self._check_log_dir_exists()


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to an existing ``metrics.csv`` instead of deleting it (see the module docstring).

    Same arguments as Lightning's ``CSVLogger``; ``trim_from_epoch(e)`` drops rows of epochs ``>= e``.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def trim_from_epoch(self, epoch: int) -> int:
        """Drop logged rows of epochs ``>= epoch`` (saved and pending); returns how many saved rows went."""
        writer = self.experiment
        writer.metrics = [m for m in writer.metrics if int(m.get("epoch", -1)) < epoch]
        dropped = trim_metrics_csv(writer.metrics_file_path, epoch)
        writer.reload_header()
        return dropped


class TrimLogOnFitStart(Callback):
    """At the start of training make every :class:`RunCSVLogger` match the restored state (module docstring)."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = int(trainer.current_epoch)
        for run_logger in trainer.loggers:
            if isinstance(run_logger, RunCSVLogger):
                dropped = run_logger.trim_from_epoch(epoch)
                if dropped:
                    what = "earlier run" if epoch == 0 else f"epochs >= {epoch} (redone after the resume)"
                    logger.info("metrics.csv: dropped %d rows of the %s", dropped, what)
