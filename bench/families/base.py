"""What a task family is: a generator of cohorts indexed by a draw, seeded from (family name, draw).

A *family* (``Family``) turns ``make(draw, scale, out)`` into a ``Cohort``: one folder of ordinary wsi_ncmi bags
plus one split table per protocol (e.g. CAMELYON-17's official split and its leave-one-centre-out tables). All
randomness of a cohort — which witness classes, which pools, which tiles go into which bag — comes from one
generator seeded by :func:`draw_seed` (sha256 of ``"<family>/draw<k>"``), so a draw is the same on every machine
and two families never share a stream. Recipes are tuned on ``TUNING_DRAWS`` (0-4) only; ``HELD_OUT_DRAWS``
(100-104, any draw ≥ ``HELD_OUT_MIN``) are for the one final run after the recipe is frozen (issue #23), and
``bench/mil_benchmark.py`` refuses them without ``--held-out``.

A cohort is written once under ``<out>/<family>/draw<k>_s<scale>/`` and reused while its recipe (the family's
parameters, draw, scale and pool version; hash in ``recipe.json``) is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

TUNING_DRAWS: tuple[int, ...] = (0, 1, 2, 3, 4)
HELD_OUT_DRAWS: tuple[int, ...] = (100, 101, 102, 103, 104)
HELD_OUT_MIN = 100  # every draw ≥ this is held out (never looked at while a recipe is tuned)
TILE = 96  # tile side in pixels for the pixel-based pools


def is_held_out(draw: int) -> bool:
    return draw >= HELD_OUT_MIN


def draw_seed(family: str, draw: int) -> int:
    """The generator seed of ``family``'s draw ``draw``: 64 bits of sha256("<family>/draw<draw>")."""
    if draw < 0:
        raise ValueError(f"draw must be ≥ 0, got {draw}")
    return int.from_bytes(hashlib.sha256(f"{family}/draw{draw}".encode()).digest()[:8], "little")


@dataclass(frozen=True)
class Cohort:
    """One draw of a family, on disk: the bags folder and, per protocol, its split table and class count."""

    family: str
    draw: int
    scale: float
    bags_dir: Path
    splits: dict[str, Path]  # protocol -> split CSV (first = the family's default protocol)
    classes: dict[str, int]  # protocol -> number of classes
    meta: dict[str, Any] = field(default_factory=dict)  # what the draw chose (witness classes, sizes, ...)


