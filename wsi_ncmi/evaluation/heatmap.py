"""Attention heatmaps: per-tile scores painted over a slide thumbnail, plus QuPath/CSV exports.

Pieces, each usable alone:

* :func:`attention_scores` runs a trained aggregator on one bag and returns its own instance scores
  (ABMIL's gated-attention softmax, TransMIL's class-token attention, ...: whatever the model puts in
  ``MILOutput.attention``).
* :func:`read_thumbnail` reads a slide overview with OpenSlide at a chosen mpp, level or size (the
  ``wsi-ncmi heatmap`` command reads it instead through preprocessing's slide readers and mpp rules, and
  passes it to :func:`slide_heatmap` as ``thumbnail``).
* :func:`normalize_scores` maps raw scores to [0, 1] per slide (``"rank"``, ``"minmax"`` or ``"none"``).
* :func:`overlay_heatmap` paints the tile squares into the thumbnail (pure numpy, returns the image).
* :func:`render_heatmap` adds a colour bar and a title and writes a PNG.
* :func:`slide_heatmap` does all of it for one bag + slide file.
* :func:`write_tile_scores` writes the tiles as a CSV table and/or a GeoJSON FeatureCollection that
  QuPath (>= 0.4) imports as tile objects with a classification and a measurement.

Why rank normalisation is the default: attention weights sum to one over the bag, so their raw values
shrink with the bag size and are dominated by a handful of tiles; min-max then paints almost every tile
with the bottom colour. The per-slide rank (0 = lowest score of the slide, 1 = highest) spreads the
colours evenly and makes slides comparable ("top 10 % of this slide"), at the cost of hiding absolute
differences; ``"minmax"`` keeps the shape of the distribution, ``"none"`` paints raw values clipped
to [0, 1] (for scores that are probabilities already).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_ncmi.data.atomic import atomic_output, atomic_write_text
from wsi_ncmi.errors import UserError

log = logging.getLogger(__name__)

__all__ = [
    "HeatmapError",
    "NORMALIZERS",
    "SlideHeatmap",
    "attention_scores",
    "bag_patch_size_level0",
    "check_thumbnail_size",
    "normalize_scores",
    "overlay_heatmap",
    "read_thumbnail",
    "render_heatmap",
    "slide_heatmap",
    "tile_boxes_thumb",
    "write_tile_scores",
]


class HeatmapError(UserError):
    """Bad input to a heatmap function (names the argument or file and the problem)."""


# ----------------------------------------------------------------------------------------- scores
def _rank(s: np.ndarray) -> np.ndarray:
    if s.size == 1:
        return np.ones(1)
    order = np.argsort(s, kind="stable")
    ranks = np.empty(s.size)
    ranks[order] = np.arange(s.size, dtype=np.float64)
    # ties share their mean rank so equal scores get equal colours
    uniq, inv = np.unique(s, return_inverse=True)
    if uniq.size < s.size:
        sums = np.bincount(inv, weights=ranks)
        ranks = (sums / np.bincount(inv))[inv]
    return ranks / (s.size - 1)


def _minmax(s: np.ndarray) -> np.ndarray:
    lo, hi = float(s.min()), float(s.max())
    if hi - lo <= 0:
        return np.ones_like(s, dtype=np.float64)
    return (s - lo) / (hi - lo)


def _identity(s: np.ndarray) -> np.ndarray:
    return np.clip(s.astype(np.float64), 0.0, 1.0)


# name -> function mapping raw scores [N] to [0, 1] [N]
NORMALIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "rank": _rank,
    "minmax": _minmax,
    "none": _identity,
}


def normalize_scores(scores: np.ndarray, method: str = "rank") -> np.ndarray:
    """Per-slide normalisation of raw scores [N] to [0, 1] [N] (see the module docstring)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if method not in NORMALIZERS:
        raise HeatmapError(f"normalize: unknown method {method!r}; choose from {sorted(NORMALIZERS)}")
    if s.size == 0:
        return s
    if not np.all(np.isfinite(s)):
        raise HeatmapError(f"normalize: scores contain {int((~np.isfinite(s)).sum())} non-finite values")
    return NORMALIZERS[method](s)


