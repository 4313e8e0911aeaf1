"""`wsi-ncmi ncmi-metric`: NCMI vs top-1 over a set of image-classifier checkpoints (paper Figure 2).

``ncmi-metric --weights [ARCH=]FILE [...] --data DIR [--model ARCH]``: for each checkpoint, top-1 of its own
classifier and the dataset-level NCMI of its output probabilities; one markdown + CSV table, a scatter PNG
and the Pearson r between NCMI and top-1 over all of them. The argument parser and the output files; the
loading, scoring and data rules are :mod:`wsi_ncmi.natural.metric`.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
from pathlib import Path
from typing import Any

from wsi_ncmi.data.atomic import atomic_write_text
from wsi_ncmi.data.markdown import markdown_table
from wsi_ncmi.data.weights import resolve_device
from wsi_ncmi.natural.metric import (
    METRIC_DATA,
    NCMIMetricError,
    WeightSpec,
    metric_dataset,
    parse_weight_spec,
    pearson_r,
    plot_ncmi_vs_top1,
    score_models,
)

__all__ = ["main_ncmi_metric"]

logger = logging.getLogger(__name__)


def _metric_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wsi-ncmi ncmi-metric",
        description="Top-1 and dataset-level NCMI of the softmax outputs of image classifiers (paper Fig. 2).",
    )
    p.add_argument(
        "--weights", nargs="+", required=True, metavar="[ARCH=]FILE",
        help="local weights, one per model: safetensors, a torch state dict or a `wsi-ncmi natural fit` "
        "Lightning .ckpt; ARCH=FILE (resnet18|resnet34|resnet50|resnet101) sets the architecture per file",
    )  # fmt: skip
    p.add_argument("--model", default=None, help="architecture for FILEs without ARCH= (default: inferred)")
    p.add_argument("--names", nargs="+", default=None, help="a label per weight file (default: file stem)")
    p.add_argument("--data", required=True, help="ImageFolder root (class sub-folders) or a CIFAR-100 python folder")
    p.add_argument("--dataset", default="auto", choices=["auto", *METRIC_DATA], help="how to read --data")
    p.add_argument("--split", default="test", choices=["test", "train"], help="CIFAR-100 split")
    p.add_argument("--limit", type=int, default=None, help="evaluate a seeded random subset of N images")
    p.add_argument("--image-size", type=int, default=None, help="evaluation size (224 ImageFolder, 32 CIFAR)")
    p.add_argument("--crop-pct", type=float, default=0.875, help="resize short side to size/crop_pct, then crop")
    p.add_argument("--cifar-stem", action="store_const", const=True, default=None,
                   help="3x3 stride-1 stem (default: inferred from conv1.weight)")  # fmt: skip
    p.add_argument("--width", type=float, default=None, help="channel multiplier (default: inferred)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="ncmi_metric_out", help="output folder")
    return p


_TABLE_COLS = ["name", "arch", "classifier", "probs", "top1", "top5", "cmi", "gamma", "ncmi", "n"]


def _table(rows: list[dict[str, Any]]) -> tuple[str, str]:
    cells = []
    for r in rows:
        row = [str(r[c]) for c in ("name", "arch", "classifier", "probs")]
        row += [f"{100 * r[c]:.2f}" for c in ("top1", "top5")]
        cells.append(row + [f"{r[c]:.4f}" for c in ("cmi", "gamma", "ncmi")] + [str(r["n"])])
    md = markdown_table(_TABLE_COLS, cells)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_TABLE_COLS + ["weights"], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r[k] for k in _TABLE_COLS + ["weights"]})
    return "\n".join(md) + "\n", buf.getvalue()


def _specs(args: argparse.Namespace) -> list[WeightSpec]:
    if args.names is not None and len(args.names) != len(args.weights):
        raise NCMIMetricError("--names needs one label per --weights file")
    names = args.names or [None] * len(args.weights)
    specs = [parse_weight_spec(w, n) for w, n in zip(args.weights, names)]
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):  # Lightning names every run's file alike (epoch=N-step=M.ckpt)
        seen[spec.name] = seen.get(spec.name, 0) + 1
        if seen[spec.name] > 1:
            specs[i] = WeightSpec(name=f"{spec.name}-{seen[spec.name]}", path=spec.path, arch=spec.arch)
    return specs


def main_ncmi_metric(argv: list[str] | None = None) -> int:
    """``wsi-ncmi ncmi-metric --weights [ARCH=]F [...] --data DIR [--model M] [--limit N] [--out DIR]``.

    One row per weights file: top-1/top-5 of the model's own classifier and the dataset-level CMI/Γ/NCMI
    of its probabilities. Head models (timm/torchvision ResNets, CE-family runs): softmax of the logits.
    NCMI runs (no head; their Lightning .ckpt is needed): top-1 of the nearest **learned** centroid
    q = NSF(ξ) (closed-form CC needs the training set, see ``natural evaluate``) and the NCMI of the NSF
    probabilities (the simplex the run was trained on, so not the same space as a softmax row).
    """
    import torch
    from torch.utils.data import DataLoader, Subset

    from wsi_ncmi.natural.evaluate import write_json

    args = _metric_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        specs = _specs(args)
        ds, num_classes, kind = metric_dataset(args.data, args.dataset, args.split, args.image_size, args.crop_pct)
    except NCMIMetricError as err:
        print(f"wsi-ncmi ncmi-metric: {err}", file=sys.stderr)
        return 2
    if args.limit is not None and args.limit < len(ds):
        g = torch.Generator().manual_seed(args.seed)
        ds = Subset(ds, torch.randperm(len(ds), generator=g)[: args.limit].tolist())
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    device = resolve_device(args.device)
    try:
        rows = score_models(specs, loader, num_classes, f"{args.data} ({kind})", model=args.model,
                            cifar_stem=args.cifar_stem, width=args.width, device=device)
    except NCMIMetricError as err:
        print(f"wsi-ncmi ncmi-metric: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md, csv_text = _table(rows)
    r = pearson_r([row["ncmi"] for row in rows], [row["top1"] for row in rows])
    md += f"\nPearson r(NCMI, top-1) = {r:.4f} over {len(rows)} models; data {args.data} ({rows[0]['n']} images)\n"
    if len({row["probs"] for row in rows}) > 1:
        md += "\nNote: NCMI of NSF outputs (NCMI runs) and of softmax outputs lie on different simplices.\n"
    atomic_write_text(out / "ncmi_vs_top1.md", md)
    atomic_write_text(out / "ncmi_vs_top1.csv", csv_text)
    plot_ncmi_vs_top1(rows, out / "ncmi_vs_top1.png")
    write_json(
        out / "ncmi_vs_top1.json",
        {"model": args.model, "data": str(args.data), "dataset": kind, "pearson_r": r, "rows": rows},
    )
    print(md, end="")
    print(f"wrote {out}/ncmi_vs_top1.{{md,csv,png,json}}")
    return 0
