"""`wsi-ncmi bags inspect|validate DIR`: look at a folder of HDF5 bags before training on it."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from wsi_ncmi.data.bags import BagError, inspect_bag, list_bags, stale_tmp_files, validate_bag


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def _err(line: str) -> None:
    sys.stderr.write(line + "\n")


def _bag_paths(target: Path) -> dict[str, Path]:
    if target.is_file():
        return {target.name[:-3] if target.name.endswith(".h5") else target.stem: target}
    return list_bags(target)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows: list[dict[str, Any]]) -> list[str]:
    cols = [("slide", "slide_id"), ("N", "n"), ("D", "dim"), ("dtype", "dtype"), ("encoder", "encoder"),
            ("target_mpp", "target_mpp"), ("eff_mpp", "effective_mpp"), ("format", "format")]
    cells = [[h for h, _ in cols]] + [[_fmt(r.get(k)) for _, k in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    return ["  ".join(c[i].ljust(widths[i]) for i in range(len(cols))).rstrip() for c in cells]


def _consistency(rows: list[dict[str, Any]]) -> list[str]:
    problems = []
    for key, what in (("dim", "feature dims"), ("encoder", "encoders"), ("dtype", "dtypes")):
        counts = Counter(_fmt(r.get(key)) for r in rows)
        if len(counts) > 1:
            major = counts.most_common(1)[0][0]
            odd = [r["slide_id"] for r in rows if _fmt(r.get(key)) != major]
            level = "ERROR" if key in ("dim", "encoder") else "note"
            problems.append(
                f"{level}: inconsistent {what} across the folder: {dict(counts)}; "
                f"differing from the majority ({major}): {', '.join(odd[:20])}{' ...' if len(odd) > 20 else ''}"
            )
    return problems


def _run(args: argparse.Namespace, full: bool) -> int:
    target = Path(args.dir)
    try:
        paths = _bag_paths(target)
    except BagError as exc:
        _err(f"error: {exc}")
        return 2
    if not paths:
        _err(f"error: {target}: no *.h5 bags found")
        return 1
    rows, bad = [], []
    for slide_id, path in paths.items():
        try:
            info = validate_bag(path, check_values=not args.no_values) if full else inspect_bag(path)
            info["slide_id"] = slide_id
            rows.append(info)
        except BagError as exc:
            bad.append(str(exc))
    problems = _consistency(rows)
    if args.json:
        keep = ("slide_id", "path", "n", "dim", "dtype", "encoder", "target_mpp", "effective_mpp", "format",
                "schema_version")
        _out(json.dumps({"bags": [{k: r.get(k) for k in keep} for r in rows], "invalid": bad,
                         "problems": problems}, indent=2))
    else:
        for line in _table(rows):
            _out(line)
        _out()
        n_total = sum(int(r["n"]) for r in rows)
        _out(f"{len(rows)} valid bag(s), {n_total} instances; {len(bad)} invalid")
    stale = stale_tmp_files(target) if target.is_dir() else []
    if stale:
        _err(f"warning: {len(stale)} unfinished *.h5.tmp file(s) (interrupted writers; safe to delete): "
             + ", ".join(p.name for p in stale[:10]))
    for msg in bad:
        _err(f"invalid: {msg}")
    for msg in problems:
        _err(msg)
    failing = bad or any(p.startswith("ERROR") for p in problems)
    return 1 if failing else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsi-ncmi bags", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    for name, help_ in (("inspect", "table of the bags' headers (fast: no feature data read)"),
                        ("validate", "read every bag completely and check the schema and values")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("dir", help="folder of <slide_id>.h5 bags (or one .h5 file)")
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        if name == "validate":
            p.add_argument("--no-values", action="store_true", help="skip the NaN/inf scan of the features")
        else:
            p.set_defaults(no_values=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _run(args, full=args.action == "validate")
