"""``wsi-preprocess``: slides folder → tissue → tiles at an exact mpp → encoder features → HDF5 bags.

Flags and ``--config`` YAML keys are the fields of :class:`preprocessing.config.PreprocessConfig`;
flags given on the command line override the YAML.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields

from .config import ConfigError, PreprocessConfig, load_yaml

_HELP = {
    "input": "folder searched recursively for svs/tif/tiff/ndpi/mrxs/scn/bif (and png/jpg with --mpp-csv)",
    "output": "output folder: bags/, thumbnails/, manifest.csv, locks/",
    "target_mpp": "µm per pixel of the tiles (default 0.5)",
    "patch_size": "tile side in pixels at --target-mpp (default 256)",
    "overlap": "overlap between neighbouring tiles in pixels (default 0)",
    "encoder": "resnet50_trunc, mobilenet_v2_tv or any timm model name",
    "weights": "local .safetensors/.pth file, or 'random' (nothing is downloaded)",
    "workers": "DataLoader worker processes reading slides (0: in the main process)",
    "device": "cuda, cpu or auto",
    "precision": "autocast precision on CUDA: bf16, fp16 or fp32 (CPU always runs fp32)",
    "features_dtype": "dtype of the stored features: float16 (default) or float32",
    "min_tissue": "keep tiles whose tissue fraction is at least this (default 0.1)",
    "tissue_method": "otsu (default) or fixed saturation threshold",
    "mpp_csv": "CSV with columns slide_id,mpp; overrides the files' mpp",
    "slides": "CSV with a slide_id (or path) column: process only these",
    "shard": "i/n: process the i-th (0-based) of n interleaved parts of the sorted slide list",
    "stages": "comma list of seg,tile,extract",
    "overwrite": "redo slides even if their bag is up to date",
    "fail_fast": "stop at the first unreadable / failed / mpp-less slide",
    "lock_timeout": "seconds after which another process's lock counts as stale",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsi-preprocess", description=__doc__.splitlines()[0],
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="YAML file with the same keys as the flags")
    p.add_argument("-v", "--verbose", action="count", default=0)
    for f in fields(PreprocessConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
        if kind == "bool":
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=_HELP.get(f.name))
        else:
            conv = {"int": int, "float": float}.get(kind, str)
            p.add_argument(flag, dest=f.name, type=conv, help=_HELP.get(f.name))
    return p


def config_from_args(argv: list[str] | None) -> tuple[PreprocessConfig, int]:
    ns = vars(build_parser().parse_args(argv))
    verbose = ns.pop("verbose", 0)
    values = load_yaml(ns.pop("config")) if "config" in ns else {}
    values.update(ns)  # flags override the YAML
    return PreprocessConfig(**values).validate(), verbose


def main(argv: list[str] | None = None) -> int:
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
    print(result.summary())
    if result.locked:
        print(f"{len(result.locked)} slide(s) were being processed by another process")
    failed = sum(s in ("error", "unreadable") for s in result.statuses.values())
    return 1 if failed and cfg.fail_fast else 0


if __name__ == "__main__":
    sys.exit(main())
