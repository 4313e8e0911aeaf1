"""LightningModules and training helpers: ``MILModule`` (head loss or NCMI), callbacks, optimizers.

``ImageModule`` (natural-image track) lives in :mod:`wsi_ncmi.natural.module`.
"""

from .callbacks import LastCheckpoint, RNGStateCheckpoint, capture_rng_state, restore_rng_state
from .checkpoint import CheckpointError, WeightsOnlyCLI, read_checkpoint, resolve_ckpt_path
from .compose import ConfigComposeError, compose_config, expand_config_args
from .mil_module import CENTROID_OPTIMIZERS, OBJECTIVES, MILModule, TrainingConfigError
from .optim import OPTIMIZERS, SCHEDULES, OptimConfigError, build_optimizer, build_scheduler
from .run_log import RunCSVLogger, TrimLogOnFitStart, trim_metrics_csv
from .val_metrics import epoch_metrics

__all__ = [
    "CENTROID_OPTIMIZERS",
    "OBJECTIVES",
    "OPTIMIZERS",
    "SCHEDULES",
    "CheckpointError",
    "ConfigComposeError",
    "MILModule",
    "OptimConfigError",
    "LastCheckpoint",
    "RNGStateCheckpoint",
    "RunCSVLogger",
    "TrimLogOnFitStart",
    "TrainingConfigError",
    "WeightsOnlyCLI",
    "build_optimizer",
    "build_scheduler",
    "capture_rng_state",
    "epoch_metrics",
    "compose_config",
    "expand_config_args",
    "read_checkpoint",
    "resolve_ckpt_path",
    "restore_rng_state",
    "trim_metrics_csv",
]
