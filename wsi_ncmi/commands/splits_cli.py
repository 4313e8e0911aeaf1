"""`wsi-ncmi splits make|validate|official`: generate and check split tables."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from wsi_ncmi.data.official import PROTOCOL_EXPECTED, official_tables, write_official
from wsi_ncmi.data.split_check import validate_split
from wsi_ncmi.data.splits import (
    STRATEGIES,
    SplitError,
    load_split,
    make_split,
    summary_markdown,
    write_split,
)

REFERENCE = Path("..") / "shared" / "reference"


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def _err(line: str) -> None:
    sys.stderr.write(line + "\n")


def _print_report(report, as_json: bool) -> None:
    if as_json:
        _out(json.dumps({"source": report.source, "rows": report.n_rows, "ok": report.ok,
                         "counts": report.counts, "missing_bags": report.missing_bags,
                         "errors": report.errors, "warnings": report.warnings}, indent=2))
        return
    for name, counts in report.counts.items():
        _out(f"{name:>14}: {sum(counts.values()):5d} slides  labels {dict(sorted(counts.items()))}")
    for w in report.warnings:
        _err(f"warning: {w}")
    for e in report.errors:
        _err(f"error: {e}")
    _out("OK" if report.ok else "INVALID")


def _make(args: argparse.Namespace) -> int:
    try:
        labels = pd.read_csv(args.labels, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        _err(f"error: {args.labels}: cannot read labels table: {exc}")
        return 2
    if "label" in labels.columns and pd.to_numeric(labels["label"], errors="coerce").notna().all():
        labels["label"] = labels["label"].astype(int)
    table = make_split(labels, args.strategy, group_by=args.group_by, val=args.val, test=args.test,
                       folds=args.folds, seed=args.seed, test_centers=args.test_centers)
    report = validate_split(table, bags_dir=args.bags, strict=False)
    write_split(table, args.out)
    _out(summary_markdown(table if "fold" not in table.columns else table[table["fold"] == 0]))
    _out(f"wrote {args.out} ({len(table)} rows)")
    for w in report.warnings:
        _err(f"warning: {w}")
    return 0 if report.ok else 1


def _validate(args: argparse.Namespace) -> int:
    expected = PROTOCOL_EXPECTED[args.protocol] if args.protocol else None
    if args.expected:
        expected = json.loads(args.expected)
    table = load_split(args.csv)
    report = validate_split(table, bags_dir=args.bags, num_classes=args.num_classes,
                            expected_counts=expected, strict=False)
    report.source = str(args.csv)
    if args.strict and report.warnings:
        report.errors += report.warnings
        report.warnings = []
    _print_report(report, args.json)
    return 0 if report.ok else 1


def _official(args: argparse.Namespace) -> int:
    if args.check:
        differ = []
        for name, table in official_tables(args.camelyon17, args.bracs).items():
            path = Path(args.out) / name
            if not path.is_file():
                differ.append(f"{path}: missing")
                continue
            shipped = load_split(path)
            expected = table.reset_index(drop=True).astype(shipped.dtypes.to_dict())
            if not shipped.equals(expected):
                differ.append(f"{path}: differs from what the generator produces")
        for d in differ:
            _err(f"error: {d}")
        _out("official splits are up to date" if not differ else f"{len(differ)} file(s) out of date")
        return 1 if differ else 0
    for path in write_official(args.out, args.camelyon17, args.bracs):
        _out(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsi-ncmi splits", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)

    mk = sub.add_parser("make", help="make a grouped, stratified, seeded split table from a labels CSV")
    mk.add_argument("--labels", required=True, type=Path,
                    help="CSV with slide_id, label (int or class name) [, patient_id, center]")
    mk.add_argument("--bags", type=Path, default=None, help="folder of bags: warn about slides without one")
    mk.add_argument("--strategy", choices=STRATEGIES, default="holdout")
    mk.add_argument("--group-by", default="patient_id")
    mk.add_argument("--val", type=float, default=0.1)
    mk.add_argument("--test", type=float, default=0.2)
    mk.add_argument("--folds", type=int, default=5)
    mk.add_argument("--test-centers", type=int, nargs="+", default=None,
                    help="strategy center: test centers (default: leave each center out in turn)")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--out", required=True, type=Path)
    mk.set_defaults(func=_make)

    va = sub.add_parser("validate", help="check a split table (leaks, labels, bags, expected counts)")
    va.add_argument("csv", type=Path)
    va.add_argument("--bags", type=Path, default=None)
    va.add_argument("--num-classes", type=int, default=None)
    va.add_argument("--protocol", choices=sorted(PROTOCOL_EXPECTED), default=None,
                    help="compare counts with a shipped protocol")
    va.add_argument("--expected", default=None, help='JSON, e.g. \'{"test": 200, "all": {"0": 318}}\'')
    va.add_argument("--strict", action="store_true", help="warnings (missing bags, counts) fail too")
    va.add_argument("--json", action="store_true")
    va.set_defaults(func=_validate)

    of = sub.add_parser("official", help="(re)generate the shipped CAMELYON-17 / BRACS tables")
    of.add_argument("--camelyon17", type=Path, default=REFERENCE / "camelyon17_slides.csv")
    of.add_argument("--bracs", type=Path, default=REFERENCE / "bracs_slides.csv")
    of.add_argument("--out", type=Path, default=Path("splits"))
    of.add_argument("--check", action="store_true", help="only compare with the files in --out")
    of.set_defaults(func=_official)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (SplitError, ValueError) as exc:
        _err(f"error: {exc}")
        return 2
