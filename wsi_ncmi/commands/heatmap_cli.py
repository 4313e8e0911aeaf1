"""`wsi-ncmi heatmap`: a trained aggregator's attention over one slide, as PNG (+ CSV / GeoJSON tiles).

    wsi-ncmi heatmap --ckpt runs/abmil_ce/checkpoints/best.ckpt --slide slides/A.svs \\
        --bag features/bags/A.h5 --out heatmaps/A.png --mpp 8 --geojson --csv

``--geojson`` / ``--csv`` without a value write next to the PNG (``A.geojson``, ``A.tiles.csv``);
the GeoJSON opens in QuPath (File > Import objects) as tiles classified into score tenths.
Scores are normalised per slide (``--normalize rank``, the default, or ``minmax`` / ``none``).

The slide is opened exactly as ``wsi-preprocess`` opens it (``preprocessing.readers.open_slide``: OpenSlide
formats, plain stripped TIFFs, png/jpg) and its pixel size is the one the bag records (``slide_mpp``: the file's
plausible mpp or the ``--mpp-csv`` value used at extraction); only bags without it fall back to the file's mpp
under preprocessing's plausibility rule (a 72-dpi TIFF has none). Before drawing, the bag is checked against the
slide: its ``slide_id`` must be the slide's file name, its recorded ``source_size`` the file's size, and its
tiles must lie inside the slide; a mismatch is refused unless ``--allow-slide-mismatch``. The checkpoint is read
with ``weights_only=True``. Errors are one line on stderr, exit code 2; nothing is written then.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["build_parser", "check_bag_matches_slide", "main", "read_slide_thumbnail", "recorded_mpp"]

logger = logging.getLogger(__name__)

_AUTO = "auto"


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsi-ncmi heatmap", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="MILModule checkpoint (best.ckpt / last.ckpt)")
    p.add_argument("--slide", required=True, help="the slide file the bag was extracted from")
    p.add_argument("--bag", required=True, help="the slide's HDF5 bag")
    p.add_argument("--out", required=True, help="output PNG")
    res = p.add_mutually_exclusive_group()
    res.add_argument("--mpp", type=float, help="thumbnail resolution in um/px (uses the mpp the bag records, "
                     "else the slide's)")
    res.add_argument("--level", type=int, help="use this pyramid level as the thumbnail")
    p.add_argument("--max-side", type=int, default=2048, help="thumbnail size when neither --mpp nor --level")
    p.add_argument("--geojson", nargs="?", const=_AUTO, help="also write tiles as GeoJSON (QuPath)")
    p.add_argument("--csv", nargs="?", const=_AUTO, help="also write tiles as CSV (slide_id,x,y,width,height,score)")
    p.add_argument("--normalize", default="rank", choices=("rank", "minmax", "none"))
    p.add_argument("--cmap", default="jet", help="matplotlib colormap")
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the tile colours")
    p.add_argument("--title", help="figure title (default: slide id and tile count)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--allow-slide-mismatch", action="store_true",
                   help="draw the bag even if its slide_id / source size / tiles do not match --slide")
    return p


def recorded_mpp(bag: Any) -> float | None:
    """The slide mpp the bag was extracted with (``slide_mpp`` root attribute), or None (e.g. CLAM files)."""
    try:
        value = float(bag.attrs.get("slide_mpp"))
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def check_bag_matches_slide(bag: Any, slide: Path, dimensions: tuple[int, int], patch_size_level0: float) -> None:
    """Raise ``HeatmapError`` when the bag was not extracted from ``slide``: another ``slide_id`` (the slide's file
    name), another recorded ``source_size``, or tiles outside the slide's level-0 ``dimensions``."""
    from preprocessing.readers import slide_id_of
    from wsi_ncmi.evaluation.heatmap import HeatmapError

    problems = []
    if str(bag.slide_id) != slide_id_of(slide):
        problems.append(f"its slide_id is {bag.slide_id!r}, the slide's is {slide_id_of(slide)!r}")
    size = bag.attrs.get("source_size")
    if size is not None and int(size) > 0 and int(size) != slide.stat().st_size:
        problems.append(f"it records a source of {int(size)} bytes, the slide has {slide.stat().st_size}")
    coords = np.asarray(bag.coords).reshape(-1, 2)  # [N, 2] level-0 (x, y)
    w0, h0 = dimensions
    outside = int(((coords[:, 0] >= w0) | (coords[:, 1] >= h0) | (coords + patch_size_level0 <= 0).any(1)).sum())
    if outside:
        problems.append(f"{outside} of {len(coords)} tiles lie outside the slide's {w0}x{h0} px")
    if problems:
        source = bag.attrs.get("source_path")
        raise HeatmapError(
            f"--bag {bag.path} does not belong to --slide {slide}"
            f"{f' (it was extracted from {source})' if source else ''}: {'; '.join(problems)}; "
            "pass the slide's own bag, or --allow-slide-mismatch to draw it anyway"
        )