def attention_scores(model: Any, features: Any, device: str | Any = "cpu") -> np.ndarray:
    """Instance scores [N] of a trained :class:`~wsi_ncmi.models.MILAggregator` on one bag [N, D].

    The model runs in eval mode without gradients on a batch of one bag and no mask; the scores are
    its ``MILOutput.attention[0]`` (one score per instance, summing to one for softmax aggregators).
    """
    import torch

    x = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features)
    if x.ndim != 2 or x.shape[0] == 0:
        raise HeatmapError(f"attention_scores: features must be [N, D] with N >= 1, got {tuple(x.shape)}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x.float().unsqueeze(0).to(device), None)  # [1, N, D] -> MILOutput
    finally:
        model.train(was_training)
    att = getattr(out, "attention", None)
    if att is None:
        raise HeatmapError(f"attention_scores: {type(model).__name__} returns no attention scores")
    if att.ndim != 2 or att.shape != (1, x.shape[0]):
        raise HeatmapError(
            f"attention_scores: {type(model).__name__} attention has shape {tuple(att.shape)}, "
            f"expected [1, {x.shape[0]}] (one score per instance)"
        )
    return att[0].detach().float().cpu().numpy()  # [N]


# -------------------------------------------------------------------------------------- thumbnail
def read_thumbnail(
    slide_path: str | Path,
    mpp: float | None = None,
    level: int | None = None,
    max_side: int = 2048,
) -> tuple[np.ndarray, float]:
    """Read a slide overview with OpenSlide: ``(rgb [h, w, 3] uint8, downsample)``.

    ``downsample`` is level-0 pixels per thumbnail pixel (along x). Exactly one way is used:
    ``mpp`` (resample to that resolution from the best pyramid level; the slide must report an mpp),
    ``level`` (a whole pyramid level as stored), or neither (``get_thumbnail`` fitting ``max_side``).
    """
    import openslide

    if mpp is not None and level is not None:
        raise HeatmapError("read_thumbnail: give either mpp or level, not both")
    path = Path(slide_path)
    try:
        slide = openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError) as e:
        raise HeatmapError(f"read_thumbnail: cannot open slide {path}: {e}") from e
    try:
        w0, h0 = slide.dimensions
        if level is not None:
            if not 0 <= level < slide.level_count:
                raise HeatmapError(f"read_thumbnail: {path} has levels 0..{slide.level_count - 1}, not {level}")
            w, h = slide.level_dimensions[level]
            _check_size(path, w, h)
            rgb = np.asarray(slide.read_region((0, 0), level, (w, h)).convert("RGB"))
            return rgb, w0 / w
        if mpp is not None:
            slide_mpp = slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
            if slide_mpp is None:
                raise HeatmapError(f"read_thumbnail: {path} reports no mpp; use --level instead of --mpp")
            ds = float(mpp) / float(slide_mpp)
            if ds <= 0:
                raise HeatmapError(f"read_thumbnail: mpp must be positive, got {mpp}")
            w, h = max(1, round(w0 / ds)), max(1, round(h0 / ds))
            _check_size(path, w, h)
            lv = slide.get_best_level_for_downsample(max(ds, 1.0))
            lw, lh = slide.level_dimensions[lv]
            img = slide.read_region((0, 0), lv, (lw, lh)).convert("RGB")
            rgb = np.asarray(img.resize((w, h)) if (lw, lh) != (w, h) else img)
            return rgb, w0 / w
        thumb = slide.get_thumbnail((max_side, max_side)).convert("RGB")
        return np.asarray(thumb), w0 / thumb.width
    finally:
        slide.close()


_MAX_THUMB_PIXELS = 16384 * 16384


