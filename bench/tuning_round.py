"""Score a tuning round of issue #23: a candidate NCMI recipe against the frozen one, cell by cell, under a rule
fixed before the round's runs (docs/ncmi_mil.md, rounds 4-13).

    python bench/tuning_round.py --work W --cells texture4@2 c17:official@3 --models aem asmil \
        --candidate-set model.centroid_optimizer=group --candidate-set model.centroid_lr=3e-3

reads the run folders that ``bench/mil_benchmark.py --work W --objectives ncmi [--ncmi-set ...]`` leaves
(``W/runs/<family>-<protocol>_d<draw>_<model>_<ncmi or ncmi-digest>_s<seed>/eval/report.json``); the candidate's
folders are found by the same digest the benchmark gives them, so the ``--candidate-set`` pairs must be the
benchmark's ``--ncmi-set`` pairs, in the same order. ``--frozen-work`` reads the frozen recipe's runs from another
folder (default: ``--work``). Only tuning draws (0-4) are accepted: a held-out draw is never a tuning cell.
``--save FILE`` writes every complete cell's per-seed numbers (with the machine and the time) to a JSON file, and
``--load FILE`` reads such cells back, so a round can be finished in a later session (a cell's two recipes must
come from one machine: AEM and ASMIL numbers did not repeat across machines); a cell read from the run
folders replaces a loaded one of the same name.

A cell is family:protocol @ draw × aggregator; its score is the mean over seeds of NCMI-LP test macro-F1 +
macro-AUC (the benchmark's tuning draws keep their test split out of every held-out table). The rule (defaults:
rounds 4-13's) keeps the candidate only if (1) the mean cell score rises by at least ``--min-gain``, (2) no cell
drops by more than ``--max-drop`` and (3) NCMI-LP's F1 seed std grows by more than ``--max-std-growth`` in at
most ``--std-growth-cells`` cells. A cell with a missing run, or fewer cells than ``--expect-cells``, makes the
verdict ``INCOMPLETE``: a round is decided on all of its cells or not at all. The paired column (candidate −
frozen per seed, mean ± standard error over seeds) shows how much of a change is one seed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from families import TUNING_DRAWS, parse_task  # noqa: E402
from families.stats import summary  # noqa: E402
from mil_benchmark import ncmi_overrides, run_name  # noqa: E402

from wsi_ncmi.data.atomic import atomic_write_text  # noqa: E402

__all__ = ["Cell", "Rule", "parse_cell", "read_cell", "decide", "report", "save_cells", "load_cells"]


@dataclass(frozen=True)
class Rule:
    """The keep rule of a tuning round (defaults: the rule of rounds 4-13)."""

    min_gain: float = 0.02
    max_drop: float = 0.03
    max_std_growth: float = 0.02
    std_growth_cells: int = 1


@dataclass
class Cell:
    """One family:protocol @ draw × aggregator: per-seed NCMI-LP test (F1, AUC) of both recipes (None: missing)."""

    task: str
    draw: int
    model: str
    frozen: dict[int, tuple[float, float] | None]
    candidate: dict[int, tuple[float, float] | None]
    machine: str | None = None  # where the runs were made (None: this machine, read from the run folders)
    saved: str | None = None  # when a loaded cell was first saved

    @property
    def name(self) -> str:
        return f"{self.task} d{self.draw} {self.model}"

    @property
    def complete(self) -> bool:
        return all(v is not None for v in (*self.frozen.values(), *self.candidate.values()))

    @staticmethod
    def _score(runs: dict[int, tuple[float, float] | None]) -> dict[str, float]:
        f1 = [v[0] for v in runs.values() if v is not None]
        auc = [v[1] for v in runs.values() if v is not None]
        return {"f1": summary(f1)["mean"], "auc": summary(auc)["mean"], "f1_sd": summary(f1)["sd"],
                "score": summary([a + b for a, b in zip(f1, auc, strict=True)])["mean"]}

    def frozen_stats(self) -> dict[str, float]:
        return self._score(self.frozen)

    def candidate_stats(self) -> dict[str, float]:
        return self._score(self.candidate)

    def change(self) -> float:
        return self.candidate_stats()["score"] - self.frozen_stats()["score"]

    def paired(self) -> tuple[float, float]:
        """Mean and standard error over seeds of candidate − frozen F1 + AUC (NaN SE with one seed)."""
        diffs = [sum(self.candidate[s]) - sum(self.frozen[s]) for s in self.frozen  # type: ignore[arg-type]
                 if self.frozen[s] is not None and self.candidate.get(s) is not None]
        s = summary(diffs)
        return s["mean"], (s["sd"] / math.sqrt(s["n"]) if s["n"] > 1 else math.nan)


def parse_cell(token: str) -> tuple[str, int]:
    """``family[:protocol]@draw`` → (``family:protocol``, draw); the draw must be a tuning draw."""
    name, sep, draw = token.rpartition("@")
    if not sep or not name:
        raise ValueError(f"a cell is FAMILY[:PROTOCOL]@DRAW (e.g. texture4@2), got {token!r}")
    try:
        d = int(draw)
    except ValueError:
        raise ValueError(f"{token!r}: the draw must be an integer, got {draw!r}") from None
    if d not in TUNING_DRAWS:
        raise ValueError(f"{token!r}: draw {d} is not a tuning draw {list(TUNING_DRAWS)}; held-out draws are "
                         "never tuning cells")
    family, protocol = parse_task(name)
    return f"{family}:{protocol}", d


def _read_run(folder: Path) -> tuple[float, float] | None:
    report = folder / "eval" / "report.json"
    if not report.is_file():
        return None
    try:
        lp = json.loads(report.read_text())["metrics"]["lp"]["test"]
        return float(lp["macro_f1"]), float(lp["macro_auc"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{report}: not a `wsi-ncmi evaluate` report with NCMI-LP test metrics ({exc})") from exc


def read_cell(task: str, draw: int, model: str, seeds: list[int], frozen_work: Path, work: Path,
              candidate: str) -> Cell:
    """Read one cell's runs; ``candidate`` is the candidate's run-name part (``mil_benchmark.run_name``)."""
    stem = f"{task.replace(':', '-')}_d{draw}_{model}"
    return Cell(task, draw, model,
                {s: _read_run(frozen_work / "runs" / f"{stem}_ncmi_s{s}") for s in seeds},
                {s: _read_run(work / "runs" / f"{stem}_{candidate}_s{s}") for s in seeds})


def save_cells(cells: list[Cell], path: Path) -> None:
    """Write the complete cells' per-seed (F1, AUC) to ``path`` (JSON), each with the machine it was run on and
    when it was first saved (a cell read from the run folders: this machine, now; a loaded cell keeps its own)."""
    import platform
    import time

    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = [{"task": c.task, "draw": c.draw, "model": c.model, "machine": c.machine or platform.node(),
             "saved": c.saved or now, "frozen": {str(k): v for k, v in c.frozen.items()},
             "candidate": {str(k): v for k, v in c.candidate.items()}}
            for c in cells if c.complete]
    atomic_write_text(path, json.dumps({"cells": rows}, indent=1) + "\n")


def load_cells(path: Path) -> list[Cell]:
    """The cells :func:`save_cells` wrote."""

    def runs(saved: dict) -> dict[int, tuple[float, float] | None]:  # {"seed": [f1, auc] or null}
        return {int(k): (None if v is None else (float(v[0]), float(v[1]))) for k, v in saved.items()}

    try:
        rows = json.loads(path.read_text())["cells"]
        return [Cell(r["task"], int(r["draw"]), r["model"], runs(r["frozen"]), runs(r["candidate"]),
                     machine=str(r["machine"]), saved=str(r["saved"]))
                for r in rows]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"{path}: not a cell file written by tuning_round.py --save ({exc})") from exc


def decide(cells: list[Cell], rule: Rule, expect: int = 0) -> tuple[str, list[str]]:
    """(``KEEP`` / ``REJECT`` / ``INCOMPLETE``, one line per rule); fewer than ``expect`` cells is incomplete."""
    missing = [c.name for c in cells if not c.complete]
    if missing or not cells:
        return "INCOMPLETE", [f"cells with missing runs: {', '.join(missing) or 'no cells'}"]
    if len(cells) < expect:
        return "INCOMPLETE", [f"{len(cells)} of the round's {expect} cells are in"]
    gain = sum(c.change() for c in cells) / len(cells)
    worst = min(cells, key=lambda c: c.change())
    grown = [c.name for c in cells if c.candidate_stats()["f1_sd"] - c.frozen_stats()["f1_sd"] > rule.max_std_growth]
    ok = [gain >= rule.min_gain, worst.change() >= -rule.max_drop, len(grown) <= rule.std_growth_cells]
    lines = [f"(1) mean change {gain:+.3f} (needs ≥ {rule.min_gain:+.3f}): {'ok' if ok[0] else 'FAILS'}",
             f"(2) worst cell {worst.name} {worst.change():+.3f} (no drop beyond {rule.max_drop:.3f}): "
             f"{'ok' if ok[1] else 'FAILS'}",
             f"(3) F1 seed std grows by > {rule.max_std_growth:.3f} in {len(grown)} cell(s) "
             f"{'(' + ', '.join(grown) + ') ' if grown else ''}(at most {rule.std_growth_cells}): "
             f"{'ok' if ok[2] else 'FAILS'}"]
    return ("KEEP" if all(ok) else "REJECT"), lines


def report(cells: list[Cell], rule: Rule, label: str, expect: int = 0) -> str:
    """The round's Markdown table and verdict."""
    rows = ["| cell | frozen F1 / AUC (F1 std) | " + label + " F1 / AUC (F1 std) | change | paired ± SE |",
            "|---|---|---|---|---|"]

    def show(s: dict[str, float]) -> str:
        return f"{s['f1']:.3f} / {s['auc']:.3f} ({s['f1_sd']:.3f})" if not math.isnan(s["f1"]) else "missing"

    for c in cells:
        p, se = c.paired()
        rows.append(f"| {c.name} | {show(c.frozen_stats())} | {show(c.candidate_stats())} | {c.change():+.3f} | "
                    f"{p:+.3f} ± {se:.3f} |")
    verdict, lines = decide(cells, rule, expect)
    return "\n".join(rows + ["", f"**{verdict}**", ""] + [f"- {line}" for line in lines]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="the benchmark --work folder of the candidate's runs")
    p.add_argument("--frozen-work", default=None, help="the frozen recipe's runs (default: --work)")
    p.add_argument("--cells", nargs="+", default=[], metavar="FAMILY[:PROTOCOL]@DRAW",
                   help="cells to read from the run folders (and/or --load)")
    p.add_argument("--models", nargs="+", default=["abmil", "aem", "asmil"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--candidate-set", action="append", default=[], metavar="KEY=VALUE",
                   help="the candidate's --ncmi-set pairs, in the benchmark's order")
    p.add_argument("--min-gain", type=float, default=Rule.min_gain)
    p.add_argument("--max-drop", type=float, default=Rule.max_drop)
    p.add_argument("--max-std-growth", type=float, default=Rule.max_std_growth)
    p.add_argument("--std-growth-cells", type=int, default=Rule.std_growth_cells)
    p.add_argument("--expect-cells", type=int, default=0,
                   help="the round's number of cells: fewer is INCOMPLETE (default: decide on the cells given)")
    p.add_argument("--save", default=None, help="write the complete cells' per-seed numbers here (JSON)")
    p.add_argument("--load", action="append", default=[], help="cells saved by an earlier --save (repeatable)")
    p.add_argument("--out", default=None, help="also write the report here")
    args = p.parse_args(argv)
    try:
        cand = ncmi_overrides(args.candidate_set)
        if not cand:
            raise ValueError("--candidate-set: name at least one KEY=VALUE (the candidate's --ncmi-set)")
        if not args.cells and not args.load:
            raise ValueError("name --cells or --load (or both)")
        specs = [parse_cell(t) for t in args.cells]
        work = Path(args.work)
        read = [read_cell(task, draw, m, args.seeds, Path(args.frozen_work or work), work, run_name("ncmi", cand))
                for task, draw in specs for m in args.models]
        loaded = [c for f in args.load for c in load_cells(Path(f))]
    except ValueError as exc:
        print(f"tuning_round: {exc}", file=sys.stderr)
        return 2
    # the named cells in order (an incomplete one from the loaded files if they hold it), then loaded cells not named
    cells = [c if c.complete else next((x for x in loaded if x.name == c.name), c) for c in read]
    cells += [c for c in loaded if c.name not in {x.name for x in cells}]
    if args.save:
        save_cells(cells, Path(args.save))
    rule = Rule(args.min_gain, args.max_drop, args.max_std_growth, args.std_growth_cells)
    text = report(cells, rule, "candidate", args.expect_cells)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