def read_slide_thumbnail(reader: Any, mpp: float | None = None, level: int | None = None,
                         max_side: int = 2048) -> tuple[np.ndarray, float]:
    """``(rgb [h, w, 3] uint8, level-0 px per thumbnail px)`` of a ``preprocessing.readers`` slide: one whole
    pyramid ``level``, or resampled to ``mpp`` µm/px (``reader.mpp`` must be known) or to ``max_side`` px."""
    from wsi_ncmi.evaluation.heatmap import HeatmapError, check_thumbnail_size

    w0, h0 = reader.dimensions
    if level is not None:
        if not 0 <= level < reader.level_count:
            raise HeatmapError(f"--level {level}: {reader.path} has levels 0..{reader.level_count - 1}")
        w, h = reader.level_dimensions[level]
        check_thumbnail_size(reader.path, w, h)
        return reader.read_region((0, 0), level, (w, h)), w0 / w
    if mpp is not None:
        if mpp <= 0:
            raise HeatmapError(f"--mpp must be positive, got {mpp}")
        if reader.mpp is None:
            rejected = getattr(reader, "mpp_rejected", "")
            raise HeatmapError(f"--mpp {mpp}: {reader.path} has no pixel size (mpp)"
                               f"{'; rejected ' + rejected if rejected else ''} and the bag records none; "
                               "use --level or --max-side")
        ds = float(mpp) / float(reader.mpp)
    else:
        ds = max(1.0, max(w0, h0) / max(1, max_side))
    check_thumbnail_size(reader.path, max(1, round(w0 / ds)), max(1, round(h0 / ds)))
    rgb, exact, _ = reader.read_level_scaled(ds)  # unreadable pieces stay white (logged by the reader)
    return rgb, exact


def _side_path(value: str | None, png: Path, suffix: str) -> Path | None:
    if value is None:
        return None
    return png.with_suffix(suffix) if value == _AUTO else Path(value)


def _user_errors() -> tuple[type[BaseException], ...]:
    from preprocessing.readers import SlideError
    from wsi_ncmi.data.bags import BagError
    from wsi_ncmi.data.outputs import OutputError
    from wsi_ncmi.evaluation.heatmap import HeatmapError
    from wsi_ncmi.models import MILInputError
    from wsi_ncmi.training.checkpoint import CheckpointError

    return HeatmapError, BagError, CheckpointError, SlideError, MILInputError, OutputError


def _run(args: argparse.Namespace) -> list[str]:
    """Draw the heatmap; return the lines to print."""
    from preprocessing.readers import open_slide
    from wsi_ncmi.data.bags import read_bag
    from wsi_ncmi.evaluation.heatmap import bag_patch_size_level0, slide_heatmap
    from wsi_ncmi.training.checkpoint import load_mil_module

    out, slide = Path(args.out), Path(args.slide)
    model = load_mil_module(args.ckpt, args.device)[0].model
    bag = read_bag(args.bag, lazy=True)
    mpp = recorded_mpp(bag)
    with open_slide(slide, mpp=mpp) as reader:
        if not args.allow_slide_mismatch:
            check_bag_matches_slide(bag, slide, reader.dimensions, bag_patch_size_level0(bag))
        thumb = read_slide_thumbnail(reader, mpp=args.mpp, level=args.level, max_side=args.max_side)
        slide_mpp = reader.mpp
    result = slide_heatmap(
        model, args.bag, slide, out, csv_path=_side_path(args.csv, out, ".tiles.csv"),
        geojson_path=_side_path(args.geojson, out, ".geojson"), device=args.device, cmap=args.cmap,
        alpha=args.alpha, normalize=args.normalize, title=args.title, thumbnail=thumb,
    )
    h, w = thumb[0].shape[:2]
    at = f", {slide_mpp * thumb[1]:.3g} um/px" if slide_mpp else ""
    lines = [f"heatmap: {result.png} ({len(result.scores)} tiles of slide {result.slide_id}; thumbnail {w}x{h} px, "
             f"downsample {thumb[1]:.4g}{at})"]
    lines += [f"{label}: {path}" for label, path in (("tiles csv", result.csv), ("geojson", result.geojson))
              if path is not None]
    return lines



def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("ckpt", "slide", "bag"):
        path = Path(getattr(args, name))
        if not path.is_file():
            why = "is a folder; give the file" if path.is_dir() else "no such file"
            sys.stderr.write(f"wsi-ncmi heatmap: error: --{name} {path}: {why}\n")
            return 2
    from wsi_ncmi.commands.errors import one_line, write_failure

    try:
        from wsi_ncmi.data.outputs import check_output_file

        check_output_file(args.out, "--out")  # not a folder, its folder writable: before any work
        lines = _run(args)
    except _user_errors() as e:
        sys.stderr.write(f"wsi-ncmi heatmap: error: {one_line(e)}\n")
        return 2
    except OSError as e:  # disk full, read-only, ... while writing --out
        line = write_failure(e, f"--out {args.out}")
        if line is None:
            raise
        sys.stderr.write(f"wsi-ncmi heatmap: error: {line}\n")
        return 2
    for line in lines:
        _say(line)
    return 0
