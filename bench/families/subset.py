"""A smaller cohort with the same shape: a stratified subset of a split table for the default CPU run.

Per (split, label) stratum of the table, ``fraction`` of its slides (at least one) are kept, chosen by a
generator seeded from ``seed``; so the train / val / test sizes and every class's share within each split stay
as in the full table (up to rounding), and no slide changes split (a patient's slides never cross splits).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def subset_split(table: pd.DataFrame, fraction: float, seed: int = 0) -> pd.DataFrame:
    """``fraction`` (0 < f ≤ 1) of ``table``'s slides per (split, label) stratum, in the table's order."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"slide fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return table
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for _, group in table.groupby(["split", "label"], sort=True):
        k = max(1, int(round(fraction * len(group))))
        keep += rng.choice(group.index.to_numpy(), size=k, replace=False).tolist()
    return table.loc[sorted(keep)].reset_index(drop=True)