class Family(ABC):
    """A task family. Subclasses set ``name``, ``protocols`` (first = default), ``epochs`` (CPU default),
    ``cpu_scale`` (the bag-size scale of the default CPU run; ``--full`` uses 1.0), ``cpu_bags`` / ``cpu_slides``
    (how many bags the default CPU run trains on; ``--full``: all), ``pool_groups`` (the cached instance pools it
    draws from) and implement :meth:`generate`."""

    name: str
    protocols: tuple[str, ...] = ("default",)
    epochs: int = 10
    full_epochs: int = 50
    cpu_scale: float = 1.0
    pool_groups: tuple[str, ...] = ()
    fixed_cohort: bool = False  # True: slide list comes from splits/ and ``n_bags`` cannot change it
    n_bags: int = 200
    cpu_bags: int | None = None  # bags of the default CPU run (witness families; None: ``n_bags``)
    cpu_slides: float = 1.0  # share of each (split, label) stratum the default CPU run trains on (``subset.py``)

    def params(self) -> dict[str, Any]:
        """Everything that defines the family's generator (part of the cohort's recipe hash)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    @abstractmethod
    def generate(self, rng: np.random.Generator, scale: float, pools: dict[str, np.ndarray],
                 n_bags: int) -> tuple[Iterable[tuple[str, np.ndarray]], dict[str, Any], dict[str, Any]]:
        """Return (bags, tables, meta): an iterable of (slide_id, features [n, D] float32), one split table
        (DataFrame) per protocol, and a JSON-able dict of what the draw chose. Must use ``rng`` only."""

    def make(self, draw: int, scale: float | None = None, out: Path | str = "bench/out/families",
             n_bags: int | None = None) -> Cohort:
        """Write (or reuse) draw ``draw`` of this family at ``scale`` (default ``cpu_scale``) under ``out``."""
        from .pools import POOL_VERSION, load_pools, pool_versions

        scale = float(self.cpu_scale if scale is None else scale)
        if scale <= 0:
            raise ValueError(f"{self.name}: scale must be > 0, got {scale}")
        if n_bags is not None and self.fixed_cohort:
            raise ValueError(f"{self.name}: the cohort is fixed by splits/ ({self.n_bags} slides); drop --bags")
        n_bags = int(n_bags or self.n_bags)
        out = Path(out)
        root = out / self.name / f"draw{draw:03d}_s{scale:g}"
        recipe = {"family": self.name, "params": self.params(), "draw": draw, "scale": scale, "n_bags": n_bags,
                  "pool_version": POOL_VERSION,
                  "pool_groups": pool_versions(self.pool_groups), "format": 1}
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]
        stamp = root / "recipe.json"
        if stamp.is_file():
            stored = json.loads(stamp.read_text())
            if stored.get("hash") == digest and all((root / f"{p}.csv").is_file() for p in self.protocols):
                return self._cohort(draw, scale, root, stored)
        pools = load_pools(out, self.pool_groups)
        rng = np.random.default_rng(draw_seed(self.name, draw))
        bags, tables, meta = self.generate(rng, scale, pools, n_bags)
        stored = write_cohort(root, bags, tables, {"hash": digest, "recipe": recipe, "meta": meta,
                                                   "classes": {p: int(tables[p]["label"].max()) + 1
                                                               for p in self.protocols}})
        return self._cohort(draw, scale, root, stored)

    def _cohort(self, draw: int, scale: float, root: Path, stored: dict[str, Any]) -> Cohort:
        return Cohort(self.name, draw, scale, root / "bags", {p: root / f"{p}.csv" for p in self.protocols},
                      {p: int(stored["classes"][p]) for p in self.protocols}, stored.get("meta", {}))


def write_cohort(root: Path, bags: Iterable[tuple[str, np.ndarray]], tables: dict[str, Any],
                 stamp: dict[str, Any]) -> dict[str, Any]:
    """Write every bag (float16 features, dummy coords), the split tables ``<protocol>.csv`` and ``recipe.json``
    (last, so a half-written cohort is rebuilt)."""
    from wsi_ncmi.data.atomic import atomic_write_text
    from wsi_ncmi.data.bags import write_bag
    from wsi_ncmi.data.splits import write_split

    bags_dir = root / "bags"
    (root / "recipe.json").unlink(missing_ok=True)  # a rebuild: no stamp until it is complete
    if bags_dir.is_dir():
        shutil.rmtree(bags_dir)  # bags of an older recipe must not linger beside the new ones
    bags_dir.mkdir(parents=True)
    for sid, feats in bags:  # feats [n, D]
        n = len(feats)
        coords = np.stack([np.arange(n) * TILE, np.zeros(n)], axis=1).astype(np.int64)  # [n, 2]
        write_bag(bags_dir / f"{sid}.h5", np.asarray(feats, np.float16), coords,
                  {"slide_id": sid, "encoder": stamp["recipe"]["family"]})
    for protocol, table in tables.items():
        write_split(table, root / f"{protocol}.csv")
    atomic_write_text(root / "recipe.json", json.dumps(stamp, indent=1, default=str))
    return stamp


def stratified_split(labels: np.ndarray, rng: np.random.Generator, val: float = 0.2,
                     test: float = 0.2) -> list[str]:
    """Split names per bag: per class, ``val`` / ``test`` shares of its bags (at least one each when the class
    has ≥ 3 bags), the rest train."""
    split = np.array(["train"] * len(labels), dtype=object)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k_val = max(int(len(idx) >= 3), round(len(idx) * val))
        k_test = max(int(len(idx) >= 3), round(len(idx) * test))
        split[idx[:k_val]] = "val"
        split[idx[k_val:k_val + k_test]] = "test"
    return split.tolist()


def class_labels(n_bags: int, balance: tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    """``n_bags`` labels with class shares ``balance`` (largest-remainder rounding, every class ≥ 3), shuffled."""
    p = np.asarray(balance, float) / np.sum(balance)
    counts = np.maximum(3, np.floor(p * n_bags).astype(int))
    while counts.sum() < n_bags:
        counts[np.argmax(p * n_bags - counts)] += 1
    while counts.sum() > n_bags:
        counts[np.argmax(counts)] -= 1
    return rng.permutation(np.repeat(np.arange(len(p)), counts))
