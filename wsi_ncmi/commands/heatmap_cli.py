"""`wsi-ncmi heatmap`: a trained aggregator's attention over one slide, as PNG (+ CSV / GeoJSON tiles).

    wsi-ncmi heatmap --ckpt runs/abmil_ce/checkpoints/best.ckpt --slide slides/A.svs \\
        --bag features/bags/A.h5 --out heatmaps/A.png --mpp 8 --geojson --csv

``--geojson`` / ``--csv`` without a value write next to the PNG (``A.geojson``, ``A.tiles.csv``);
the GeoJSON opens in QuPath (File > Import objects) as tiles classified into score tenths.
Scores are normalised per slide (``--normalize rank``, the default, or ``minmax`` / ``none``).

The slide is opened exactly as ``wsi-preprocess`` opens it (``preprocessing.readers.open_slide``: OpenSlide
formats, OME-TIFF, CZI, plain stripped TIFFs, png/jpg, and a DICOM WSI folder, given as the folder or as one of
its ``.dcm`` files) and its pixel size is the one the bag records (``slide_mpp``: the file's plausible mpp or the
``--mpp-csv`` value used at extraction); only bags without it fall back to the file's mpp under preprocessing's
plausibility rule (a 72-dpi TIFF has none). Before drawing, the bag is checked against the slide: its
``slide_id`` must be the slide's id (file name, or folder name), its recorded ``source_size`` the slide's size as
preprocessing computes it (``preprocessing.plan.source_stat``: a folder's summed file sizes), and its tiles must
lie inside the slide; a mismatch is refused unless ``--allow-slide-mismatch``. The checkpoint is read
with ``weights_only=True``. Errors are one line on stderr, exit code 2; nothing is written then.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from wsi_ncmi.errors import UserError

__all__ = ["build_parser", "main", "slide_path"]

logger = logging.getLogger(__name__)

_AUTO = "auto"


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsi-ncmi heatmap", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="MILModule checkpoint (best.ckpt / last.ckpt)")
    p.add_argument("--slide", required=True, help="the slide the bag was extracted from: a file, or a DICOM WSI folder "
                   "(or one of its .dcm files)")
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


def _side_path(value: str | None, png: Path, suffix: str) -> Path | None:
    if value is None:
        return None
    return png.with_suffix(suffix) if value == _AUTO else Path(value)


def slide_path(path: Path) -> Path:
    """The slide ``--slide`` names: a file, a slide folder, or the folder of a slide-folder file (a ``.dcm``
    instance names its DICOM WSI folder, as ``preprocessing.readers.slide_id_of`` names its id)."""
    from preprocessing.readers import FOLDER_READERS

    return path.parent if path.is_file() and path.suffix.lower() in FOLDER_READERS else path


def _run(args: argparse.Namespace) -> list[str]:
    """Draw the heatmap; return the lines to print."""
    from preprocessing.plan import source_stat
    from preprocessing.readers import open_slide, slide_id_of
    from wsi_ncmi.data.bags import read_bag
    from wsi_ncmi.evaluation.heatmap import bag_patch_size_level0, slide_heatmap
    from wsi_ncmi.evaluation.heatmap_slide import check_bag_matches_slide, read_slide_thumbnail, recorded_mpp
    from wsi_ncmi.training.checkpoint import load_mil_module

    out, slide = Path(args.out), slide_path(Path(args.slide))
    model = load_mil_module(args.ckpt, args.device)[0].model
    bag = read_bag(args.bag, lazy=True)
    mpp = recorded_mpp(bag)
    with open_slide(slide, mpp=mpp) as reader:
        if not args.allow_slide_mismatch:
            check_bag_matches_slide(bag, slide, slide_id_of(slide), reader.dimensions, bag_patch_size_level0(bag),
                                    source_stat(slide)[0])
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
        if not path.is_file() and not (name == "slide" and path.is_dir()):  # a slide may be a folder (DICOM WSI)
            why = "is a folder; give the file" if path.is_dir() else "no such file"
            sys.stderr.write(f"wsi-ncmi heatmap: error: --{name} {path}: {why}\n")
            return 2
    from wsi_ncmi.commands.errors import one_line, write_failure

    try:
        from wsi_ncmi.data.outputs import check_output_file

        check_output_file(args.out, "--out")  # not a folder, its folder writable: before any work
        lines = _run(args)
    except UserError as e:
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
