"""``MILCLI``: the LightningCLI over ``MILModule`` + ``MILDataModule`` behind `wsi-ncmi fit | validate | test`.

``run_cli(subcommand, argv)`` parses, builds and runs one sub-command and returns the CLI (``.trainer``,
``.model``, ``.datamodule``); errors propagate (the command ``wsi_ncmi.commands.train_cli`` prints them as one
line; the demo and the benchmarks call ``run_cli`` directly).

Config files may compose others with ``__base__`` (see :mod:`wsi_ncmi.training.compose`); ``model.in_dim`` and
``model.num_classes`` are taken from the data (``data.in_dim`` / ``data.num_classes``).

Run folder = ``--trainer.default_root_dir`` (``runs/<name>``):
``metrics.csv`` + ``hparams.yaml`` (:class:`RunCSVLogger`, unless another logger is configured; a resumed fit
appends to it, ``validate`` / ``test`` write ``<run>/<subcommand>/metrics.csv``), ``config.yaml`` (the
resolved config), ``checkpoints/best.ckpt`` (best ``--checkpoint.monitor``, default ``val/f1_plus_auc``, max)
and ``checkpoints/last.ckpt`` (after every validation, see :class:`LastCheckpoint`). ``--ckpt_path last`` (or the file) resumes exactly, RNG states included.

Before anything is built the split table is checked against the bags folder (missing bags, mixed
feature dims, labels vs ``data.num_classes``, a patient in two splits unless ``--allow_patient_leak true``,
which is then recorded in ``config.yaml``) and the checkpoint of ``--ckpt_path`` (``last`` resolved to the
newest ``last*.ckpt``) is read with ``weights_only=True``; Lightning then loads it with ``weights_only=True``
too (``--weights_only false`` is refused).

A ``fit`` holds ``<run>/fit.lock`` (:mod:`wsi_ncmi.data.locks`) while it runs: a second ``fit`` into the same run
folder is refused in one line naming the holder, and the lock of a process that died is taken over. Checkpoints
are written to a temporary file and renamed (:class:`~wsi_ncmi.training.callbacks.AtomicCheckpointIO`).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, _InstantiatorFn

from wsi_ncmi.data import MILDataModule
from wsi_ncmi.data.locks import acquire_folder_lock, release_folder_lock
from wsi_ncmi.data.outputs import check_output_dir
from wsi_ncmi.data.split_check import SplitBags, check_patient_leak, preflight_check

from .callbacks import AtomicCheckpointIO, LastCheckpoint, RNGStateCheckpoint
from .checkpoint import WeightsOnlyCLI
from .cli_errors import OneLineParseErrors
from .compose import expand_config_args
from .mil_module import MILModule
from .run_log import RunCSVLogger, TrimLogOnFitStart

__all__ = ["CHECKPOINT_DEFAULTS", "MILCLI", "run_cli"]

logger = logging.getLogger(__name__)

CHECKPOINT_DEFAULTS: dict[str, Any] = {
    "checkpoint.monitor": "val/f1_plus_auc",
    "checkpoint.mode": "max",
    "checkpoint.filename": "best",
    "checkpoint.save_last": False,  # last.ckpt is written by LastCheckpoint after every validation
    "checkpoint.auto_insert_metric_name": False,
    "checkpoint.enable_version_counter": False,
}
_LEAK_FLAG = "--allow_patient_leak true"
RUN_LOCK = "fit.lock"


class MILCLI(OneLineParseErrors, WeightsOnlyCLI, LightningCLI):
    """LightningCLI with data → model links, a stable run-folder layout and pre-flight checks."""

    _split_bags: SplitBags | None = None  # the split the pre-flight check resolved, handed to the datamodule

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            MILModule,
            MILDataModule,
            trainer_defaults={"callbacks": [RNGStateCheckpoint()]},
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.in_dim", "model.in_dim", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(CHECKPOINT_DEFAULTS)
        parser.add_argument("--preflight", type=bool, default=True,
                            help="check the split table against the bags folder before building anything")
        parser.add_argument("--allow_patient_leak", type=bool, default=False,
                            help="accept a split table with a patient in two splits (recorded in config.yaml)")

    def _cfg(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        cfg = self._cfg()
        root = Path(cfg.trainer.default_root_dir or ".")
        if cfg.checkpoint.dirpath is None:
            cfg.checkpoint.dirpath = str(root / "checkpoints")
        data = cfg.data
        report = None
        if cfg.preflight:
            report = preflight_check(data.bags_dir, data.split_csv, num_classes=data.num_classes, fold=data.fold,
                                     check_labels=not data.label_map, allow_patient_leak=cfg.allow_patient_leak,
                                     leak_flag=_LEAK_FLAG)
        else:
            check_patient_leak(data.split_csv, fold=data.fold, allow=cfg.allow_patient_leak, flag=_LEAK_FLAG)
        self._split_bags = report.resolved if report is not None else None
        # before the trainer exists: a bad --ckpt_path (`last` = checkpoints/last*.ckpt) ends the run here
        self.check_ckpt_args(cfg.get("ckpt_path"), cfg.get("weights_only"), [cfg.checkpoint.dirpath])
        if self.subcommand == "fit" and cfg.model.weight_average and cfg.checkpoint.monitor is not None:
            logger.warning("--model.weight_average %s with --checkpoint.monitor %s: best.ckpt may be an epoch from "
                           "before the averaging; last.ckpt holds the averaged model (or set --checkpoint.monitor "
                           "null)", cfg.model.weight_average, cfg.checkpoint.monitor)
        if data.num_classes is None:
            # make the inferred class count explicit: the datamodule would save num_classes=None in its hparams,
            # and Lightning refuses to log model and data hparams that disagree
            if data.label_map:
                data.num_classes = max(int(v) for v in data.label_map.values()) + 1
            elif report is not None:
                data.num_classes = report.num_labels

    def _add_instantiators(self) -> None:
        super()._add_instantiators()
        # the datamodule takes the split the pre-flight check resolved (one folder listing, one read per header)
        # as its explicit `_split_bags` argument; Lightning's instantiator still records the configured hparams
        lightning_data = _InstantiatorFn(cli=self, key="data")

        def data(class_type: type, *args: Any, applied_instantiation_links: dict, **kwargs: Any) -> Any:
            return lightning_data(class_type, *args, applied_instantiation_links=applied_instantiation_links,
                                  _split_bags=self._split_bags, **kwargs)

        self.parser.add_instantiator(data, MILDataModule, subclasses=False)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        cfg = self._cfg()
        if self.subcommand == "fit":
            callbacks = [c for c in self.trainer_defaults.get("callbacks", [])
                         if not isinstance(c, LastCheckpoint | TrimLogOnFitStart)]
            self.trainer_defaults["callbacks"] = [*callbacks, LastCheckpoint(dirpath=cfg.checkpoint.dirpath),
                                                  TrimLogOnFitStart()]
        if cfg.trainer.logger in (None, True):
            # fit: <root>/metrics.csv, appended on resume; validate/test: <root>/<subcommand>/metrics.csv
            root = cfg.trainer.default_root_dir or "."
            version = "" if self.subcommand == "fit" else self.subcommand
            kwargs["logger"] = RunCSVLogger(save_dir=root, name="", version=version)
        if cfg.trainer.plugins is None:
            kwargs["plugins"] = [AtomicCheckpointIO()]
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand == "fit":  # the last step before anything is written into the run folder
            root = check_output_dir(cfg.trainer.default_root_dir or ".", "--trainer.default_root_dir")
            self._run_lock = acquire_folder_lock(root, RUN_LOCK, "wsi-ncmi fit")
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        finally:
            if getattr(self, "_run_lock", None) is not None:
                release_folder_lock(self._run_lock)
                self._run_lock = None


def run_cli(subcommand: str, argv: list[str]) -> MILCLI:
    """Parse ``argv`` for ``subcommand`` (fit / validate / test), build everything and run it; return the CLI
    (``.trainer``, ``.model``, ``.datamodule``). Errors propagate (see the ``main_*`` functions)."""
    with warnings.catch_warnings():
        # argv is passed explicitly (it is sys.argv minus the sub-command, with __base__ files expanded), which
        # LightningCLI warns about by printing the whole argument list; validate/test need no LastCheckpoint
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used")
        return MILCLI(args=[subcommand, *expand_config_args(list(argv))])
