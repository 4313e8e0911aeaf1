"""Reliability suite (issue #22, part 2): bags that a model must not use, in `wsi-ncmi fit | evaluate | predict`.

Before the fixes these bags were used silently (only `wsi-ncmi bags validate` noticed), or failed with a message
that did not name the bag. Each test carries ``@pytest.mark.fault(kind=...)``, how the case ended before its fix
(``bench/faults.py`` tallies them).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_faults_training import DIM, _cli_args, _error_line, _snapshot

from wsi_ncmi.data.bags import write_bag


@pytest.fixture(scope="module")
def run_ready(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(bags_dir, split_csv, best.ckpt) of a 1-epoch ABMIL run on tiny witness bags."""
    from _synthetic import make_witness_bags

    from wsi_ncmi.commands.train_cli import main_fit

    d = tmp_path_factory.mktemp("faults_bags_use")
    split = make_witness_bags(d / "bags", n_slides=12, num_classes=2, dim=DIM, n_instances=(4, 8), seed=0)
    assert main_fit(_cli_args(d / "bags", split, d / "run")) == 0
    return d / "bags", split, d / "run" / "checkpoints" / "best.ckpt"


@pytest.fixture()
def bags_copy(run_ready, tmp_path) -> tuple[Path, Path, Path]:
    bags, split, ckpt = run_ready
    shutil.copytree(bags, tmp_path / "bags")
    return tmp_path / "bags", tmp_path / "bags" / split.name, ckpt


def _slides(split: Path, which: str) -> list[str]:
    return [r["slide_id"] for r in csv.DictReader(split.open()) if r["split"] == which]


def _replace_dataset(path: Path, name: str, data: np.ndarray) -> None:
    """Rewrite dataset ``name`` of bag ``path`` with ``data``, keeping its attributes (as a buggy writer would)."""
    with h5py.File(path, "r+") as f:
        attrs = dict(f[name].attrs)
        del f[name]
        ds = f.create_dataset(name, data=data)
        ds.attrs.update(attrs)


def _fit(bags: Path, split: Path, root: Path, *extra: str) -> int:
    from wsi_ncmi.commands.train_cli import main_fit

    return main_fit(_cli_args(bags, split, root, *extra))


def _evaluate(ckpt: Path, bags: Path, split: Path, out: Path) -> int:
    from wsi_ncmi.commands.evaluate_cli import main

    return main(["--ckpt", str(ckpt), "--data.bags_dir", str(bags), "--data.split_csv", str(split),
                 "--out", str(out), "--no-plots"])


def _predict(ckpt: Path, bags: Path, out: Path, *extra: str) -> int:
    from wsi_ncmi.commands.predict_cli import main

    return main(["--ckpt", str(ckpt), "--bags", str(bags), "--out", str(out), *extra])


def _all_refuse(bags: Path, split: Path, ckpt: Path, tmp_path: Path, capsys, says: tuple[str, ...],
                predict: bool = True) -> None:
    """fit, evaluate (and predict, even with --allow-mismatch) end with one line holding ``says``; nothing written."""
    before = _snapshot(tmp_path)
    runs = [("fit", lambda: _fit(bags, split, tmp_path / "new_run")),
            ("evaluate", lambda: _evaluate(ckpt, bags, split, tmp_path / "eval"))]
    if predict:
        runs += [("predict", lambda: _predict(ckpt, bags, tmp_path / "pred")),
                 ("predict", lambda: _predict(ckpt, bags, tmp_path / "pred", "--allow-mismatch"))]
    for command, call in runs:
        assert call() == 2, command
        line = _error_line(capsys.readouterr().err, command)
        assert all(s in line for s in says), line
    assert _snapshot(tmp_path) == before
    assert not any((tmp_path / n).exists() for n in ("new_run", "eval", "pred"))


# ----------------------------------------------------------------------------------------------- cases
@pytest.mark.fault(kind="silent_wrong")
def test_a_bag_whose_coords_do_not_match_its_features_is_refused(bags_copy, tmp_path, capsys) -> None:
    bags, split, ckpt = bags_copy
    bad = bags / f"{_slides(split, 'test')[0]}.h5"
    with h5py.File(bad, "r") as f:
        coords = f["coords"][()]
    _replace_dataset(bad, "coords", coords[:-1])  # one tile's coordinates lost
    _all_refuse(bags, split, ckpt, tmp_path, capsys, (str(bad), f"{len(coords)} feature rows",
                                                      f"{len(coords) - 1} coords rows"))


