"""``wsi-preprocess``: slides folder → tissue → tiles at an exact mpp → encoder features → HDF5 bags.

Flags and ``--config`` YAML keys are the fields of :class:`preprocessing.config.PreprocessConfig`;
flags given on the command line override the YAML.

Exit codes: 0 every slide ok / no_tissue / skipped; 3 at least one slide ended error, unreadable or
mpp_missing (the summary is printed first; details in OUT/manifest.csv); 2 invalid flags or config;
1 the run could not start (e.g. missing weights, bad --mpp-csv, no slides in --input, --output not a folder).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields

from .config import ConfigError, PreprocessConfig, load_yaml

EXIT_SLIDES_FAILED = 3

_HELP = {
    "input": "folder searched recursively for svs/tif/tiff/ndpi/mrxs/scn/bif (and png/jpg with --mpp-csv)",
    "output": "output folder: bags/, thumbnails/, manifest.csv, locks/",
    "target_mpp": "µm per pixel of the tiles (default 0.5)",
    "patch_size": "tile side in pixels at --target-mpp (default 256)",
    "overlap": "overlap between neighbouring tiles in pixels (default 0)",
    "encoder": "resnet50_trunc, mobilenet_v2_tv, a preset (--list-encoders) or any timm model name",
    "weights": "local .safetensors/.pth/.bin state dict, or 'random' (nothing is downloaded)",
    "encoder_kwargs": "JSON object passed to timm.create_model, e.g. '{\"init_values\": 1e-5}'",
    "mean": "normalisation mean R G B on the 0..1 scale (default: the encoder's)",
    "std": "normalisation std R G B on the 0..1 scale (default: the encoder's)",
    "input_size": "side the tiles are resized to on the device (0: no resize; default: the encoder's)",
    "compile": "torch.compile the encoder (CUDA; first batches are slower while it compiles)",
    "workers": "DataLoader worker processes reading slides (0: in the main process)",
    "device": "cuda, cpu or auto",
    "devices": "several devices, one encoder process each over the shared slide queue: '0,1,2,3', 'all' (every "
               "visible GPU) or 'cpu,cpu'; --workers is split between them",
    "read_path": "fast (default): tiles that are an exact 2/4/8x reduction of a JPEG level are decoded at that "
                 "scale in the DCT domain (1.2-1.3x cheaper per tile, mean pixel difference < 1 level); exact: decode full "
                 "size + INTER_AREA resize (bit-identical to OpenSlide + resize)",
    "jpeg_decode": "cpu (default): the readers decode every tile; device: tiles whose read is a region of whole "
                   "JPEG tiles (e.g. 512-px reads of 256-px tiles, 0.25 -> 0.5 µm/px) are sent undecoded and decoded "
                   "in the encoder process on --device (nvJPEG on CUDA, libjpeg-turbo on CPU), full size + area "
                   "average (on CPU bit-identical to --read-path exact); the readers then only read bytes",
    "precision": "autocast precision on CUDA: bf16, fp16 or fp32 (default: the preset's published one, else "
                 "bf16; CPU always runs fp32)",
    "features_dtype": "dtype of the stored features: float16 (default) or float32",
    "min_tissue": "keep tiles whose tissue fraction is at least this (default 0.1)",
    "tissue_method": "otsu (default) or fixed saturation threshold",
    "mpp_csv": "CSV with columns slide_id,mpp; overrides the files' mpp",
    "slides": "CSV with a slide_id (or path) column: process only these",
    "shard": "i/n: process the i-th (0-based) of n interleaved parts of the sorted slide list",
    "tissue_threshold": "saturation threshold (0-255) for --tissue-method fixed; floor for otsu (default 8)",
    "seg_mpp": "µm/px of the thumbnail tissue is segmented on (default 8)",
    "mpp_tolerance": "allowed relative difference between tile pixel size and --target-mpp (default 0.05)",
    "max_side_px": "refuse slides whose level 0 is wider or taller than this (default 500000; a corrupt or "
                   "hostile header)",
    "max_gigapixels": "refuse slides whose level 0 has more pixels than this many billion (default 100)",
    "stages": "comma list of seg,tile,extract; 'seg,tile' writes coords/<id>.h5 and thumbnails, a later "
              "'extract' run reuses those coords when the tiling settings and slide file are unchanged",
    "overwrite": "redo slides even if their bag is up to date",
    "fail_fast": "stop at the first unreadable / failed / mpp-less slide (exit code 3)",
    "lock_timeout": "seconds after which another process's lock counts as stale",
}


_EPILOG = """exit codes:
  0  every slide ended ok, no_tissue or skipped (up to date / locked by another process)
  1  the run could not start (missing or bad weights, bad --mpp-csv / --slides file, no slides found
     in --input, --output not a folder, ...)
  2  invalid flags or config file
  3  at least one slide ended error, unreadable or mpp_missing (see OUT/manifest.csv)"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsi-preprocess", description=__doc__.splitlines()[0],
                                argument_default=argparse.SUPPRESS, epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file with the same keys as the flags")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("--list-encoders", action="store_true", default=False,
                   help="print every encoder preset (architecture, dim, pooling, mean/std, input size, "
                        "interpolation, crop, precision, recommended tile px and µm/px, licence) and exit")
    p.add_argument("--json", action="store_true", default=False, help="with --list-encoders: one JSON document")
    for f in fields(PreprocessConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
        kind = kind.replace(" | None", "")
        if kind == "bool":
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=_HELP.get(f.name))
        elif kind == "list[float]":
            p.add_argument(flag, dest=f.name, type=float, nargs=3, metavar=("R", "G", "B"), help=_HELP.get(f.name))
        else:
            conv = {"int": int, "float": float}.get(kind, str)
            p.add_argument(flag, dest=f.name, type=conv, help=_HELP.get(f.name))
    return p


