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
REFUSED = ["--max-side-px", "100", "--overwrite"]  # redo the slide and make it fail (its 500 px exceed the limit)


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
    assert _cli([*base, *REFUSED], capsys)[0] == 3  # the slide is refused now: it fails, its bag is retired
    assert (out / "stale" / "s.h5").is_file()
    assert _cli([*base, "--min-tissue", "0.9"], capsys)[0] == 0  # a new, different bag
    second = read_bag(out / "bags" / "s.h5").features
    assert second.shape != first.shape
    before = _snapshot(tmp_path, out)
    rc, _, err = _cli([*base, "--min-tissue", "0.9", *REFUSED], capsys)  # fails again
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


# ------------------------------------------------------------------------ unclear messages / tracebacks
@pytest.mark.parametrize("content, expect", [
    pytest.param(b"slide_id,mpp\na,nan\n", ["'nan'", "finite", "line 2"], marks=pytest.mark.fault(kind="traceback"),
                 id="nan"),
    pytest.param(b"slide_id,mpp\na,inf\n", ["'inf'", "finite", "line 2"], marks=pytest.mark.fault(kind="unclear"),
                 id="inf"),
    pytest.param(b"slide_id,mpp\nb,0.5\na\n", ["line 3", "no mpp value"], marks=pytest.mark.fault(kind="traceback"),
                 id="row-without-mpp"),
    pytest.param("slide_id,mpp\na,0.5\n".encode("utf-16"), ["not UTF-8", "UTF-8 CSV"],
                 marks=pytest.mark.fault(kind="unclear"), id="utf16"),
])
def test_bad_mpp_csv_values_name_the_file_and_line(tmp_path, tissue, capsys, content, expect):
    inp, out = tmp_path / "in", tmp_path / "out"
    _slide(inp, tissue, name="a.tif", mpp=None)
    csv = tmp_path / "mpp.csv"
    csv.write_bytes(content)
    before = _snapshot(tmp_path, out)
    rc, _, err = _cli(["--input", inp, "--output", out, "--mpp-csv", csv, *SEG_TILE], capsys)
    line = err.strip().splitlines()[-1]
    assert rc == 1 and "Traceback" not in err
    assert line.startswith(f"wsi-preprocess: error: --mpp-csv {csv}:") and all(e in line for e in expect), line
    assert not out.exists() and _snapshot(tmp_path, out) == before


def test_excel_bom_in_mpp_csv_is_accepted(tmp_path, tissue, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    _slide(inp, tissue, name="a.tif", mpp=None)
    csv = tmp_path / "mpp.csv"
    csv.write_bytes("slide_id,mpp\r\na,0.5\r\n".encode("utf-8-sig"))
    assert _cli(["--input", inp, "--output", out, "--mpp-csv", csv, *SEG_TILE], capsys)[0] == 0
    assert read_manifest(out / "manifest.csv")["a"]["status"] == "ok"


@pytest.mark.fault(kind="traceback")
@pytest.mark.parametrize("flag", ["--mpp-csv", "--slides"])
def test_missing_csv_file_is_named(tmp_path, tissue, capsys, flag):
    inp, out = tmp_path / "in", tmp_path / "out"
    _slide(inp, tissue)
    missing = tmp_path / "nope.csv"
    before = _snapshot(tmp_path, out)
    rc, _, err = _cli(["--input", inp, "--output", out, flag, missing, *SEG_TILE], capsys)
    assert rc == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"wsi-preprocess: error: {flag} {missing}: no such file"
    assert not out.exists() and _snapshot(tmp_path, out) == before


@pytest.mark.fault(kind="traceback")
def test_output_that_is_a_file_is_refused(tmp_path, tissue, capsys):
    inp, out = tmp_path / "in", tmp_path / "results.csv"
    _slide(inp, tissue)
    out.write_text("precious,results\n")
    before = _snapshot(tmp_path, tmp_path / "-")  # everything, the file included
    rc, _, err = _cli(["--input", inp, "--output", out, *SEG_TILE], capsys)
    assert rc == 1 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert str(out) in line and "not a folder" in line
    assert _snapshot(tmp_path, tmp_path / "-") == before and out.read_text() == "precious,results\n"


@pytest.mark.fault(kind="unclear")
def test_permission_denied_on_a_slide_says_so(tmp_path, tissue, capsys, monkeypatch):
    from preprocessing import file_checks as readers  # the readability check lives there

    inp, out = tmp_path / "in", tmp_path / "out"
    _slide(inp, tissue, name="good.svs")
    locked = _slide(inp, tissue, name="secret.svs")
    if os.geteuid() == 0:  # root reads everything: make the OS answer as it would for another user
        real_open = open

        def denying_open(path, *a, **kw):
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *a, **kw)

        monkeypatch.setattr(readers, "open", denying_open, raising=False)
    else:
        locked.chmod(0)
    before = _snapshot(tmp_path, out)
    rc, _, err = _cli(["--input", inp, "--output", out, *SEG_TILE], capsys)
    rows = read_manifest(out / "manifest.csv")
    assert rc == 3 and rows["good"]["status"] == "ok" and rows["secret"]["status"] == "unreadable"
    assert str(locked) in rows["secret"]["message"] and "permission denied" in rows["secret"]["message"]
    assert "Unsupported" not in rows["secret"]["message"]
    assert any(str(locked) in ln and "permission denied" in ln for ln in err.splitlines())
    assert _snapshot(tmp_path, out) == before


