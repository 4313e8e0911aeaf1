"""What a MIL checkpoint records about the run that wrote it, besides the weights: the global seed of the run
(``seed_everything``, so reports can name the training seed) and the training bags' provenance
(:mod:`wsi_ncmi.data.provenance`: encoder, weights, dim, µm/px, tile size; checked by `wsi-ncmi predict`)."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["record_run"]


def record_run(checkpoint: dict[str, Any], trainer: Any) -> None:
    """Add ``training_seed`` (when ``PL_GLOBAL_SEED`` is set) and the provenance of ``trainer``'s datamodule."""
    from wsi_ncmi.data.provenance import CHECKPOINT_KEY, datamodule_provenance

    seed = os.environ.get("PL_GLOBAL_SEED")
    if seed is not None and seed.lstrip("-").isdigit():
        checkpoint["training_seed"] = int(seed)
    provenance = datamodule_provenance(getattr(trainer, "datamodule", None) if trainer else None)
    if provenance is not None:
        checkpoint[CHECKPOINT_KEY] = provenance