_LIST_COLUMNS = ("name", "arch", "embed_dim", "pooling", "mean", "std", "input_size", "resize", "crop", "interpolation",
                 "precision", "tile_px", "mpp")


def list_encoders(as_json: bool) -> str:
    """The preset table (``--list-encoders``): aligned text, or JSON (``--json``) with every field."""
    import json

    from .encoder_specs import ENCODERS
    from .presets import preset_rows

    rows = preset_rows()
    if as_json:
        return json.dumps({"presets": rows, "registered": sorted(ENCODERS),
                           "timm": "any other name is timm.create_model(name); mean/std/input size from timm's "
                                   "pretrained config"}, indent=2)

    def cell(v: object) -> str:
        if isinstance(v, list):
            return "(" + ", ".join(f"{x:g}" for x in v) + ")"
        return "-" if v is None else str(v)

    table = [list(_LIST_COLUMNS)] + [[cell(r[c]) for c in _LIST_COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(_LIST_COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table]
    lines += ["", f"also: {', '.join(sorted(ENCODERS))}, or any timm model name (mean/std/input size from timm's "
                  "pretrained config). Weights: bring the authors' files (--weights); licences: --list-encoders --json"]
    return "\n".join(lines)


def config_from_args(argv: list[str] | None) -> tuple[PreprocessConfig, int]:
    ns = vars(build_parser().parse_args(argv))
    verbose = ns.pop("verbose", 0)
    ns.pop("list_encoders", None)
    ns.pop("json", None)
    values = load_yaml(ns.pop("config")) if "config" in ns else {}
    values.update(ns)  # flags override the YAML
    return PreprocessConfig(**values).validate(), verbose


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.list_encoders:
        print(list_encoders(ns.json))
        return 0
    try:
        cfg, verbose = config_from_args(argv)
    except ConfigError as e:
        print(f"wsi-preprocess: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .extract import run

    try:
        result = run(cfg)
    except ValueError as e:  # our errors are ValueError subclasses naming the file / flag
        print(f"wsi-preprocess: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a write the run could not do (a full disk is handled per slide, this is the rest)
        where = e.filename or cfg.output
        print(f"wsi-preprocess: error: {where}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(result.summary())
    if result.locked:
        print(f"{len(result.locked)} slide(s) were being processed by another process")
    if result.missing_source:
        gone = result.missing_source
        print(f"wsi-preprocess: warning: {len(gone)} slide(s) of {cfg.output}/manifest.csv have no source file any "
              f"more ({', '.join(gone[:5])}{', ...' if len(gone) > 5 else ''}); marked missing_source, bags kept",
              file=sys.stderr)
    failed = result.failed()
    for sid in failed[:5]:  # the first problems, each naming its file; all of them are in the manifest
        print(f"wsi-preprocess: {sid}: {result.statuses[sid]}: {result.messages.get(sid, '')}", file=sys.stderr)
    if failed:
        print(f"wsi-preprocess: {len(failed)} slide(s) failed ({', '.join(failed[:5])}"
              f"{', ...' if len(failed) > 5 else ''}); see {cfg.output}/manifest.csv", file=sys.stderr)
    if result.stopped:  # the last line says why the run stopped early
        print(f"wsi-preprocess: {result.stopped}", file=sys.stderr)
    return EXIT_SLIDES_FAILED if failed or result.stopped else 0


if __name__ == "__main__":
    sys.exit(main())
