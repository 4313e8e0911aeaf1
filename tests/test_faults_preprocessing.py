"""Reliability suite, preprocessing side (issue #18): every bad input or fault ends with one clear line naming
the file and the problem, the right exit code, nothing changed outside the output folder and no earlier
result lost. ``kind`` in ``@pytest.mark.fault`` is how the case ended before its fix."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from preprocessing import synthetic
from preprocessing.cli import main
from preprocessing.manifest import read_manifest
from wsi_ncmi.data.bags import read_bag

SEG_TILE = ["--stages", "seg,tile", "--workers", "0", "--seg-mpp", "4", "--target-mpp", "2", "--patch-size", "32",
            "--min-tissue", "0.5", "--no-progress"]
EXTRACT = ["--workers", "0", "--seg-mpp", "4", "--target-mpp", "2", "--patch-size", "32", "--min-tissue", "0.5",
           "--no-progress", "--encoder", "test_resnet", "--weights", "random", "--device", "cpu", "--batch-size", "64"]


@pytest.fixture(scope="module")
def tissue() -> np.ndarray:
    rgb, _ = synthetic.synthetic_tissue(400, 500, seed=7, n_blobs=2, coverage=0.4)
    return rgb


def _slide(folder: Path, rgb: np.ndarray, name: str = "s.svs", **kw) -> Path:
    return synthetic.write_svs(folder / name, rgb, **{"mpp": 0.5, "downsamples": (1, 4), **kw})


def _snapshot(root: Path, skip: Path) -> dict[str, tuple]:
    """(size, mtime, mode) of every entry under ``root`` except ``skip`` (the output folder); links not followed."""
    snap: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath) / d != skip]
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            snap[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return snap


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ------------------------------------------------------------------------ silent wrong results / data loss
@pytest.mark.fault(kind="silent_wrong")
def test_mpp_csv_with_conflicting_duplicate_rows_is_refused(tmp_path, tissue, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    _slide(inp, tissue, name="a.tif", mpp=None)
    csv = tmp_path / "mpp.csv"
    csv.write_text("slide_id,mpp\na,0.5\nb,1.0\nb,1.0\na,0.25\n")  # b: identical duplicate (fine), a: conflict
    before = _snapshot(tmp_path, out)
    rc, _, err = _cli(["--input", inp, "--output", out, "--mpp-csv", csv, *SEG_TILE], capsys)
    assert rc == 1
    line = err.strip().splitlines()[-1]
    assert str(csv) in line and "'a'" in line and "0.5" in line and "0.25" in line
    assert not (out / "manifest.csv").exists()  # nothing was processed with a guessed value
    assert _snapshot(tmp_path, out) == before
    csv.write_text("slide_id,mpp\na,0.5\na,0.5\n")  # identical duplicates are fine
    rc, _, _ = _cli(["--input", inp, "--output", out, "--mpp-csv", csv, *SEG_TILE], capsys)
    assert rc == 0 and read_manifest(out / "manifest.csv")["a"]["mpp"] == "0.5"


@pytest.mark.fault(kind="silent_wrong")
def test_symlinked_slide_folder_is_searched_and_loops_are_cut(tmp_path, tissue, capsys, caplog):
    real, inp, out = tmp_path / "data" / "real", tmp_path / "in", tmp_path / "out"
    _slide(real, tissue, name="linked.svs")
    _slide(inp, tissue, name="local.svs")
    (inp / "cohortA").symlink_to(real, target_is_directory=True)
    (real / "loop").symlink_to(inp, target_is_directory=True)  # cohortA/loop -> in: a cycle
    before = _snapshot(tmp_path, out)
    rc, _, _ = _cli(["--input", inp, "--output", out, *SEG_TILE], capsys)
    assert rc == 0
    rows = read_manifest(out / "manifest.csv")
    assert sorted(rows) == ["linked", "local"] and rows["linked"]["status"] == "ok"
    assert "cohortA" in rows["linked"]["path"]
    assert "loop" in caplog.text and str(inp / "cohortA" / "loop") in caplog.text  # the cycle is named
    assert _snapshot(tmp_path, out) == before


@pytest.mark.fault(kind="data_loss")
def test_second_failed_redo_keeps_both_stale_bags(tmp_path, tissue, capsys, caplog):
    inp, out = tmp_path / "in", tmp_path / "out"
    _slide(inp, tissue)
    base = ["--input", inp, "--output", out, *EXTRACT]
    assert _cli(base, capsys)[0] == 0
    first = read_bag(out / "bags" / "s.h5").features
    assert _cli([*base, "--target-mpp", "0.2"], capsys)[0] == 3  # finer than the slide: fails, bag retired
    assert (out / "stale" / "s.h5").is_file()
    assert _cli([*base, "--min-tissue", "0.9"], capsys)[0] == 0  # a new, different bag
    second = read_bag(out / "bags" / "s.h5").features
    assert second.shape != first.shape
    before = _snapshot(tmp_path, out)
    rc, _, err = _cli([*base, "--min-tissue", "0.9", "--target-mpp", "0.2"], capsys)  # fails again
    assert rc == 3 and "s" in err and "manifest.csv" in err
    kept = sorted((out / "stale").glob("s*.h5"))
    assert len(kept) == 2, kept
    shapes = sorted(read_bag(p).features.shape for p in kept)
    assert shapes == sorted([first.shape, second.shape])  # both earlier results are still there
    np.testing.assert_array_equal(read_bag(out / "stale" / "s.h5").features, first)
    newest = next(p for p in kept if p.name != "s.h5")
    msg = read_manifest(out / "manifest.csv")["s"]["message"]
    assert f"stale/{newest.name}" in msg and f"stale/{newest.name}" in caplog.text
    assert _snapshot(tmp_path, out) == before