def check_thumbnail_size(path: str | Path, w: int, h: int) -> None:
    """Refuse a thumbnail of more than 16384² pixels (names the slide and the size)."""
    if w * h > _MAX_THUMB_PIXELS:
        raise HeatmapError(f"read_thumbnail: {path} at this resolution is {w}x{h} px; choose a coarser mpp/level")


_check_size = check_thumbnail_size


# ---------------------------------------------------------------------------------------- overlay
def tile_boxes_thumb(
    coords: np.ndarray, patch_size_level0: float, thumb_downsample: float, thumb_shape: tuple[int, int]
) -> np.ndarray:
    """Tile rectangles in thumbnail pixels: [N, 4] int (x0, y0, x1, y1), clipped, at least 1 px wide."""
    c = np.asarray(coords, dtype=np.float64).reshape(-1, 2)  # [N, 2] level-0 (x, y)
    if thumb_downsample <= 0 or patch_size_level0 <= 0:
        raise HeatmapError(
            f"tile boxes: thumb_downsample ({thumb_downsample}) and patch_size_level0 ({patch_size_level0}) "
            "must be positive"
        )
    h, w = thumb_shape
    x0 = np.floor(c[:, 0] / thumb_downsample)
    y0 = np.floor(c[:, 1] / thumb_downsample)
    x1 = np.maximum(np.ceil((c[:, 0] + patch_size_level0) / thumb_downsample), x0 + 1)
    y1 = np.maximum(np.ceil((c[:, 1] + patch_size_level0) / thumb_downsample), y0 + 1)
    boxes = np.stack([np.clip(x0, 0, w), np.clip(y0, 0, h), np.clip(x1, 0, w), np.clip(y1, 0, h)], 1)
    return boxes.astype(np.int64)


def _colormap(cmap: str) -> Any:
    import matplotlib

    try:
        return matplotlib.colormaps[cmap]
    except KeyError as e:
        raise HeatmapError(f"unknown colormap {cmap!r} (any matplotlib colormap name, e.g. jet, viridis)") from e


def overlay_heatmap(
    thumbnail: np.ndarray,
    thumb_downsample: float,
    coords: np.ndarray,
    patch_size_level0: float,
    scores: np.ndarray,
    cmap: str = "jet",
    alpha: float = 0.5,
    normalize: str = "rank",
) -> np.ndarray:
    """Blend tile colours into the thumbnail; returns [h, w, 3] uint8 (pixels without a tile unchanged).

    Tiles are painted in increasing score order, so where tiles overlap the higher score is on top.
    """
    thumb = np.asarray(thumbnail)
    if thumb.ndim != 3 or thumb.shape[2] != 3 or thumb.dtype != np.uint8:
        raise HeatmapError(f"overlay: thumbnail must be [h, w, 3] uint8, got {thumb.shape} {thumb.dtype}")
    s = np.asarray(scores).reshape(-1)
    c = np.asarray(coords).reshape(-1, 2)
    if s.shape[0] != c.shape[0]:
        raise HeatmapError(f"overlay: {c.shape[0]} coords but {s.shape[0]} scores")
    if not 0.0 <= alpha <= 1.0:
        raise HeatmapError(f"overlay: alpha must be in [0, 1], got {alpha}")
    norm = normalize_scores(s, normalize)  # [N] in [0, 1]
    colours = (_colormap(cmap)(norm)[:, :3] * 255.0).astype(np.float32)  # [N, 3]
    boxes = tile_boxes_thumb(c, patch_size_level0, thumb_downsample, thumb.shape[:2])
    paint = np.zeros(thumb.shape, np.float32)  # [h, w, 3]
    covered = np.zeros(thumb.shape[:2], bool)  # [h, w]
    for i in np.argsort(norm, kind="stable"):
        x0, y0, x1, y1 = boxes[i]
        paint[y0:y1, x0:x1] = colours[i]
        covered[y0:y1, x0:x1] = True
    out = thumb.astype(np.float32)
    out[covered] = (1.0 - alpha) * out[covered] + alpha * paint[covered]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