@pytest.mark.fault(kind="unclear")
def test_input_folder_without_slides_is_an_error(tmp_path, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    (inp / "sub").mkdir(parents=True)
    (inp / "sub" / "notes.txt").write_text("no slides here")
    before = _snapshot(tmp_path, out)
    rc, outtxt, err = _cli(["--input", inp, "--output", out, *SEG_TILE], capsys)
    assert rc == 1 and "total" not in outtxt
    line = err.strip().splitlines()[-1]
    assert str(inp) in line and "no slides found" in line
    assert not out.exists() and _snapshot(tmp_path, out) == before


@pytest.mark.fault(kind="unclear")
def test_empty_lock_file_does_not_block_the_slide(tmp_path, tissue, capsys, caplog):
    inp, out = tmp_path / "in", tmp_path / "out"
    _slide(inp, tissue)
    lock = out / "locks" / "s.lock"
    lock.parent.mkdir(parents=True)
    lock.write_bytes(b"")  # a process killed between creating its lock and writing its pid
    os.utime(lock, (lock.stat().st_atime - 60, lock.stat().st_mtime - 60))
    before = _snapshot(tmp_path, out)
    rc, outtxt, _ = _cli(["--input", inp, "--output", out, *SEG_TILE], capsys)  # --lock-timeout: 6 h default
    assert rc == 0 and read_manifest(out / "manifest.csv")["s"]["status"] == "ok"
    assert "another process" not in outtxt
    assert f"broke stale lock {lock}" in caplog.text and "no owner" in caplog.text
    assert not lock.exists() and _snapshot(tmp_path, out) == before


def test_fresh_lock_of_a_live_owner_still_blocks(tmp_path, tissue, capsys):
    """The other side of the stale-lock rule: a lock of a running process is respected."""
    import json

    from preprocessing.locks import HOST

    inp, out = tmp_path / "in", tmp_path / "out"
    _slide(inp, tissue)
    (out / "locks").mkdir(parents=True)
    (out / "locks" / "s.lock").write_text(json.dumps({"pid": os.getppid(), "host": HOST, "time": 1e18}))
    rc, outtxt, _ = _cli(["--input", inp, "--output", out, *SEG_TILE], capsys)
    assert rc == 0 and "1 slide(s) were being processed by another process" in outtxt


@pytest.mark.fault(kind="unclear")
def test_outputs_respect_the_umask(tmp_path, tissue, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    _slide(inp, tissue)
    old = os.umask(0o002)
    try:
        rc, _, _ = _cli(["--input", inp, "--output", out, *SEG_TILE], capsys)
    finally:
        os.umask(old)
    assert rc == 0
    for f in (out / "manifest.csv", out / "thumbnails" / "s.png", out / "coords" / "s.h5"):
        assert f.stat().st_mode & 0o777 == 0o664, (f, oct(f.stat().st_mode))


@pytest.mark.fault(kind="silent_wrong")
def test_slide_deleted_from_input_is_marked_missing_source(tmp_path, tissue, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    _slide(inp, tissue, name="keep.svs")
    gone = _slide(inp, tissue, name="gone.svs")
    base = ["--input", inp, "--output", out, *EXTRACT]
    assert _cli(base, capsys)[0] == 0
    bag = (out / "bags" / "gone.h5").read_bytes()
    saved = tmp_path / "saved.svs"
    gone.rename(saved)
    before = _snapshot(tmp_path, out)
    rc, _, err = _cli(base, capsys)
    assert rc == 0
    rows = read_manifest(out / "manifest.csv")
    assert rows["keep"]["status"] == "ok" and rows["gone"]["status"] == "missing_source"
    assert str(gone) in rows["gone"]["message"] and "bags/gone.h5 is kept" in rows["gone"]["message"]
    line = err.strip().splitlines()[-1]
    assert "gone" in line and "missing_source" in line and "manifest.csv" in line
    assert (out / "bags" / "gone.h5").read_bytes() == bag  # the earlier result is kept
    assert _snapshot(tmp_path, out) == before
    saved.rename(gone)  # the file is back, unchanged: its bag fits again and the row is ok again
    assert _cli(base, capsys)[0] == 0
    assert read_manifest(out / "manifest.csv")["gone"]["status"] == "ok"


# ------------------------------------------------------------------------ bounded memory on hostile files
@pytest.mark.fault(kind="memory")
def test_header_declaring_a_huge_slide_is_refused_or_read_in_bounded_memory(tmp_path, tissue, capsys, caplog):
    import logging
    import time
    import tracemalloc

    from _images import write_header_only_tiff

    inp, out = tmp_path / "in", tmp_path / "out"
    _slide(inp, tissue, name="good.svs")
    base = ["--input", inp, "--output", out, *SEG_TILE]
    assert _cli(base, capsys)[0] == 0
    thumb = (out / "thumbnails" / "good.png").read_bytes()
    # 1,000,000 px wide: a few MB of header; reading it used to allocate width x 2048 x 3 bytes at once (6 GB)
    huge = write_header_only_tiff(inp / "huge.svs", 1_000_000, 1_000)
    assert huge.stat().st_size < 200_000
    before = _snapshot(tmp_path, out)
    t0 = time.monotonic()
    rc, _, err = _cli(base, capsys)
    assert rc == 3 and time.monotonic() - t0 < 20
    row = read_manifest(out / "manifest.csv")["huge"]
    assert row["status"] == "error" and str(huge) in row["message"] and "1000000 x 1000 px" in row["message"]
    assert "--max-side-px 500000" in row["message"]
    assert any(str(huge) in ln and "--max-side-px" in ln for ln in err.splitlines())
    assert (out / "thumbnails" / "good.png").read_bytes() == thumb  # the earlier result is kept
    assert _snapshot(tmp_path, out) == before
    # the limit is a flag; above it the file is read block by block: memory bounded by the thumbnail
    tracemalloc.start()
    try:
        t0 = time.monotonic()
        with caplog.at_level(logging.INFO, logger="preprocessing"):
            rc, _, _ = _cli([*base, "--max-side-px", "2000000"], capsys)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rc == 0 and read_manifest(out / "manifest.csv")["huge"]["status"] == "no_tissue"
    assert time.monotonic() - t0 < 30
    assert peak < 150e6, f"peak {peak / 1e6:.0f} MB"
    assert f"{huge}: reading the segmentation thumbnail from level 0 (1000000 x 1000 px)" in caplog.text
    assert "thumbnail 50%" in caplog.text  # progress is logged
    assert (out / "thumbnails" / "good.png").read_bytes() == thumb


@pytest.mark.fault(kind="unclear")  # OpenCV refused it too, as "cannot decode the image"
def test_plain_image_declaring_a_huge_size_is_refused_before_decoding(tmp_path, tissue, capsys):
    import struct
    import zlib

    inp, out = tmp_path / "in", tmp_path / "out"
    _slide(inp, tissue, name="good.svs")
    ihdr = struct.pack(">IIBBBBB", 40_000, 40_000, 8, 2, 0, 0, 0)  # 40000² RGB: 4.8 GB once decoded
    png = inp / "photo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
                    + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)))
    csv = tmp_path / "mpp.csv"
    csv.write_text("slide_id,mpp\nphoto,0.5\n")
    before = _snapshot(tmp_path, out)
    rc, _, err = _cli(["--input", inp, "--output", out, "--mpp-csv", csv, *SEG_TILE], capsys)
    rows = read_manifest(out / "manifest.csv")
    assert rc == 3 and rows["good"]["status"] == "ok" and rows["photo"]["status"] == "unreadable"
    assert str(png) in rows["photo"]["message"] and "40000 x 40000 px, too large" in rows["photo"]["message"]
    assert any(str(png) in ln and "too large to decode" in ln for ln in err.splitlines())
    assert _snapshot(tmp_path, out) == before
