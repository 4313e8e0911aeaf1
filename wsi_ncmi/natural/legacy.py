"""Hyper-parameters of ``natural fit`` checkpoints saved before ImageModule's alignment with MILModule.

Those checkpoints store ``objective`` as the loss name itself (``"ce"``, ``"focal"``, ``"ncmi"``, ``"supcon"``),
NCMILoss's options as flat keys (``tau``, ``center_momentum``, ``variant``, ``centroid_update``,
``centroids_per_class``, ``use_nsf``, ``use_centering``) and the lr schedule as ``schedule``.
:func:`migrate_hparams` maps them onto today's names (``objective`` head|ncmi|contrastive + ``loss``,
``ncmi_kwargs``, ``scheduler``) and logs one line naming the file and what changed; today's hparams pass
through unchanged. The tensors of both kinds of checkpoint have the same names, so only the hparams move.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["LEGACY_NCMI_KEYS", "migrate_hparams"]

logger = logging.getLogger(__name__)

#: the flat NCMILoss options of the old ImageModule, now keys of ``ncmi_kwargs``
LEGACY_NCMI_KEYS = ("tau", "center_momentum", "variant", "centroid_update", "centroids_per_class", "use_nsf",
                    "use_centering")  # fmt: skip
_OLD_EMBEDDING_LOSSES = {"ncmi": "ncmi", "supcon": "contrastive"}  # old objective -> new objective
_OBJECTIVES = ("head", "ncmi", "contrastive")


def _is_legacy(hparams: Mapping[str, Any]) -> bool:
    return ("schedule" in hparams or any(k in hparams for k in LEGACY_NCMI_KEYS)
            or hparams.get("objective", "head") not in _OBJECTIVES)  # fmt: skip


def migrate_hparams(hparams: Mapping[str, Any], source: str | Path = "checkpoint") -> dict[str, Any]:
    """``hparams`` with the old ImageModule names replaced by today's (a copy; unchanged when already new).

    * ``objective="<loss>"`` -> ``objective="head", loss="<loss>"`` (``"ncmi"`` stays ``"ncmi"``,
      ``"supcon"`` becomes ``objective="contrastive", loss="supcon"``);
    * the flat NCMI keys, and for NCMI the old ``loss_kwargs`` over them -> ``ncmi_kwargs``;
    * ``schedule`` -> ``scheduler`` (the old ``"none"`` kept the warm-up: it is today's ``"constant"``).
    """
    out = dict(hparams)
    if not _is_legacy(out):
        return out
    changes = []
    old = str(out.pop("objective", "ce"))
    flat = {k: out.pop(k) for k in LEGACY_NCMI_KEYS if k in out}
    objective = _OLD_EMBEDDING_LOSSES.get(old, "head")
    out["objective"] = objective
    if objective == "ncmi":
        out["ncmi_kwargs"] = {**flat, **dict(out.get("ncmi_kwargs") or {}), **dict(out.pop("loss_kwargs", None) or {})}
        changes.append(f"objective ncmi + {sorted(flat)} -> ncmi_kwargs")
    else:
        out["loss"] = old
        changes.append(f"objective {old!r} -> objective {objective!r}, loss {old!r}")
        if flat:
            changes.append(f"{sorted(flat)} dropped (NCMI options of a {old} run)")
    if "schedule" in out:
        schedule = out.pop("schedule")
        out["scheduler"] = "constant" if schedule == "none" else schedule
        changes.append(f"schedule {schedule!r} -> scheduler {out['scheduler']!r}")
    logger.info("%s: hyper-parameters saved before the ImageModule alignment, read as today's: %s", source,
                "; ".join(changes))  # fmt: skip
    return out
