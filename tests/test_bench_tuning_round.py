"""`bench/tuning_round.py`: a tuning round read from the benchmark's run folders and judged by its rule."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import tuning_round  # noqa: E402
from mil_benchmark import ncmi_overrides, run_name  # noqa: E402

CAND = ["model.centroid_lr=3e-3"]


def _write(work: Path, stem: str, name: str, seed: int, f1: float, auc: float) -> None:
    folder = work / "runs" / f"{stem}_{name}_s{seed}" / "eval"
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps({"metrics": {"lp": {"test": {"macro_f1": f1, "macro_auc": auc}}}}))


def _round(work: Path, frozen: dict[str, list[float]], cand: dict[str, list[float]]) -> None:
    """Per model, per-seed F1 (AUC fixed at 0.9) of the frozen and the candidate runs on texture4 draw 2."""
    name = run_name("ncmi", ncmi_overrides(CAND))
    for model, f1s in frozen.items():
        for s, f1 in enumerate(f1s):
            _write(work, f"texture4-default_d2_{model}", "ncmi", s, f1, 0.9)
        for s, f1 in enumerate(cand[model]):
            _write(work, f"texture4-default_d2_{model}", name, s, f1, 0.9)


def _main(work: Path, capsys: pytest.CaptureFixture, *extra: str) -> str:
    argv = ["--work", str(work), "--cells", "texture4@2", "--models", "aem", "asmil", "--candidate-set", *CAND]
    assert tuning_round.main(argv + list(extra)) == 0
    return capsys.readouterr().out


def test_keeps_a_candidate_that_gains_everywhere(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _round(tmp_path, {"aem": [0.90, 0.92, 0.91], "asmil": [0.80, 0.82, 0.81]},
           {"aem": [0.93, 0.95, 0.94], "asmil": [0.83, 0.85, 0.84]})
    out = _main(tmp_path, capsys)
    assert "**KEEP**" in out and "(1) mean change +0.030" in out
    assert "| texture4:default d2 aem | 0.910 / 0.900 (0.010) | 0.940 / 0.900 (0.010) | +0.030 | +0.030 ± 0.000 |" in out


def test_rejects_on_one_cell_that_drops_too_far(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # mean +0.03 but asmil −0.04: rule (2)
    _round(tmp_path, {"aem": [0.80, 0.80, 0.80], "asmil": [0.90, 0.90, 0.90]},
           {"aem": [0.90, 0.90, 0.90], "asmil": [0.86, 0.86, 0.86]})
    out = _main(tmp_path, capsys)
    assert "**REJECT**" in out and "(2) worst cell texture4:default d2 asmil -0.040" in out and "FAILS" in out


def test_rejects_when_the_spread_grows_in_too_many_cells(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _round(tmp_path, {"aem": [0.90, 0.90, 0.90], "asmil": [0.90, 0.90, 0.90]},
           {"aem": [1.00, 0.90, 1.00], "asmil": [1.00, 0.90, 1.00]})
    out = _main(tmp_path, capsys)
    assert "**REJECT**" in out and "grows by > 0.020 in 2 cell(s)" in out
    assert "**KEEP**" in _main(tmp_path, capsys, "--std-growth-cells", "2")


def test_a_missing_run_leaves_the_round_undecided(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _round(tmp_path, {"aem": [0.90, 0.90, 0.90], "asmil": [0.90, 0.90, 0.90]},
           {"aem": [0.95, 0.95, 0.95], "asmil": [0.95, 0.95]})
    out = _main(tmp_path, capsys)
    assert "**INCOMPLETE**" in out and "texture4:default d2 asmil" in out


def test_fewer_cells_than_the_round_names_is_incomplete(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _round(tmp_path, {"aem": [0.90, 0.92, 0.91], "asmil": [0.80, 0.82, 0.81]},
           {"aem": [0.93, 0.95, 0.94], "asmil": [0.83, 0.85, 0.84]})
    out = _main(tmp_path, capsys, "--expect-cells", "4")
    assert "**INCOMPLETE**" in out and "2 of the round's 4 cells are in" in out
    assert "**KEEP**" in _main(tmp_path, capsys, "--expect-cells", "2")


def test_refuses_held_out_draws_and_bad_cells(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for cell in ("texture4@104", "texture4", "nope@2", "c17:nope@1"):
        assert tuning_round.main(["--work", str(tmp_path), "--cells", cell, "--candidate-set", *CAND]) == 2
    err = capsys.readouterr().err
    assert "held-out draws are never tuning cells" in err and "FAMILY[:PROTOCOL]@DRAW" in err
    assert "unknown family 'nope'" in err and "no protocol 'nope'" in err


def test_a_broken_report_names_its_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _round(tmp_path, {"aem": [0.9]}, {"aem": [0.9]})
    bad = tmp_path / "runs" / "texture4-default_d2_aem_ncmi_s0" / "eval" / "report.json"
    bad.write_text("{}")
    argv = ["--work", str(tmp_path), "--cells", "texture4@2", "--models", "aem", "--seeds", "0", "--candidate-set", *CAND]
    assert tuning_round.main(argv) == 2
    assert str(bad) in capsys.readouterr().err


def test_saved_cells_finish_a_round_in_a_later_session(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    first, later = tmp_path / "first", tmp_path / "later"
    _round(first, {"aem": [0.90, 0.90, 0.90]}, {"aem": [0.95, 0.95, 0.95]})
    saved = tmp_path / "cells.json"
    argv = ["--models", "aem", "--candidate-set", *CAND]
    assert tuning_round.main(["--work", str(first), "--cells", "texture4@2", "--save", str(saved), *argv]) == 0
    row = json.loads(saved.read_text())["cells"][0]
    assert row["machine"] and row["frozen"]["0"] == [0.9, 0.9] and row["candidate"]["2"] == [0.95, 0.9]
    capsys.readouterr()
    # the later session has no texture4 runs: the saved cell stands in for it, and witness_c2 is read fresh
    name = run_name("ncmi", ncmi_overrides(CAND))
    for s in range(3):
        _write(later, "witness_c2-default_d2_aem", "ncmi", s, 0.80, 0.9)
        _write(later, "witness_c2-default_d2_aem", name, s, 0.81, 0.9)
    assert tuning_round.main(["--work", str(later), "--cells", "texture4@2", "witness_c2@2", "--load", str(saved),
                              *argv]) == 0
    out = capsys.readouterr().out
    assert "| texture4:default d2 aem | 0.900 / 0.900 (0.000) | 0.950 / 0.900 (0.000) | +0.050 |" in out
    assert "(1) mean change +0.030" in out and "**KEEP**" in out
    assert tuning_round.main(["--work", str(later), "--load", str(saved), *argv]) == 0
    assert "texture4:default d2 aem" in capsys.readouterr().out
    # saving again keeps a loaded cell's machine and time, and stamps the fresh one
    row["machine"], row["saved"] = "first-machine", "2026-01-01 00:00 UTC"
    saved.write_text(json.dumps({"cells": [row]}))
    again = tmp_path / "again.json"
    assert tuning_round.main(["--work", str(later), "--cells", "texture4@2", "witness_c2@2", "--load", str(saved),
                              "--save", str(again), *argv]) == 0
    rows = {r["task"]: r for r in json.loads(again.read_text())["cells"]}
    assert (rows["texture4:default"]["machine"], rows["texture4:default"]["saved"]) == ("first-machine",
                                                                                        "2026-01-01 00:00 UTC")
    assert rows["witness_c2:default"]["machine"] not in ("", "first-machine")


def test_a_bad_cell_file_names_itself(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "cells.json"
    bad.write_text('{"cells": [{"task": "t"}]}')
    assert tuning_round.main(["--work", str(tmp_path), "--load", str(bad), "--candidate-set", *CAND]) == 2
    assert str(bad) in capsys.readouterr().err
    assert tuning_round.main(["--work", str(tmp_path), "--candidate-set", *CAND]) == 2
    assert "--cells or --load" in capsys.readouterr().err