@pytest.mark.fault(kind="silent_wrong")
def test_a_bag_with_integer_features_is_refused(bags_copy, tmp_path, capsys) -> None:
    bags, split, ckpt = bags_copy
    bad = bags / f"{_slides(split, 'train')[0]}.h5"
    with h5py.File(bad, "r") as f:
        feats = f["features"][()]
    _replace_dataset(bad, "features", np.round(feats * 100).astype(np.int32))  # e.g. quantised by another tool
    _all_refuse(bags, split, ckpt, tmp_path, capsys, (str(bad), "floating point", "int32"), predict=False)


@pytest.mark.fault(kind="silent_wrong")
def test_a_renamed_bag_is_refused_naming_both_slides(bags_copy, tmp_path, capsys) -> None:
    bags, split, ckpt = bags_copy
    victim, donor = _slides(split, "test")[0], _slides(split, "train")[0]
    shutil.copy(bags / f"{donor}.h5", bags / f"{victim}.h5")  # the donor's features would be scored as the victim
    _all_refuse(bags, split, ckpt, tmp_path, capsys,
                (str(bags / f"{victim}.h5"), f"slide_id '{donor}'", f"file name says '{victim}'"))


@pytest.mark.fault(kind="silent_wrong")
def test_predict_refuses_a_bag_entry_that_is_a_folder(bags_copy, tmp_path, capsys) -> None:
    import pandas as pd

    bags, split, ckpt = bags_copy
    sid = _slides(split, "test")[0]
    (bags / f"{sid}.h5").unlink()
    (bags / f"{sid}.h5").mkdir()  # e.g. a copy tool that made a folder of the name
    before = _snapshot(tmp_path)
    assert _predict(ckpt, bags, tmp_path / "pred") == 2  # used to predict the other slides, exit 0, silently
    line = _error_line(capsys.readouterr().err, "predict")
    assert str(bags / f"{sid}.h5") in line and "is a folder" in line and "--slides" in line
    assert _snapshot(tmp_path) == before and not (tmp_path / "pred").exists()
    # fit and evaluate already refused it as a missing bag; the line now says what is there instead
    assert _fit(bags, split, tmp_path / "new_run") == 2
    assert f"{sid} ({sid}.h5 is a folder)" in _error_line(capsys.readouterr().err, "fit")
    # the slides listed with --slides are predicted when the folder entry is not among them
    others = [s for s in _slides(split, "test") if s != sid]
    pd.DataFrame({"slide_id": others}).to_csv(tmp_path / "list.csv", index=False)
    assert _predict(ckpt, bags, tmp_path / "pred", "--slides", str(tmp_path / "list.csv")) == 0
    assert list(pd.read_csv(tmp_path / "pred" / "predictions.csv")["slide_id"]) == others


@pytest.mark.fault(kind="unclear")
def test_predict_allow_mismatch_names_an_empty_or_wrong_dim_bag(bags_copy, tmp_path, capsys) -> None:
    bags, split, ckpt = bags_copy
    sid = _slides(split, "test")[0]
    bad = bags / f"{sid}.h5"
    write_bag(bad, np.ones((5, DIM + 4), np.float32), np.zeros((5, 2), np.int64))  # another encoder's bag
    before = _snapshot(tmp_path, exclude=bad)
    assert _predict(ckpt, bags, tmp_path / "pred", "--allow-mismatch") == 2  # was "ABMIL: feature dim mismatch"
    line = _error_line(capsys.readouterr().err, "predict")
    assert str(bad) in line and f"D={DIM + 4}" in line and f"D={DIM}" in line
    _replace_dataset(bad, "features", np.zeros((0, DIM), np.float32))  # a slide without tissue tiles
    _replace_dataset(bad, "coords", np.zeros((0, 2), np.int64))
    assert _predict(ckpt, bags, tmp_path / "pred", "--allow-mismatch") == 2  # was "ABMIL: empty bag (N=0 ...)"
    line = _error_line(capsys.readouterr().err, "predict")
    assert str(bad) in line and "zero rows" in line
    assert _snapshot(tmp_path, exclude=bad) == before
    assert not (tmp_path / "pred").exists()


@pytest.mark.fault(kind="unclear")
def test_a_huge_num_classes_gives_a_short_line(bags_copy, tmp_path, capsys) -> None:
    from wsi_ncmi.commands.errors import MAX_CHARS, one_line

    bags, split, _ = bags_copy
    assert _fit(bags, split, tmp_path / "run", "--data.num_classes", "1000000") == 2  # was a 7.9 MB line
    line = _error_line(capsys.readouterr().err, "fit")
    assert len(line) < 400 and "classes [2, 3," in line and "(999978 more)" in line and "num_classes=1000000" in line
    assert not (tmp_path / "run").exists()
    # whatever an error says, the printed line is capped
    capped = one_line(ValueError("x" * (10 * MAX_CHARS)))
    assert len(capped) < MAX_CHARS + 60 and capped.endswith(f"({9 * MAX_CHARS} more characters)")
