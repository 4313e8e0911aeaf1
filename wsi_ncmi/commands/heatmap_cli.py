"""`wsi-ncmi heatmap`: a trained aggregator's attention over one slide, as PNG (+ CSV / GeoJSON tiles).

    wsi-ncmi heatmap --ckpt runs/abmil_ce/checkpoints/best.ckpt --slide slides/A.svs \\
        --bag features/bags/A.h5 --out heatmaps/A.png --mpp 8 --geojson --csv

``--geojson`` / ``--csv`` without a value write next to the PNG (``A.geojson``, ``A.tiles.csv``);
the GeoJSON opens in QuPath (File > Import objects) as tiles classified into score tenths.
Scores are normalised per slide (``--normalize rank``, the default, or ``minmax`` / ``none``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "load_mil_model", "main"]

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
    res.add_argument("--mpp", type=float, help="thumbnail resolution in um/px (the slide must report an mpp)")
    res.add_argument("--level", type=int, help="use this pyramid level as the thumbnail")
    p.add_argument("--max-side", type=int, default=2048, help="thumbnail size when neither --mpp nor --level")
    p.add_argument("--geojson", nargs="?", const=_AUTO, help="also write tiles as GeoJSON (QuPath)")
    p.add_argument("--csv", nargs="?", const=_AUTO, help="also write tiles as CSV (slide_id,x,y,width,height,score)")
    p.add_argument("--normalize", default="rank", choices=("rank", "minmax", "none"))
    p.add_argument("--cmap", default="jet", help="matplotlib colormap")
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the tile colours")
    p.add_argument("--title", help="figure title (default: slide id and tile count)")
    p.add_argument("--device", default="cpu")
    return p


def load_mil_model(ckpt: str | Path, device: str = "cpu") -> Any:
    """The aggregator of a ``MILModule`` checkpoint (loaded with ``weights_only=True``), in eval mode."""
    from wsi_ncmi.training import MILModule

    module = MILModule.load_from_checkpoint(str(ckpt), map_location="cpu", weights_only=True)
    return module.model.to(device).eval()


def _side_path(value: str | None, png: Path, suffix: str) -> Path | None:
    if value is None:
        return None
    return png.with_suffix(suffix) if value == _AUTO else Path(value)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from wsi_ncmi.data.bags import BagError
    from wsi_ncmi.evaluation.heatmap import HeatmapError, slide_heatmap

    for name in ("ckpt", "slide", "bag"):
        if not Path(getattr(args, name)).is_file():
            sys.stderr.write(f"wsi-ncmi heatmap: error: --{name} {getattr(args, name)}: no such file\n")
            return 2
    out = Path(args.out)
    try:
        model = load_mil_model(args.ckpt, args.device)
        result = slide_heatmap(
            model, args.bag, args.slide, out, thumb_mpp=args.mpp, level=args.level, max_side=args.max_side,
            csv_path=_side_path(args.csv, out, ".tiles.csv"), geojson_path=_side_path(args.geojson, out, ".geojson"),
            device=args.device, cmap=args.cmap, alpha=args.alpha, normalize=args.normalize, title=args.title,
        )
    except (HeatmapError, BagError) as e:
        sys.stderr.write(f"wsi-ncmi heatmap: error: {e}\n")
        return 2
    _say(f"heatmap: {result.png} ({len(result.scores)} tiles of slide {result.slide_id})")
    for label, path in (("tiles csv", result.csv), ("geojson", result.geojson)):
        if path is not None:
            _say(f"{label}: {path}")
    return 0
