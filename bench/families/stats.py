"""Cell statistics of the benchmark table: mean, sample std and a 95 % Student-t interval over all runs of a cell
(seeds × draws pooled, n = seeds · draws)."""

from __future__ import annotations

import math

import numpy as np


def summary(values: list[float], level: float = 0.95) -> dict[str, float]:
    """n, mean, sample std (ddof 1; 0 for n = 1) and the two-sided ``level`` t-interval of the mean
    (mean ± t_{(1+level)/2, n-1} · sd / √n; NaN bounds for n = 1)."""
    from scipy import stats

    x = np.asarray(values, float)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": math.nan, "sd": math.nan, "lo": math.nan, "hi": math.nan}
    mean = float(x.mean())
    sd = float(x.std(ddof=1)) if n > 1 else 0.0
    half = float(stats.t.ppf((1 + level) / 2, n - 1) * sd / math.sqrt(n)) if n > 1 else math.nan
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def fmt(values: list[float]) -> str:
    """``mean ± sd [lo, hi]`` with three decimals, ``—`` when empty, no interval for a single run."""
    s = summary(values)
    if s["n"] == 0:
        return "—"
    if s["n"] == 1:
        return f"{s['mean']:.3f}"
    return f"{s['mean']:.3f} ± {s['sd']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}]"
