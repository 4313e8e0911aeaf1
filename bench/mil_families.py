"""What the task families of the MIL benchmark look like (issue #23): per family × draw, the classes, slides,
bag sizes and witness counts, and for ``c17`` how hard its tile pool is per tile.

    python bench/mil_families.py                                  # every family, draw 0, CPU scales
    python bench/mil_families.py --families c17 --separability --out bench/results/mil_families.md

``--separability`` (``c17``): a cross-validated per-tile logistic regression tumour vs normal (all centres
pooled; should be far from 1.0, i.e. no single tile gives the label away) and a 5-way centre classifier on
normal tiles (accuracy, chance 0.2: the per-centre stain shift is real). Tuning draws only: held-out draws are
refused here as in the benchmark.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from families import FAMILIES  # noqa: E402
from families.guard import HeldOutError, choose_draws  # noqa: E402


def describe(name: str, draw: int, scale: float | None, work: Path) -> str:
    """One markdown row: family, draw, scale, protocols with class counts, slides, instances per bag, witnesses."""
    import pandas as pd

    from wsi_ncmi.data.bags import read_bag

    fam = FAMILIES[name]
    cohort = fam.make(draw, scale, out=work)
    table = pd.read_csv(next(iter(cohort.splits.values())))
    sizes = [len(read_bag(cohort.bags_dir / f"{s}.h5").features) for s in table["slide_id"][:50]]
    dim = read_bag(cohort.bags_dir / f"{table['slide_id'][0]}.h5").features.shape[1]
    protocols = ", ".join(f"{p} ({c})" for p, c in cohort.classes.items())
    counts = "/".join(str(c) for c in np.bincount(table["label"]))
    chose = {k: v for k, v in cohort.meta.items() if k in ("witness_digits", "witness_pools")}
    return (f"| {name} | {draw} | {cohort.scale:g} | {protocols} | {len(table)} ({counts}) | {dim} | "
            f"{int(np.min(sizes))}–{int(np.max(sizes))} | {json.dumps(chose) if chose else '—'} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--draws", nargs="+", type=int, default=[0])
    p.add_argument("--scale", type=float, default=None, help="bag-size scale (default: each family's CPU scale)")
    p.add_argument("--separability", action="store_true", help="c17: per-tile tumour AUC and centre classifier")
    p.add_argument("--work", default=str(ROOT / "bench" / "out" / "mil_benchmark" / "families"))
    p.add_argument("--out", default=None, help="write the markdown here")
    args = p.parse_args(argv)
    try:
        draws = choose_draws(args.draws, held_out=False)
    except HeldOutError as exc:
        print(f"mil_families: {exc}", file=sys.stderr)
        return 2
    work = Path(args.work)
    t0 = time.perf_counter()
    lines = ["| family | draw | scale | protocols (classes) | slides (per class) | width | instances per bag "
             "(first 50) | the draw chose |", "|---|---|---|---|---|---|---|---|"]
    lines += [describe(f, d, args.scale, work) for f in args.families for d in draws]
    if args.separability:
        from families.camelyon import separability
        from families.pools import load_pools

        s = separability(load_pools(work, ("c17_tiles",)))
        lines += ["", f"c17 tile pool: per-tile logistic regression tumour vs normal, 5-fold AUC "
                      f"{s['tile_tumour_auc']:.3f}; centre classifier on normal tiles: accuracy "
                      f"{s['centre_accuracy']:.3f} (chance 0.2), macro-AUC {s['centre_macro_auc']:.3f}."]
    lines += ["", f"({time.perf_counter() - t0:.0f} s wall)"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
