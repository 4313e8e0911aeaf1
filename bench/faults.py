"""The fault suite of issue #18 in one run: every bad-input / crash case, how it ends now, and how it ended before.

    python bench/faults.py                        # whole suite -> bench/results/faults.md
    python bench/faults.py -k heatmap --out /tmp/faults.md

Runs, in this process through ``pytest.main`` with a small collecting plugin:

* ``tests/test_faults_preprocessing.py`` (``wsi-preprocess`` cases; skipped with a note when absent),
* ``tests/test_faults_training.py`` (``wsi-ncmi fit|validate|test|evaluate|heatmap`` cases),
* ``tests/test_faults_inputs.py`` (full disk, read-only / shared output folder, weight files, long names, CIFAR),
* ``tests/test_faults_bags_use.py`` / ``tests/test_faults_outputs.py`` (bags a model must not use; what the
  commands write: run-folder lock, interrupted evaluate, full disk, read-only and wrong-kind output paths),
* the crash-recovery tests listed in ``CRASH_TESTS`` (a writer killed with SIGKILL, a reader process dying,
  a resumed run, a failed atomic write).

Each fault test carries ``@pytest.mark.fault(kind=...)``: how the case ended *before* its fix (silent_wrong,
code_exec, traceback, unclear, data_loss, ...). A passing test asserts the fixed behaviour (exit code, one clear
line naming the file, nothing outside the output folder changed, no earlier result lost), so it counts as
"clear message". A failing test is counted, pessimistically, as ending the way its kind says it did before the
fix (a failing ``code_exec`` test counts as "code executed"). After the fixes, with every test passing, all
columns but "clear message" are 0. The report (markdown) is printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsi_ncmi.data.atomic import atomic_write_text  # noqa: E402

FAULT_FILES = ("tests/test_faults_preprocessing.py", "tests/test_faults_training.py", "tests/test_faults_inputs.py",
               "tests/test_checkpoint_trust.py", "tests/test_faults_bags_use.py", "tests/test_faults_outputs.py")
# (test id, what it kills / breaks): recovery tests of earlier work that belong in the same tally
CRASH_TESTS = (
    ("tests/test_bags.py::test_killed_writer_never_leaves_an_invalid_bag", "bag writer killed with SIGKILL"),
    ("tests/test_preprocessing_robustness.py::test_a_reader_process_that_dies_is_recorded_and_the_run_goes_on",
     "reader process dies (os._exit)"),
    ("tests/test_run_log.py::test_resumed_fit_appends_and_matches_an_uninterrupted_run", "fit interrupted, resumed"),
    ("tests/test_atomic.py::test_failed_write_keeps_the_old_file", "a write fails half way"),
)
CRASH_KIND = "crash"
# kind before the fix -> the column a failing test of that kind is counted in
COLUMN_OF_KIND = {"silent_wrong": "silent wrong", "data_loss": "data lost", "code_exec": "code executed"}
COLUMNS = ("tried", "clear message / recovered", "traceback / unclear", "silent wrong", "data lost", "code executed")
DEFAULT_OUT = ROOT / "bench" / "results" / "faults.md"


@dataclass
class Case:
    nodeid: str
    kind: str
    outcome: str = "not run"  # passed | failed | skipped
    seconds: float = 0.0
    message: str = ""


@dataclass
class Collector:
    """pytest plugin: the ``fault`` kind of every collected test and the outcome of its phases."""

    kinds: dict[str, str] = field(default_factory=dict)  # nodeid -> kind for tests with the marker
    cases: dict[str, Case] = field(default_factory=dict)

    def pytest_collection_modifyitems(self, items: list[Any]) -> None:
        for item in items:
            marker = item.get_closest_marker("fault")
            if marker is not None:
                self.kinds[item.nodeid] = str(marker.kwargs.get("kind", "unknown"))

    def pytest_runtest_logreport(self, report: Any) -> None:
        crash = any(report.nodeid.endswith(nodeid) for nodeid, _ in CRASH_TESTS)
        if report.nodeid not in self.kinds and not crash:
            return  # a unit test of a fault file (no `fault` marker): not a case of the suite
        case = self.cases.setdefault(report.nodeid, Case(report.nodeid, self.kinds.get(report.nodeid, CRASH_KIND)))
        case.seconds += float(report.duration)
        if report.failed:
            case.outcome = "failed"
            case.message = case.message or (report.longreprtext.strip().splitlines() or [""])[-1][:160]
        elif report.skipped and case.outcome != "failed":
            case.outcome = "skipped"
        elif report.when == "call" and report.passed and case.outcome == "not run":
            case.outcome = "passed"


def column(case: Case) -> str | None:
    """The column a case counts in (besides "tried"), or None (skipped / not run)."""
    if case.outcome == "passed":
        return "clear message / recovered"
    if case.outcome == "failed":
        return COLUMN_OF_KIND.get(case.kind, "traceback / unclear")
    return None


def _test_exists(nodeid: str) -> bool:
    path, _, name = nodeid.partition("::")
    file = ROOT / path
    return file.is_file() and re.search(rf"^def {re.escape(name)}\b", file.read_text(), re.M) is not None


def select() -> tuple[list[str], list[str]]:
    """(pytest targets as absolute paths / node ids, notes on what is missing)."""
    targets, notes = [], []
    for f in FAULT_FILES:
        if (ROOT / f).is_file():
            targets.append(str(ROOT / f))
        else:
            notes.append(f"`{f}` does not exist (yet): its cases are not in this run")
    for nodeid, _ in CRASH_TESTS:
        if _test_exists(nodeid):
            targets.append(str(ROOT / nodeid))
        else:
            notes.append(f"crash test `{nodeid}` not found")
    return targets, notes


def run(keyword: str | None, verbose: bool = False) -> tuple[Collector, int, list[str], float]:
    targets, notes = select()
    collector = Collector()
    args = [*targets, "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"), "-p", "no:cacheprovider",
            "--tb=line", "-q" if verbose else "-qq", "-W", "ignore"]
    if keyword:
        args += ["-k", keyword]
    t0 = time.perf_counter()
    rc = int(pytest.main(args, plugins=[collector])) if targets else 5
    return collector, rc, notes, time.perf_counter() - t0


def report(collector: Collector, rc: int, notes: list[str], seconds: float, keyword: str | None) -> str:
    cases = sorted(collector.cases.values(), key=lambda c: c.nodeid)
    crash_what = dict(CRASH_TESTS)
    counts = Counter(c for case in cases if (c := column(case)) is not None)
    counts["tried"] = sum(1 for case in cases if column(case) is not None)
    before = Counter(case.kind for case in cases if column(case) is not None)
    lines = [
        "# Fault suite (issue #18): how each bad input ends",
        "",
        f"`python bench/faults.py{' -k ' + repr(keyword) if keyword else ''}` — "
        f"{dt.date.today().isoformat()}, {platform.node()} ({platform.machine()}, Python {platform.python_version()}),"
        f" {seconds:.0f} s, pytest exit code {rc}.",
        "",
        "Counted after the fixes. A passing test asserts exit code 2 (user error) with one line naming the file,"
        " nothing changed outside the output folder and no earlier result lost: \"clear message\" (a crash test:"
        " the run recovers, \"recovered\"). A failing test"
        " is counted as ending the way it did before its fix (its `fault` kind).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        "| " + " | ".join(str(counts.get(c, 0)) for c in COLUMNS) + " |",
        "",
        "Before the fixes (the `fault(kind=...)` of each case; `crash` = recovery tests that were already handled): "
        + ", ".join(f"{k} {n}" for k, n in sorted(before.items())) + ".",
        "",
    ]
    if notes:
        lines += [*(f"- note: {n}" for n in notes), ""]
    lines += ["| test | kind before fix | outcome now | s |", "|---|---|---|---|"]
    for case in cases:
        name = case.nodeid + (f" ({crash_what[case.nodeid]})" if case.nodeid in crash_what else "")
        passed = "recovered (passed)" if case.kind == CRASH_KIND else "clear message (passed)"
        outcome = passed if case.outcome == "passed" else case.outcome
        if case.outcome == "failed":
            outcome = f"FAILED → counted as {column(case)}: {case.message.replace('|', '/')}"
        lines.append(f"| `{name}` | {case.kind} | {outcome} | {case.seconds:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-k", dest="keyword", default=None, help="pytest -k expression to run a subset (smoke test)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"markdown report (default: {DEFAULT_OUT})")
    p.add_argument("-v", "--verbose", action="store_true", help="pytest progress output")
    args = p.parse_args(argv)
    collector, rc, notes, seconds = run(args.keyword, args.verbose)
    text = report(collector, rc, notes, seconds, args.keyword)
    atomic_write_text(Path(args.out), text)
    print(text)
    print(f"written: {args.out}")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
