"""``c17``: a CAMELYON-17-shaped cohort — the 500 slides, patients, centres and labels of ``splits/camelyon17/``.

* Cohort: exactly the shipped tables: 318 negative / 36 ITC / 59 micro / 87 macro, centres 0-4, 5 slides per
  patient. Protocols: ``official`` (``seed0.csv``: test = centres 3-4, grouped val from centres 0-2) and
  ``loco0`` … ``loco4`` (leave that centre out). The split tables are copied unchanged; a draw re-draws the bags.
* Tiles (pool group ``c17_tiles``, ``tiles.py``): real H&E crops from the packaged sources; per centre
  ``NORMAL_PER_CENTRE`` normal tiles (any tissue) and ``TUMOUR_PER_CENTRE`` tumour tiles (the nucleus-dense end
  of the same tissue with atypia ``TUMOUR_ATYPIA``: larger, darker nuclei), each with its centre's fixed stain /
  scanner shift applied to the pixels before the packaged MobileNetV2 encodes them (1280-d). Per tile, tumour vs
  normal is far from separable (see :func:`separability`).
* Bags: per slide, ``U(2000, 6000)·scale`` normal tiles of its centre plus, by label, tumour tiles of its centre:
  ITC 1-10, micro 11-99 (log-uniform), macro 100-1,000 (log-uniform). ``scale`` shrinks the background only:
  witness counts keep their absolute size (so at the CPU default 0.1 the witness *shares* are ~10× real).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .base import Family
from .pools import register_pool_group

SPLITS = Path(__file__).resolve().parents[2] / "splits" / "camelyon17"
PROTOCOL_FILES = {"official": "seed0.csv", **{f"loco{c}": f"loco_center{c}.csv" for c in range(5)}}
CENTRES = 5
NORMAL_PER_CENTRE = 800
TUMOUR_PER_CENTRE = 300
TUMOUR_ATYPIA = 0.5  # per-tile logistic-regression AUC ~0.85 at 0.5 (0.98 at 1.0, 0.74 at 0.25)
WITNESS = {1: (1, 10, "uniform"), 2: (11, 99, "log"), 3: (100, 1000, "log")}  # label -> (min, max, law)


def _c17_pools() -> dict[str, np.ndarray]:
    from .tiles import CENTRE_SHIFTS, encode, samplers, shift, tiles

    rng = np.random.default_rng(17)
    samp = samplers(rng)
    out: dict[str, np.ndarray] = {}
    for c in range(CENTRES):
        for kind, n, atypia in (("normal", NORMAL_PER_CENTRE, 0.0), ("tumour", TUMOUR_PER_CENTRE, TUMOUR_ATYPIA)):
            out[f"{kind}_c{c}"] = encode(shift(tiles(samp, n, atypia, rng), CENTRE_SHIFTS[c]))  # [n, 1280]
    return out


register_pool_group("c17_tiles", _c17_pools, 1)


def witness_count(label: int, rng: np.random.Generator) -> int:
    """Tumour tiles of a slide with CAMELYON-17 ``label`` (0 negative, 1 ITC, 2 micro, 3 macro)."""
    if label == 0:
        return 0
    lo, hi, law = WITNESS[label]
    if law == "uniform":
        return int(rng.integers(lo, hi + 1))
    return int(min(hi, np.floor(np.exp(rng.uniform(np.log(lo), np.log(hi + 1))))))


class Camelyon17Family(Family):
    name = "c17"
    protocols = tuple(PROTOCOL_FILES)
    epochs = 8
    cpu_scale = 0.05
    cpu_slides = 0.5
    pool_groups = ("c17_tiles",)
    fixed_cohort = True
    n_bags = 500

    def __init__(self, background: tuple[int, int] = (2000, 6000)):
        self.background = tuple(background)
        self.witness = {str(k): v for k, v in WITNESS.items()}
        self.atypia = TUMOUR_ATYPIA

    def generate(self, rng: np.random.Generator, scale: float, pools: dict[str, np.ndarray],
                 n_bags: int) -> tuple[Iterator[tuple[str, np.ndarray]], dict[str, Any], dict[str, Any]]:
        from wsi_ncmi.data.splits import load_split

        tables = {p: load_split(SPLITS / f) for p, f in PROTOCOL_FILES.items()}
        slides = tables["official"].sort_values("slide_id").reset_index(drop=True)
        lo, hi = (max(20, round(b * scale)) for b in self.background)
        counts = {"background": [lo, hi], "witness": []}

        def bags() -> Iterator[tuple[str, np.ndarray]]:
            for sid, label, centre in zip(slides["slide_id"], slides["label"], slides["center"]):
                normal, tumour = pools[f"normal_c{centre}"], pools[f"tumour_c{centre}"]
                n, k = int(rng.integers(lo, hi + 1)), witness_count(int(label), rng)
                feats = np.concatenate([normal[rng.integers(0, len(normal), n)],
                                        tumour[rng.integers(0, len(tumour), k)]])  # [n + k, 1280]
                counts["witness"].append(k)
                yield sid, feats[rng.permutation(n + k)]

        return bags(), tables, counts


def separability(pools: dict[str, np.ndarray], folds: int = 5, seed: int = 0) -> dict[str, float]:
    """How hard the C17 tile pool is, per tile: cross-validated logistic-regression AUC of tumour vs normal (all
    centres pooled), and accuracy / macro-AUC of a 5-way centre classifier on normal tiles (chance 0.2)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    normal = np.concatenate([pools[f"normal_c{c}"] for c in range(CENTRES)])
    tumour = np.concatenate([pools[f"tumour_c{c}"] for c in range(CENTRES)])
    centre = np.concatenate([np.full(len(pools[f"normal_c{c}"]), c) for c in range(CENTRES)])
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)

    def model() -> Any:
        return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))

    x, y = np.concatenate([normal, tumour]), np.r_[np.zeros(len(normal)), np.ones(len(tumour))]
    p = cross_val_predict(model(), x, y, cv=cv, method="predict_proba")[:, 1]
    pc = cross_val_predict(model(), normal, centre, cv=cv, method="predict_proba")
    return {"tile_tumour_auc": float(roc_auc_score(y, p)),
            "centre_accuracy": float(accuracy_score(centre, pc.argmax(1))),
            "centre_macro_auc": float(roc_auc_score(centre, pc, multi_class="ovr", average="macro"))}


FAMILIES = (Camelyon17Family(),)