_NORM_LABEL = {"rank": "score rank within slide", "minmax": "score (min-max within slide)", "none": "score"}


def render_heatmap(
    thumbnail: np.ndarray,
    thumb_downsample: float,
    coords: np.ndarray,
    patch_size_level0: float,
    scores: np.ndarray,
    out_png: str | Path,
    cmap: str = "jet",
    alpha: float = 0.5,
    title: str | None = None,
    normalize: str = "rank",
    dpi: int = 100,
) -> np.ndarray:
    """Write a PNG: the thumbnail with tile scores painted on it, a colour bar and a title.

    Returns the blended image [h, w, 3] uint8 (what :func:`overlay_heatmap` gives). The PNG is written
    to a temporary name and renamed, so a reader never sees a half-written file.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    blended = overlay_heatmap(thumbnail, thumb_downsample, coords, patch_size_level0, scores, cmap, alpha, normalize)
    h, w = blended.shape[:2]
    width_in = max(4.0, min(16.0, w / dpi)) + 1.2
    height_in = max(3.0, width_in * h / (w + 1.2 * dpi)) + (0.4 if title else 0.0)
    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(blended, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)
    sm = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=_colormap(cmap))
    cbar = fig.colorbar(sm, ax=ax, fraction=0.04, pad=0.02)
    cbar.set_label(_NORM_LABEL[normalize])
    out = Path(out_png)
    with atomic_output(out) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    log.info("heatmap written: %s (%d tiles)", out, len(np.asarray(scores).reshape(-1)))
    return blended


# ---------------------------------------------------------------------------------------- exports
def write_tile_scores(
    csv_path: str | Path | None,
    geojson_path: str | Path | None,
    coords: np.ndarray,
    patch_size_level0: float,
    scores: np.ndarray,
    slide_id: str,
    cmap: str = "jet",
    normalize: str = "rank",
    n_bins: int = 10,
) -> None:
    """Write tile scores as CSV (``slide_id,x,y,width,height,score``) and/or GeoJSON for QuPath.

    The GeoJSON is a ``FeatureCollection`` of square ``Polygon`` tiles in level-0 pixel coordinates
    (QuPath's image coordinates), each with ``properties``: ``objectType: "tile"``,
    ``classification {name: "attention NN", color: [r, g, b]}`` where NN is the score's per-slide
    bin (01 = lowest tenth .. 10 = highest, coloured with ``cmap``), and
    ``measurements {"score": raw, "score_normalized": 0..1}``. Either path may be None.
    """
    c = np.asarray(coords).reshape(-1, 2)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.shape[0] != c.shape[0]:
        raise HeatmapError(f"write_tile_scores: {c.shape[0]} coords but {s.shape[0]} scores")
    if patch_size_level0 <= 0:
        raise HeatmapError(f"write_tile_scores: patch_size_level0 must be positive, got {patch_size_level0}")
    size = int(round(patch_size_level0))
    if csv_path is not None:
        with atomic_output(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            wr = csv.writer(fh)
            wr.writerow(["slide_id", "x", "y", "width", "height", "score"])
            for (x, y), v in zip(c.tolist(), s.tolist()):
                wr.writerow([slide_id, int(x), int(y), size, size, repr(float(v))])
    if geojson_path is not None:
        norm = normalize_scores(s, normalize)  # [N]
        bins = np.minimum((norm * n_bins).astype(int), n_bins - 1) + 1  # [N] 1..n_bins
        colour_map = _colormap(cmap)
        features = []
        for (x, y), v, u, b in zip(c.tolist(), s.tolist(), norm.tolist(), bins.tolist()):
            x, y = int(x), int(y)
            rgb = [int(round(255 * t)) for t in colour_map((b - 0.5) / n_bins)[:3]]
            ring = [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]
            features.append({
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "tile",
                    "name": f"{slide_id} ({x},{y})",
                    "classification": {"name": f"attention {b:02d}", "color": rgb},
                    "measurements": {"score": float(v), "score_normalized": float(u)},
                },
            })
        doc = {"type": "FeatureCollection", "features": features}
        atomic_write_text(Path(geojson_path), json.dumps(doc))


# ------------------------------------------------------------------------------------- one slide
@dataclass(frozen=True)
class SlideHeatmap:
    """What :func:`slide_heatmap` computed and wrote for one slide."""

    slide_id: str
    scores: np.ndarray  # [N] raw attention scores
    coords: np.ndarray  # [N, 2] level-0 (x, y)
    patch_size_level0: float
    png: Path
    csv: Path | None
    geojson: Path | None


def bag_patch_size_level0(bag: Any) -> float:
    """Tile side in level-0 pixels from a bag's coords attributes (``patch_size_level0``, or
    ``patch_size`` x 2**``patch_level`` for CLAM files that lack it)."""
    ca = bag.coords_attrs
    if "patch_size_level0" in ca:
        return float(ca["patch_size_level0"])
    if "patch_size" in ca and int(ca.get("patch_level", 0)) == 0:
        return float(ca["patch_size"])
    raise HeatmapError(f"{bag.path}: coords attributes have no patch_size_level0 (found {sorted(ca)})")


def slide_heatmap(
    model: Any,
    bag_path: str | Path,
    slide_path: str | Path,
    out_png: str | Path,
    thumb_mpp: float | None = None,
    level: int | None = None,
    max_side: int = 2048,
    csv_path: str | Path | None = None,
    geojson_path: str | Path | None = None,
    device: str | Any = "cpu",
    cmap: str = "jet",
    alpha: float = 0.5,
    normalize: str = "rank",
    title: str | None = None,
    thumbnail: tuple[np.ndarray, float] | None = None,
) -> SlideHeatmap:
    """Attention of ``model`` on the bag at ``bag_path`` painted over ``slide_path``'s thumbnail.

    The thumbnail is ``thumbnail`` = ``(rgb [h, w, 3] uint8, level-0 px per thumbnail px)`` when given (read
    by the caller, e.g. through preprocessing's readers), else read by :func:`read_thumbnail` as chosen by
    ``thumb_mpp`` / ``level`` / ``max_side``. CSV / GeoJSON tile tables are written when their paths are given.
    A bag with NaN/inf features raises ``BagError`` naming it.
    """
    from wsi_ncmi.data.bags import check_finite_features, read_bag

    bag = read_bag(bag_path)
    in_dim = getattr(model, "in_dim", None)
    feats = np.asarray(bag.features)  # [N, D]
    if in_dim is not None and feats.shape[1] != in_dim:
        raise HeatmapError(f"{bag_path}: features have dim {feats.shape[1]} but the model expects {in_dim}")
    check_finite_features(bag_path, feats)
    ps0 = bag_patch_size_level0(bag)
    scores = attention_scores(model, feats, device)  # [N]
    if thumbnail is None:
        thumb, ds = read_thumbnail(slide_path, mpp=thumb_mpp, level=level, max_side=max_side)
    else:
        thumb, ds = thumbnail
    if title is None:
        title = f"{bag.slide_id}: attention ({normalize}-normalised, {len(scores)} tiles)"
    render_heatmap(thumb, ds, bag.coords, ps0, scores, out_png, cmap=cmap, alpha=alpha, title=title,
                   normalize=normalize)
    if csv_path is not None or geojson_path is not None:
        write_tile_scores(csv_path, geojson_path, bag.coords, ps0, scores, bag.slide_id, cmap=cmap, normalize=normalize)
    return SlideHeatmap(bag.slide_id, scores, np.asarray(bag.coords), ps0, Path(out_png),
                        None if csv_path is None else Path(csv_path),
                        None if geojson_path is None else Path(geojson_path))
