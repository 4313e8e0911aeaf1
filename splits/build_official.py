"""Regenerate the official split tables and README in this folder from the reference slide lists.

    python splits/build_official.py [--camelyon17 CSV] [--bracs CSV] [--out DIR]

Defaults: ``../shared/reference/{camelyon17,bracs}_slides.csv`` next to the repository, output here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wsi_ncmi.data.official import write_official

HERE = Path(__file__).resolve().parent
REFERENCE = HERE.parent.parent / "shared" / "reference"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--camelyon17", type=Path, default=REFERENCE / "camelyon17_slides.csv")
    parser.add_argument("--bracs", type=Path, default=REFERENCE / "bracs_slides.csv")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    names = (f"../shared/reference/{args.camelyon17.name}", f"../shared/reference/{args.bracs.name}")
    for path in write_official(args.out, args.camelyon17, args.bracs, source_names=names):
        sys.stdout.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
