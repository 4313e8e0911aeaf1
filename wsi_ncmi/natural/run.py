"""Evaluate a ``wsi-ncmi natural fit`` checkpoint: rebuild its datamodule, load its module, run the protocols.

:func:`evaluate_checkpoint` is what ``wsi-ncmi natural evaluate`` does, without the argument parsing and the
printing: the datamodule settings come from the checkpoint's ``datamodule_hyper_parameters`` (``data``
overrides them, e.g. a moved ``root``; two views are always off), the :class:`ImageModule` is read with
``weights_only=True`` and rebuilt from its settings checked as plain data
(:func:`wsi_ncmi.training.checkpoint.load_module`: nothing the file names is imported or built), and :func:`wsi_ncmi.natural.evaluate.evaluate_image_model` streams head / CC / LP top-1/top-5 and the test split's
CMI/Γ/NCMI. The result dict also names the checkpoint, the run (``ImageModule.describe()``) and the data settings
used.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from wsi_ncmi.data.weights import resolve_device
from wsi_ncmi.errors import UserError
from wsi_ncmi.training.checkpoint import checkpoint_hparams, load_module, read_checkpoint

from .data import ImageDataModule
from .evaluate import evaluate_image_model
from .module import ImageModule
from .probe import LinearProbeConfig

__all__ = ["DATA_OVERRIDES", "NaturalEvalError", "checkpoint_data_settings", "evaluate_checkpoint"]

logger = logging.getLogger(__name__)

#: datamodule settings a user may override when evaluating a checkpoint (name -> type of the flag)
DATA_OVERRIDES: dict[str, type] = {
    "dataset": str,
    "root": str,
    "batch_size": int,
    "num_workers": int,
    "image_size": int,
    "eval_size": int,
    "crop_pct": float,
    "limit_train": int,
    "limit_val": int,
}


class NaturalEvalError(UserError):
    """A checkpoint that cannot be evaluated (unreadable, or not written by ``wsi-ncmi natural fit``)."""


def checkpoint_data_settings(path: str | Path, ckpt: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``ImageDataModule`` settings stored in a ``natural fit`` checkpoint (read with ``weights_only=True``
    unless its dict ``ckpt`` is given), checked as plain data of the datamodule's constructor."""
    path = Path(path)
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    if "datamodule_hyper_parameters" not in ckpt:
        raise NaturalEvalError(f"{path} has no datamodule settings (not an image-track run?)")
    return checkpoint_hparams(path, ckpt, ImageDataModule, key="datamodule_hyper_parameters")


def evaluate_checkpoint(
    ckpt: str | Path,
    *,
    data: Mapping[str, Any] | None = None,
    protocols: Sequence[str] = ("head", "cc", "lp"),
    device: str = "auto",
    lp: LinearProbeConfig | None = None,
    lp_dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Head / CC / LP metrics of the checkpoint ``ckpt`` on its own data (``data``: settings to override).

    Returns :func:`evaluate_image_model`'s dict plus ``checkpoint``, ``run`` and ``data`` (the settings used).
    """
    ckpt = Path(ckpt)
    module, state = load_module(ckpt, ImageModule, overrides={"weights": None})  # its own tensors replace weights
    data_kw = checkpoint_data_settings(ckpt, state)
    data_kw.update({k: v for k, v in (data or {}).items() if v is not None})
    data_kw["two_views"] = False
    dm = ImageDataModule(**data_kw)
    dm.setup("validate")
    device = resolve_device(device)
    module = module.to(device).eval()
    result = evaluate_image_model(
        module.backbone,
        dm.train_eval_dataloader(),
        dm.val_dataloader(),
        dm.num_classes,
        head=module.head,
        ncmi=module.ncmi,
        protocols=protocols,
        lp=lp,
        device=device,
        channels_last=bool(module.hparams.channels_last) and device != "cpu",
        lp_dtype=lp_dtype,
    )
    result.update(checkpoint=str(ckpt), run=module.describe(), data={k: data_kw[k] for k in sorted(data_kw)})
    return result
