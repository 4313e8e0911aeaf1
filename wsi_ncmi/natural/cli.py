"""``NaturalCLI``: the LightningCLI over ``ImageModule`` + ``ImageDataModule`` behind `wsi-ncmi natural fit |
validate | test` (the image track's mirror of :mod:`wsi_ncmi.training.cli`).

``model.num_classes`` is linked from the datamodule, so configs never repeat it; ``--ckpt_path`` files go through
:class:`~wsi_ncmi.training.checkpoint.WeightsOnlyCLI` (read with ``weights_only=True``, their settings checked as
plain data before LightningCLI merges them). Errors propagate; the command prints them as one line.
"""

from __future__ import annotations

import warnings

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from wsi_ncmi.training.checkpoint import WeightsOnlyCLI
from wsi_ncmi.training.cli_errors import OneLineParseErrors

from .data import ImageDataModule
from .module import ImageModule

__all__ = ["ImageCLI", "NaturalCLI"]


class ImageCLI(OneLineParseErrors, WeightsOnlyCLI, LightningCLI):
    """LightningCLI of the image track: the data -> model class-count link, checkpoints read as data."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


def NaturalCLI(args: list[str], run: bool = True) -> ImageCLI:  # noqa: N802 - named like the class it builds
    """Build (and by default run) the LightningCLI of the image track on ``args``."""
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return ImageCLI(
        ImageModule,
        ImageDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "wsi-ncmi natural"},
    )
