"""Tiny synthetic MIL data for tests: bags whose label is decided by a few "witness" instances.

``make_witness_bags(out_dir, ...)`` writes ``<out_dir>/<slide_id>.h5`` bags (through
:func:`wsi_ncmi.data.bags.write_bag`) and ``<out_dir>/split.csv`` (``slide_id, patient_id, label, split``)
and returns the split path; the bags folder is ``out_dir`` itself.

The rule: every instance is Gaussian noise N(0, I_D). A slide of class 0 has only noise; a slide of class
k ≥ 1 additionally holds 1-3 witness instances shifted by ``witness_strength · u_k`` (u_k orthonormal random
directions). So the label depends on a few instances only (as in CAMELYON: metastasis vs negative) and an
attention aggregator separates the classes clearly, while the bag mean is only weakly informative.

Slides are stratified by class into train / val / test (every class present in every split as long as
each class has at least three slides), one patient per slide.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wsi_ncmi.data.bags import write_bag

__all__ = ["make_witness_bags", "witness_directions"]

SPLIT_NAME = "split.csv"


def witness_directions(num_classes: int, dim: int, seed: int = 0) -> np.ndarray:
    """Orthonormal witness directions ``[num_classes - 1, dim]`` (row k-1 belongs to class k)."""
    if num_classes - 1 > dim:
        raise ValueError(f"make_witness_bags: need dim >= num_classes - 1, got dim={dim}, num_classes={num_classes}")
    rng = np.random.default_rng(seed + 10_007)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q[: num_classes - 1].astype(np.float32)  # [C-1, D]


def _split_names(n: int, fractions: Sequence[float]) -> list[str]:
    """Split names for ``n`` slides of one class (train first; val/test get at least one when n >= 3)."""
    n_val = max(1, round(n * fractions[1])) if n >= 3 else 0
    n_test = max(1, round(n * fractions[2])) if n >= 3 else 0
    n_train = n - n_val - n_test
    return ["train"] * n_train + ["val"] * n_val + ["test"] * n_test


def make_witness_bags(
    out_dir: str | Path,
    n_slides: int = 40,
    num_classes: int = 2,
    dim: int = 16,
    n_instances: tuple[int, int] = (5, 40),
    seed: int = 0,
    witness_strength: float = 4.0,
    n_witnesses: tuple[int, int] = (1, 3),
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    dtype: str = "float32",
    split_name: str = SPLIT_NAME,
) -> Path:
    """Write ``n_slides`` synthetic bags + a split table into ``out_dir``; return the split CSV path.

    ``n_instances`` (low, high) bounds the bag sizes (inclusive); labels cycle 0..C-1 so classes are
    balanced; ``dtype`` is the feature dtype stored ("float32" or "float16").
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lo, hi = int(n_instances[0]), int(n_instances[1])
    w_lo, w_hi = int(n_witnesses[0]), int(n_witnesses[1])
    if not 1 <= lo <= hi or w_hi > lo:
        raise ValueError(f"make_witness_bags: need 1 <= n_witnesses <= n_instances, got {n_witnesses}, {n_instances}")
    rng = np.random.default_rng(seed)
    dirs = witness_directions(num_classes, dim, seed)  # [C-1, D]

    labels = [i % num_classes for i in range(n_slides)]
    split_of: dict[int, str] = {}
    for c in range(num_classes):
        idx = [i for i, y in enumerate(labels) if y == c]
        for i, s in zip(idx, _split_names(len(idx), fractions)):
            split_of[i] = s

    rows = []
    for i, y in enumerate(labels):
        sid = f"slide_{i:03d}"
        n = int(rng.integers(lo, hi + 1))
        feats = rng.standard_normal((n, dim)).astype(np.float32)  # [N, D]
        if y > 0:
            k = int(rng.integers(w_lo, w_hi + 1))
            where = rng.choice(n, size=k, replace=False)
            feats[where] += witness_strength * dirs[y - 1]
        coords = np.stack([np.arange(n) * 256, np.zeros(n)], axis=1).astype(np.int64)  # [N, 2]
        write_bag(
            out / f"{sid}.h5",
            feats.astype(dtype),
            coords,
            {"slide_id": sid, "encoder": "synthetic-witness", "patch_size": 256, "patch_level": 0},
        )
        rows.append({"slide_id": sid, "patient_id": f"patient_{i:03d}", "label": y, "split": split_of[i]})

    split_csv = out / split_name
    tmp = split_csv.with_name(split_csv.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["slide_id", "patient_id", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(split_csv)
    return split_csv
