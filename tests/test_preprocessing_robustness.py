"""`wsi-preprocess` robustness: stale bags after a failed redo, stage reuse, implausible / missing mpp,
plain TIFFs and images, exit codes, dying reader processes, resume triggers, thumbnails."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from _images import preprocess_config

from preprocessing import extract as extract_mod
from preprocessing import stream as stream_mod
from preprocessing import synthetic
from preprocessing.cli import main
from preprocessing.extract import run
from preprocessing.manifest import Manifest, atomic_path, read_manifest
from preprocessing.mpp import mpp_from_properties
from preprocessing.readers import TiffImageReader, open_slide
from preprocessing.tiling import EffectiveMppError, plan_tiles
from wsi_ncmi.data.bags import read_bag

_cfg = preprocess_config
ENC = "test_resnet"


@pytest.fixture(scope="module")
def tissue() -> np.ndarray:
    rgb, _ = synthetic.synthetic_tissue(600, 800, seed=5, n_blobs=2, coverage=0.35)
    return rgb


def _one_slide(folder: Path, rgb: np.ndarray, name: str = "s.svs", **kw) -> Path:
    return synthetic.write_svs(folder / name, rgb, **{"mpp": 0.5, "downsamples": (1, 4), **kw})


# ------------------------------------------------------------------------------ 1. stale bags
def test_failed_redo_moves_the_old_bag_out_of_bags(tmp_path, tissue):
    inp, out = tmp_path / "in", tmp_path / "out"
    _one_slide(inp, tissue)
    cfg = _cfg(inp, out)
    assert run(cfg).statuses == {"s": "ok"}
    # target finer than the slide's 0.5 µm/px (the folder's settings change: --overwrite): the redo fails; the
    # 2.0 µm/px bag must not stay in bags/
    res = run(replace(cfg, target_mpp=0.2, overwrite=True))
    row = read_manifest(out / "manifest.csv")["s"]
    assert res.statuses == {"s": "error"} and row["status"] == "error"
    assert float(row["mpp"]) == 0.5  # MppTooCoarseError rows carry the slide's mpp
    assert not list((out / "bags").glob("*.h5"))
    assert (out / "stale" / "s.h5").is_file() and "stale/s.h5" in row["message"]
    assert read_bag(out / "stale" / "s.h5").attrs["target_mpp"] == 2.0  # the old bag, kept for the user


def test_mpp_missing_and_no_tissue_redo_retire_the_bag(tmp_path, tissue):
    inp, out = tmp_path / "in", tmp_path / "out"
    _one_slide(inp, tissue, name="n.tif", mpp=None)
    csv = tmp_path / "mpp.csv"
    csv.write_text("slide_id,mpp\nn,0.5\n")
    cfg = _cfg(inp, out, mpp_csv=str(csv))
    assert run(cfg).statuses == {"n": "ok"}
    assert run(replace(cfg, mpp_csv=None)).statuses == {"n": "mpp_missing"}  # override removed
    assert not (out / "bags" / "n.h5").exists() and (out / "stale" / "n.h5").is_file()
    assert run(cfg).statuses == {"n": "ok"} and (out / "bags" / "n.h5").is_file()
    assert run(replace(cfg, tissue_threshold=255)).statuses == {"n": "no_tissue"}  # nothing counts as tissue
    assert not (out / "bags" / "n.h5").exists()
    # the first retired bag stays in stale/n.h5; the second gets a timestamped name beside it
    second = [p.name for p in (out / "stale").glob("n.*.h5")]
    assert len(second) == 1 and (out / "stale" / "n.h5").is_file()
    assert f"stale/{second[0]}" in read_manifest(out / "manifest.csv")["n"]["message"]


# ------------------------------------------------------------------------------ 3. stage reuse
def test_extract_stage_reuses_coords_of_an_earlier_tile_stage(tmp_path, tissue, monkeypatch, caplog):
    inp, out = tmp_path / "in", tmp_path / "out"
    _one_slide(inp, tissue)
    cfg = _cfg(inp, out)
    assert run(replace(cfg, stages="seg,tile")).statuses == {"s": "ok"}
    import h5py

    with h5py.File(out / "coords" / "s.h5", "r") as f:
        coords = f["coords"][:]
    assert not (out / "bags").exists() or not list((out / "bags").iterdir())

    calls: list[int] = []
    real = stream_mod.segment_tissue

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(stream_mod, "segment_tissue", counting)
    with caplog.at_level(logging.INFO, logger="preprocessing"):
        assert run(replace(cfg, stages="extract")).statuses == {"s": "ok"}
    assert calls == [] and "reusing" in caplog.text  # no second segmentation
    np.testing.assert_array_equal(read_bag(out / "bags" / "s.h5").coords, coords)
    # other tiling settings: the coords file does not fit, tiling is redone (and logged)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="preprocessing"):
        assert run(replace(cfg, stages="extract", min_tissue=0.9)).statuses == {"s": "ok"}
    assert calls == [1] and "not reusing" in caplog.text and "min_tissue" in caplog.text


# ------------------------------------------------------------------------------ 4. implausible mpp
def test_72_dpi_resolution_is_not_an_mpp(tmp_path, tissue):
    rejected: list[str] = []
    props = {"tiff.XResolution": "72", "tiff.YResolution": "72", "tiff.ResolutionUnit": "inch"}
    assert mpp_from_properties(props, rejected) is None and "352.8" in rejected[0]
    assert mpp_from_properties({"openslide.mpp-x": "0.01"}) is None
    inp = tmp_path / "in"
    _one_slide(inp, tissue, name="dpi.tif", mpp=352.8, vendor="generic")  # = 72 dpi in the TIFF tags
    res = run(_cfg(inp, tmp_path / "out", stages="seg"))
    row = read_manifest(tmp_path / "out" / "manifest.csv")["dpi"]
    assert res.statuses == {"dpi": "mpp_missing"}
    assert "352.8" in row["message"] and "--mpp-csv" in row["message"]


# ------------------------------------------------------------------------------ 5. plain TIFF, png
def test_plain_stripped_tiff_and_png_with_mpp(tmp_path, tissue):
    import tifffile

    inp = tmp_path / "in"
    inp.mkdir()
    tifffile.imwrite(inp / "strip_res.tif", tissue, photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5),
                     resolutionunit="CENTIMETER")  # not tiled: OpenSlide refuses it
    tifffile.imwrite(inp / "strip_csv.tif", tissue, photometric="rgb")
    cv2.imwrite(str(inp / "pic.png"), cv2.cvtColor(tissue, cv2.COLOR_RGB2BGR))
    with open_slide(inp / "strip_res.tif") as r:
        assert isinstance(r, TiffImageReader) and r.mpp == pytest.approx(0.5)
    csv = tmp_path / "mpp.csv"
    csv.write_text("slide_id,mpp\nstrip_csv,0.5\npic,0.5\n")
    cfg = _cfg(inp, tmp_path / "out", mpp_csv=str(csv))
    res = run(cfg)
    assert res.statuses == {"strip_res": "ok", "strip_csv": "ok", "pic": "ok"}
    bags = {k: read_bag(tmp_path / "out" / "bags" / f"{k}.h5") for k in res.statuses}
    np.testing.assert_array_equal(bags["strip_res"].coords, bags["pic"].coords)
    np.testing.assert_allclose(np.asarray(bags["strip_res"].features, np.float32),
                               np.asarray(bags["pic"].features, np.float32), atol=1e-3)
    # resume: a changed mpp in the CSV redoes that slide only
    csv.write_text("slide_id,mpp\nstrip_csv,0.5\npic,0.25\n")
    again = run(cfg)
    assert again.written == ["pic"] and again.statuses["strip_csv"] == "skipped"
    assert read_bag(tmp_path / "out" / "bags" / "pic.h5").attrs["slide_mpp"] == 0.25


# ------------------------------------------------------------------------------ 6. exit codes
def test_exit_code_3_when_slides_fail_and_summary_first(tmp_path, tissue, capsys):
    inp = tmp_path / "in"
    _one_slide(inp, tissue, name="good.svs")
    synthetic.write_svs(inp / "blank.svs", np.full((400, 400, 3), 238, np.uint8), mpp=0.5)
    base = ["--input", str(inp), "--output", str(tmp_path / "o"), "--stages", "seg", "--workers", "0",
            "--seg-mpp", "4", "--target-mpp", "2", "--patch-size", "32", "--no-progress"]
    assert main(base) == 0  # ok + no_tissue: not failures
    capsys.readouterr()
    _one_slide(inp, tissue, name="nompp.tif", mpp=None)
    assert main(base) == 3
    cap = capsys.readouterr()
    assert "mpp_missing      1" in cap.out and "nompp" in cap.err and "manifest.csv" in cap.err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "3  at least one slide ended error" in capsys.readouterr().out


# ------------------------------------------------------------------------------ 7. dying readers
def test_a_reader_process_that_dies_is_recorded_and_the_run_goes_on(tmp_path, tissue, monkeypatch, caplog):
    inp, out = tmp_path / "in", tmp_path / "out"
    for name in ("a.svs", "boom.svs", "c.svs", "d.svs"):
        _one_slide(inp, tissue, name=name)
    real = stream_mod.open_slide

    def crashing(path, mpp=None):  # runs in the forked DataLoader worker: a hard death, like a segfault
        if Path(path).stem == "boom":
            os._exit(7)
        return real(path, mpp=mpp)

    monkeypatch.setattr(stream_mod, "open_slide", crashing)
    with caplog.at_level(logging.WARNING, logger="preprocessing.extract"):
        res = run(_cfg(inp, out, workers=2))
    rows = read_manifest(out / "manifest.csv")
    errors = [m.group(1) for r in caplog.records if (m := re.match(r"(\w+): error ", r.getMessage()))]
    assert errors == ["boom"]  # no other slide is blamed (torch's SIGCHLD error can strike any line)
    assert res.statuses == {"a": "ok", "boom": "error", "c": "ok", "d": "ok"}
    assert "reader process died" in rows["boom"]["message"] and "boom.svs" in rows["boom"]["message"]
    assert sorted(p.stem for p in (out / "bags").glob("*.h5")) == ["a", "c", "d"]
    assert not list((out / "locks").iterdir())


# ------------------------------------------------------------------------------ 8. smaller items
def test_effective_mpp_outside_tolerance_is_an_error():
    with pytest.raises(EffectiveMppError, match="larger --patch-size"):
        plan_tiles(0.9, (1.0,), target_mpp=1.0, patch_size=8, tolerance=0.01)  # 9 px * 0.9 / 8 = 1.0125
    assert plan_tiles(0.9, (1.0,), target_mpp=1.0, patch_size=64, tolerance=0.01).effective_mpp == pytest.approx(
        0.9 * 71 / 64)


def test_resume_redoes_a_touched_slide_and_overwrite_redoes_all(tmp_path, tissue):
    inp, out = tmp_path / "in", tmp_path / "out"
    path = _one_slide(inp, tissue)
    cfg = _cfg(inp, out)
    assert run(cfg).written == ["s"] and run(cfg).written == []
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, newer file
    assert run(cfg).written == ["s"]
    assert run(replace(cfg, overwrite=True)).written == ["s"]
    assert run(cfg).written == []


def test_manifest_writes_are_atomic(tmp_path):
    m = Manifest(tmp_path / "manifest.csv")
    m.update({"slide_id": "a", "status": "ok"})
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "manifest.csv") as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert read_manifest(tmp_path / "manifest.csv")["a"]["status"] == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.csv"]  # no temporary left behind


def test_thumbnail_shows_contours_and_kept_tiles(tmp_path, tissue):
    inp, out = tmp_path / "in", tmp_path / "out"
    _one_slide(inp, tissue)
    run(_cfg(inp, out, stages="seg,tile"))
    png = cv2.cvtColor(cv2.imread(str(out / "thumbnails" / "s.png")), cv2.COLOR_BGR2RGB)
    green = np.all(png == (0, 200, 0), axis=-1)  # tissue contour
    blue = np.all(png == (30, 60, 220), axis=-1)  # kept tile boxes
    assert green.sum() > 50 and blue.sum() > 50
    import h5py

    with h5py.File(out / "coords" / "s.h5", "r") as f:
        coords, ds = f["coords"][:], png.shape[1] / 800  # thumbnail px per level-0 px
    x, y = (coords[0] * ds).astype(int)
    assert blue[y, x:x + 3].any() or blue[y:y + 3, x].any()  # a box starts at the first kept tile


class _TimedStream(extract_mod.SlideStream):
    """Reads nothing: 'processes' a slide by sleeping (long for the largest file) and reports its worker."""

    def _slide(self, task):
        import time as _time

        _time.sleep(3.0 if task.slide_id == "big" else 0.05)
        yield {"kind": "end", "slide": task.index, "pid": os.getpid()}


def test_workers_take_slides_from_a_shared_queue_largest_first(tmp_path: Path) -> None:
    """A worker stuck on a large slide does not hold a fixed share of the others: the free worker takes them."""
    from torch.utils.data import DataLoader

    tasks = []
    for i, (name, size) in enumerate([("s0", 10), ("big", 10_000), ("s2", 20), ("s3", 30), ("s4", 40)]):
        path = tmp_path / f"{name}.svs"
        path.write_bytes(b"x" * size)
        tasks.append(extract_mod.SlideTask(index=i, slide_id=name, path=path))
    stream = _TimedStream(tasks, _cfg(tmp_path, tmp_path / "out"), {}, os.getpid(), tmp_path / "out", workers=2)
    assert [tasks[i].slide_id for i in stream.order] == ["big", "s4", "s3", "s2", "s0"]
    loader = DataLoader(stream, batch_size=None, num_workers=2, collate_fn=lambda m: m, **extract_mod._loader_kwargs())
    ends = list(loader)
    assert sorted(m["slide"] for m in ends) == [0, 1, 2, 3, 4]  # each slide exactly once
    by_pid: dict[int, list[int]] = {}
    for m in ends:
        by_pid.setdefault(m["pid"], []).append(m["slide"])
    assert sorted(len(v) for v in by_pid.values()) == [1, 4], by_pid  # static w::W shares would give [2, 3]


def test_plain_images_are_slides_only_with_their_mpp(tmp_path: Path, caplog) -> None:
    from preprocessing.plan import plan_slides

    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("label_photo.png", "scan.jpg", "slide.svs"):
        (inp / name).write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="preprocessing"):
        assert [t.slide_id for t in plan_slides(_cfg(inp, tmp_path / "out"))] == ["slide"]
    assert "ignoring 2 plain image(s)" in caplog.text and "label_photo.png" in caplog.text
    mpp_csv = tmp_path / "mpp.csv"
    mpp_csv.write_text("slide_id,mpp\nscan,0.5\n")
    tasks = plan_slides(_cfg(inp, tmp_path / "out", mpp_csv=str(mpp_csv)))
    assert [(t.slide_id, t.mpp_override) for t in tasks] == [("scan", 0.5), ("slide", None)]
    listed = tmp_path / "list.csv"
    listed.write_text("slide_id\nlabel_photo\n")  # explicitly asked for: kept (and reported mpp_missing later)
    assert [t.slide_id for t in plan_slides(_cfg(inp, tmp_path / "out", slides=str(listed)))] == ["label_photo"]
