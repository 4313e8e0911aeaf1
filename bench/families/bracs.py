"""``bracs``: a BRACS-shaped cohort — the 547 slides of ``splits/bracs/`` with their 7 subtypes and the official
395 / 65 / 87 split; protocols ``7class`` (N, PB, UDH, FEA, ADH, DCIS, IC) and ``3class`` (benign / atypical /
malignant), over the same bags.

* Tiles (pool group ``bracs_tiles``, ``tiles.py``): real H&E crops, no centre shift; ``normal`` (any tissue) and
  one lesion pool per grade g = 0 … 6 at atypia g / 6 (denser, larger, darker nuclei as g grows), so
  neighbouring grades differ by one small step of the same change.
* Bags: per slide, ``U(1000, 4000)·scale`` normal tiles plus a lesion of ``U(3, 15) %`` of that many tiles whose
  grades are a *graded mixture* around the slide's subtype k: grade k with probability 1/2, k − 1 and k + 1 with
  1/4 each (clipped to 0 … 6). Neighbouring subtypes therefore share most of their lesion tiles and differ only
  in the mixture's centre.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .base import Family
from .pools import register_pool_group

SPLITS = Path(__file__).resolve().parents[2] / "splits" / "bracs"
PROTOCOL_FILES = {"7class": "official_7class.csv", "3class": "official_3class.csv"}
GRADES = 7
NORMAL_TILES = 800
LESION_PER_GRADE = 250
# grade offset from the subtype -> probability. The lesion was 5-30 % of the slide (CE macro-F1 0.76 on 3class,
# tuning draw 0: too easy, issue #23); a ±2 mixture with 2-10 % left CE at chance (bench/results/mil_families.md)
MIXTURE = {-1: 0.25, 0: 0.5, 1: 0.25}
LESION = (0.03, 0.15)  # lesion tiles as a share of the slide's normal tiles


def _bracs_pools() -> dict[str, np.ndarray]:
    from .tiles import CENTRE_SHIFTS, encode, samplers, shift, tiles

    rng = np.random.default_rng(547)
    samp = samplers(rng)
    out = {"normal": encode(shift(tiles(samp, NORMAL_TILES, 0.0, rng), CENTRE_SHIFTS[0]))}
    for g in range(GRADES):
        out[f"grade{g}"] = encode(shift(tiles(samp, LESION_PER_GRADE, g / (GRADES - 1), rng), CENTRE_SHIFTS[0]))
    return out


register_pool_group("bracs_tiles", _bracs_pools, 1)


class BracsFamily(Family):
    name = "bracs"
    protocols = tuple(PROTOCOL_FILES)
    epochs = 12
    cpu_scale = 0.05
    cpu_slides = 0.5
    pool_groups = ("bracs_tiles",)
    fixed_cohort = True
    n_bags = 547

    def __init__(self, background: tuple[int, int] = (1000, 4000), lesion: tuple[float, float] = LESION):
        self.background, self.lesion = tuple(background), tuple(lesion)
        self.mixture = {str(k): v for k, v in MIXTURE.items()}

    def generate(self, rng: np.random.Generator, scale: float, pools: dict[str, np.ndarray],
                 n_bags: int) -> tuple[Iterator[tuple[str, np.ndarray]], dict[str, Any], dict[str, Any]]:
        from wsi_ncmi.data.splits import load_split

        tables = {p: load_split(SPLITS / f) for p, f in PROTOCOL_FILES.items()}
        slides = tables["7class"].sort_values("slide_id").reset_index(drop=True)
        lo, hi = (max(20, round(b * scale)) for b in self.background)
        offsets, probs = np.array(list(MIXTURE)), np.array(list(MIXTURE.values()))
        meta: dict[str, Any] = {"background": [lo, hi], "lesion_tiles": []}

        def bags() -> Iterator[tuple[str, np.ndarray]]:
            normal = pools["normal"]
            for sid, subtype in zip(slides["slide_id"], slides["label"]):
                n = int(rng.integers(lo, hi + 1))
                k = max(1, int(round(rng.uniform(*self.lesion) * n)))
                grades = np.clip(int(subtype) + rng.choice(offsets, size=k, p=probs), 0, GRADES - 1)
                lesion = [pools[f"grade{g}"][rng.integers(0, LESION_PER_GRADE)] for g in grades.tolist()]
                feats = np.concatenate([normal[rng.integers(0, len(normal), n)], np.stack(lesion)])  # [n + k, D]
                meta["lesion_tiles"].append(k)
                yield sid, feats[rng.permutation(n + k)]

        return bags(), tables, meta


FAMILIES = (BracsFamily(),)
