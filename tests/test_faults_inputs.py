"""Reliability suite (issue #22, part 2), inputs and output folder of ``wsi-preprocess`` and the weight files of
every command: a full disk, a read-only or shared output folder, bad weight files, long slide names, an output
folder inside the input, a CIFAR pickle payload. Each case ends in one line naming the file and the problem, and
nothing written before is lost or left looking complete. ``kind`` is how the case ended before its fix."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from preprocessing import synthetic
from preprocessing.cli import main
from preprocessing.manifest import read_manifest
from wsi_ncmi.data.bags import read_bag

ROOT = Path(__file__).resolve().parents[1]
EXTRACT = ["--workers", "0", "--seg-mpp", "4", "--target-mpp", "2", "--patch-size", "32", "--min-tissue", "0.5",
           "--no-progress", "--encoder", "test_resnet", "--weights", "random", "--device", "cpu", "--batch-size", "64"]


@pytest.fixture(scope="module")
def tissue() -> np.ndarray:
    rgb, _ = synthetic.synthetic_tissue(400, 500, seed=7, n_blobs=2, coverage=0.4)
    return rgb


def _slide(folder: Path, rgb: np.ndarray, name: str = "s.svs") -> Path:
    return synthetic.write_svs(folder / name, rgb, mpp=0.5, downsamples=(1, 4))


def _cli(argv: list, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _live_log_streams(monkeypatch) -> None:
    """Point log handlers bound to an earlier test's (closed) captured stderr, e.g. Lightning's, at the current
    one: their "--- Logging error ---" reports would land in the stderr checked here."""
    loggers = [logging.getLogger(), *(v for v in logging.root.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    for h in (h for lg in loggers for h in lg.handlers):
        if getattr(getattr(h, "stream", None), "closed", False):
            monkeypatch.setattr(h, "stream", sys.stderr)


def _last(err: str) -> str:
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, *opts: str):
    """A small tmpfs at ``path`` (root only); the test is skipped where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *opts]), "tmpfs", str(path)]
    if os.geteuid() != 0 or subprocess.run(cmd, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(disk: Path, leave: int) -> Path:
    """A filler file leaving about ``leave`` bytes free on ``disk``."""
    import shutil

    filler = disk / "filler.bin"
    filler.write_bytes(b"\0" * max(shutil.disk_usage(disk).free - leave, 0))
    return filler


# ------------------------------------------------------------------------------------------- a full disk
@pytest.mark.fault(kind="traceback")  # h5py tracebacks, "Can't destroy cache", a segfault (exit 139) with workers
@pytest.mark.parametrize("where", ["free-space-check", "mid-write"])
def test_disk_full_while_writing_a_bag_stops_cleanly_and_resumes(tmp_path, tissue, capsys, monkeypatch, where):
    from preprocessing import writer

    inp = tmp_path / "in"
    for name in ("a.svs", "b.svs"):
        _slide(inp, tissue, name=name)
    with _tmpfs(tmp_path / "disk", "1m") as disk:
        out = disk / "out"
        if where == "mid-write":  # no early check: the bag write itself meets the full disk
            monkeypatch.setattr(writer, "check_free_space", lambda path, need: None)
        filler = _fill(disk, 16 << 10)  # room for the thumbnails and the manifest, not for a ~14 kB bag
        rc, _, err = _cli(["--input", inp, "--output", out, *EXTRACT], capsys)
        line = _last(err)
        assert rc == 3 and line.startswith("wsi-preprocess: disk full: ") and "no space left on device" in line
        assert "bags/" in line and "free space, then rerun the same command" in line
        rows = read_manifest(out / "manifest.csv")
        assert len(rows) == 1  # the run stopped at the first slide instead of failing every next one
        (sid, row), = rows.items()
        assert row["status"] == "error" and "no space left on device" in row["message"]
        assert str(out / "bags" / f"{sid}.h5") in row["message"]
        assert not list(out.rglob("*.h5")) and not list(out.rglob("*.tmp"))  # no partial bag, no temp file
        filler.unlink()
        monkeypatch.undo()
        rc, _, _ = _cli(["--input", inp, "--output", out, *EXTRACT], capsys)  # space again: the same command
        assert rc == 0 and {r["status"] for r in read_manifest(out / "manifest.csv").values()} == {"ok"}
        assert read_bag(out / "bags" / "a.h5").n > 0 and read_bag(out / "bags" / "b.h5").n > 0


@pytest.mark.fault(kind="traceback")
def test_disk_full_during_the_thumbnail_is_recorded_and_stops_the_run(tmp_path, tissue, capsys, monkeypatch):
    from preprocessing import stream

    inp, out = tmp_path / "in", tmp_path / "out"
    for name in ("a.svs", "b.svs"):
        _slide(inp, tissue, name=name)
    assert _cli(["--input", inp, "--output", out, *EXTRACT, "--slides", _ids(tmp_path, "a")], capsys)[0] == 0
    bag = (out / "bags" / "a.h5").read_bytes()

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(stream, "atomic_write_bytes", full)
    rc, _, err = _cli(["--input", inp, "--output", out, *EXTRACT, "--overwrite"], capsys)
    line = _last(err)
    assert rc == 3 and str(out / "thumbnails") in line and "no space left on device" in line and "stopped" in line
    rows = read_manifest(out / "manifest.csv")
    done = [s for s in ("a", "b") if rows.get(s, {}).get("status") == "error"]
    assert len(done) == 1 and "no space left on device" in rows[done[0]]["message"]  # one slide, then the stop
    assert (out / "bags" / "a.h5").read_bytes() == bag  # the earlier bag is neither lost nor retired


# ------------------------------------------------------------------------------------------- output folder
@pytest.mark.fault(kind="traceback")
def test_read_only_output_folder_is_named_before_any_slide_is_read(tmp_path, tissue, capsys, monkeypatch):
    from preprocessing import stream

    inp, out = tmp_path / "in", tmp_path / "out"
    _slide(inp, tissue)
    opened = []
    monkeypatch.setattr(stream, "open_slide", lambda *a, **k: opened.append(a) or pytest.fail("slide was read"))
    with _tmpfs(out, "64k", "ro"):
        rc, _, err = _cli(["--input", inp, "--output", out, *EXTRACT], capsys)
        line = _last(err)
        assert rc == 1 and line.startswith(f"wsi-preprocess: error: --output {out}: cannot write in this folder")
        assert "Read-only" in line and not opened


def _ids(folder: Path, *ids: str) -> Path:
    path = folder / f"slides_{'_'.join(ids)}.csv"
    path.write_text("slide_id\n" + "".join(f"{i}\n" for i in ids))
    return path


def _other_weights(path: Path, seed: int = 1, nan: bool = False) -> Path:
    import timm

    torch.manual_seed(seed)
    sd = {k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=0).state_dict().items()}
    if nan:
        sd["conv1.0.weight"] = torch.full_like(sd["conv1.0.weight"], float("nan"))
    save_file(sd, str(path))
    return path


@pytest.mark.fault(kind="silent_wrong")  # both runs exited 0, the manifest said ok and the bags were mixed
def test_a_run_with_other_weights_into_the_same_folder_is_refused(tmp_path, tissue, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    for name in ("a.svs", "b.svs"):
        _slide(inp, tissue, name=name)
    assert _cli(["--input", inp, "--output", out, *EXTRACT, "--slides", _ids(tmp_path, "a")], capsys)[0] == 0
    weights = _other_weights(tmp_path / "other.safetensors")
    before = {p.name: p.read_bytes() for p in (out / "bags").iterdir()}
    other = ["--input", inp, "--output", out, *EXTRACT, "--weights", weights]
    rc, _, err = _cli(other, capsys)  # b is new, a would be redone: either way the folder would mix weights
    line = _last(err)
    assert rc == 1 and line.startswith(f"wsi-preprocess: error: --output {out}: its bags were made with other settings")
    assert "weights_sha256 'random' -> '" in line and str(out / "settings.json") in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in (out / "bags").iterdir()} == before
    assert set(read_manifest(out / "manifest.csv")) == {"a"}
    rc, _, err = _cli([*other[:-2], "--weights", "random", "--target-mpp", "1"], capsys)
    assert rc == 1 and "target_mpp 2.0 -> 1.0" in _last(err)
    # same settings: resume as before (a skipped, b done)
    assert _cli(["--input", inp, "--output", out, *EXTRACT], capsys)[0] == 0
    assert read_manifest(out / "manifest.csv")["b"]["status"] == "ok"
    # --overwrite takes the folder over: a is redone, b (not in this run) is retired, never left mixed
    old_b = (out / "bags" / "b.h5").read_bytes()
    assert _cli([*other, "--overwrite", "--slides", _ids(tmp_path, "a")], capsys)[0] == 0
    assert sorted(p.name for p in (out / "bags").iterdir()) == ["a.h5"]
    assert read_bag(out / "bags" / "a.h5").attrs["weights_sha256"] != "random"
    assert (out / "stale" / "b.h5").read_bytes() == old_b
    (out / "settings.json").write_text("{")  # a damaged record is named, never silently replaced
    rc, _, err = _cli(other, capsys)
    assert rc == 1 and f"{out / 'settings.json'}: cannot read the output folder's settings record" in _last(err)


def test_a_folder_without_bags_takes_new_settings(tmp_path, tissue, capsys):
    import json

    inp, out = tmp_path / "in", tmp_path / "out"
    _slide(inp, tissue)
    assert _cli(["--input", inp, "--output", out, *EXTRACT, "--target-mpp", "0.2"], capsys)[0] == 3  # no bag made
    assert _cli(["--input", inp, "--output", out, *EXTRACT], capsys)[0] == 0  # nothing to mix with: accepted
    assert json.loads((out / "settings.json").read_text())["settings"]["target_mpp"] == 2.0
    assert read_bag(out / "bags" / "s.h5").attrs["target_mpp"] == 2.0


@pytest.mark.fault(kind="silent_wrong")  # the run went on writing bags of the old settings into the new folder
def test_a_run_whose_folder_was_taken_over_meanwhile_writes_nothing_more(tmp_path, tissue, capsys, monkeypatch):
    import json

    from preprocessing import writer

    inp, out = tmp_path / "in", tmp_path / "out"
    for name in ("a.svs", "b.svs"):
        _slide(inp, tissue, name=name)
    real = writer.verify_folder

    def taken_over(folder, wanted):  # another run claims the folder with --overwrite just before our first write
        record = json.loads((folder / "settings.json").read_text())
        record["settings"]["weights_sha256"] = "0" * 64
        (folder / "settings.json").write_text(json.dumps(record))
        real(folder, wanted)

    monkeypatch.setattr(writer, "verify_folder", taken_over)
    rc, _, err = _cli(["--input", inp, "--output", out, *EXTRACT], capsys)
    line = _last(err)
    assert rc == 3 and "another run changed the folder's settings" in line and "weights_sha256" in line
    assert not list(out.rglob("*.h5")) and len(read_manifest(out / "manifest.csv")) == 1


# ------------------------------------------------------------------------------------------- weight files
class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("case, expect", [
    pytest.param("missing", "no such file", marks=pytest.mark.fault(kind="traceback"), id="missing"),
    pytest.param("folder", "is a folder", marks=pytest.mark.fault(kind="traceback"), id="folder"),
    pytest.param("pickle", "not a safetensors file", marks=pytest.mark.fault(kind="traceback"), id="pickle-renamed"),
    pytest.param("nan", "hold NaN or inf", marks=pytest.mark.fault(kind="unclear"), id="nan"),
])
def test_bad_weight_file_is_named_by_wsi_preprocess(tmp_path, tissue, capsys, monkeypatch, case, expect):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    inp, out, marker = tmp_path / "in", tmp_path / "out", tmp_path / "pwned"
    _slide(inp, tissue)
    weights = tmp_path / "w.safetensors"
    if case == "folder":
        weights.mkdir()
    elif case == "pickle":
        torch.save({"w": torch.ones(1), "x": _Evil(marker)}, weights)
    elif case == "nan":
        _other_weights(weights, nan=True)
    rc, _, err = _cli(["--input", inp, "--output", out, *EXTRACT, "--weights", weights], capsys)
    line = _last(err)
    assert rc == 1 and line.startswith(f"wsi-preprocess: error: --weights {weights}: ") and expect in line
    assert not marker.exists() and not (out / "settings.json").exists() and not list(out.rglob("*.h5"))


@pytest.mark.fault(kind="silent_wrong")  # NaN weights gave NaN probabilities and NaN metrics
def test_nan_weights_are_named_by_ncmi_metric_and_the_backbones(tmp_path, capsys):
    from _images import write_imagefolder

    from wsi_ncmi.commands.ncmi_metric_cli import main_ncmi_metric
    from wsi_ncmi.natural.backbones import BackboneError, create_backbone, create_classifier

    sd = {k: v.contiguous() for k, v in create_classifier("resnet18", 3, width=0.125).state_dict().items()}
    sd["fc.weight"] = torch.full_like(sd["fc.weight"], float("nan"))
    bad = tmp_path / "nan.safetensors"
    save_file(sd, str(bad))
    data = write_imagefolder(tmp_path / "data")
    rc = main_ncmi_metric(["--weights", str(bad), "--data", str(data), "--image-size", "16", "--workers", "0",
                           "--device", "cpu", "--out", str(tmp_path / "m")])
    line = _last(capsys.readouterr().err)
    assert rc == 2 and line.startswith(f"wsi-ncmi ncmi-metric: {bad}: 1 tensor(s) hold NaN or inf")
    assert "fc.weight" in line
    with pytest.raises(BackboneError, match=r"nan\.safetensors: 1 tensor\(s\) hold NaN or inf"):
        create_backbone("resnet18", weights=str(bad), width=0.125)


# ------------------------------------------------------------------------------------------- names, folders
@pytest.mark.fault(kind="unclear")  # "error: OSError: [Errno 36] File name too long" (an internal temp name)
def test_a_245_character_slide_name_works(tmp_path, tissue, capsys):
    from preprocessing.writer import free_name
    from wsi_ncmi.data.atomic import NAME_MAX, fit_name

    long_a, long_b = "é" * 150 + "a", "é" * 150 + "b"  # 301 bytes each in UTF-8
    assert len(fit_name(long_a, ".h5.tmp").encode()) <= NAME_MAX and fit_name(long_a, ".h5.tmp").endswith(".h5.tmp")
    assert fit_name(long_a, ".x") != fit_name(long_b, ".x") and fit_name("short", ".h5") == "short.h5"

    inp, out = tmp_path / "in", tmp_path / "out"
    sid = "slide-" + "x" * 239
    assert len(sid) == 245
    _slide(inp, tissue, name=f"{sid}.svs")
    assert _cli(["--input", inp, "--output", out, *EXTRACT], capsys)[0] == 0
    assert read_bag(out / "bags" / f"{sid}.h5").n > 0 and (out / "thumbnails" / f"{sid}.png").is_file()
    assert read_manifest(out / "manifest.csv")[sid]["status"] == "ok"
    (out / "stale").mkdir()
    (out / "stale" / f"{sid}.h5").write_bytes(b"earlier")  # a retired bag there already: the next one gets a stamp
    second = free_name(out / "stale", sid, ".h5")
    assert second != out / "stale" / f"{sid}.h5" and len(second.name.encode()) <= NAME_MAX
    assert _cli(["--input", inp, "--output", out, *EXTRACT, "--max-side-px", "100", "--overwrite"], capsys)[0] == 3
    assert len(list((out / "stale").iterdir())) == 2  # the failed redo retired the bag beside the earlier one


@pytest.mark.fault(kind="unclear")  # "slide id 's' is used by two files: in/s.svs and in/out/thumbnails/s.png"
@pytest.mark.parametrize("inside", ["subfolder", "same-folder"])
def test_output_inside_input_is_not_searched_for_slides(tmp_path, tissue, capsys, caplog, inside):
    inp = tmp_path / "in"
    _slide(inp, tissue)
    out = inp / "out" if inside == "subfolder" else inp
    base = ["--input", inp, "--output", out, *EXTRACT]
    assert _cli(base, capsys)[0] == 0 and (out / "thumbnails" / "s.png").is_file()
    caplog.clear()
    rc, outtxt, _ = _cli(base, capsys)
    assert rc == 0 and list(read_manifest(out / "manifest.csv")) == ["s"]
    assert read_manifest(out / "manifest.csv")["s"]["status"] == "ok"
    assert "not searched for slides: it is the output folder" in caplog.text and str(out) in caplog.text


@pytest.mark.parametrize("case", [
    pytest.param("cifar-pickle", marks=pytest.mark.fault(kind="traceback"), id="cifar-pickle"),  # as a traceback
    pytest.param("missing-weights", marks=pytest.mark.fault(kind="traceback"), id="missing-weights"),
    pytest.param("nan-weights", marks=pytest.mark.fault(kind="silent_wrong"), id="nan-weights"),
])
def test_bad_cifar_file_or_backbone_weights_are_one_line_in_natural_fit(tmp_path, capsys, monkeypatch, case):
    from wsi_ncmi.commands.natural_cli import main as natural_main
    from wsi_ncmi.natural.backbones import create_backbone

    monkeypatch.chdir(tmp_path)
    _live_log_streams(monkeypatch)
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar" / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("train", "test"):
        blob = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"fine_labels": [0, 1, 2, 3]}
        if name == "train" and case == "cifar-pickle":
            blob[b"x"] = _Evil(marker)
        with open(folder / name, "wb") as fh:
            pickle.dump(blob, fh, protocol=2)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, fh, protocol=2)
    weights, extra = tmp_path / "backbone.safetensors", []
    if case != "cifar-pickle":
        extra = ["--model.weights", str(weights)]
    if case == "nan-weights":
        sd = {k: v.contiguous() for k, v in create_backbone("resnet18", cifar_stem=True, width=0.125)[0]
              .state_dict().items()}
        sd["conv1.weight"] = torch.full_like(sd["conv1.weight"], float("nan"))
        save_file(sd, str(weights))
    rc = natural_main(["fit", "-c", str(ROOT / "configs/natural/cifar100_resnet18_ce.yaml"), "--data.root",
                       str(folder.parent), "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
                       "--trainer.precision", "32", "--data.num_workers", "0", "--model.width", "0.125",
                       "--trainer.default_root_dir", str(tmp_path / "runs"), *extra])
    line = _last(capsys.readouterr().err)
    assert rc == 2 and line.startswith("wsi-ncmi natural fit: error: "), line
    expect = {"cifar-pickle": f"{folder / 'train'}: refused or malformed pickle (global posix.mkdir is not allowed",
              "missing-weights": f"weights file not found: {weights}",
              "nan-weights": f"{weights}: 1 tensor(s) hold NaN or inf values (e.g. ['conv1.weight'])"}[case]
    assert expect in line and not marker.exists()


@pytest.mark.fault(kind="traceback")  # --allow-mismatch skipped the SHA check: the reader's error surfaced raw
def test_predict_slides_dir_names_a_bad_weight_file(tmp_path, tissue, capsys, monkeypatch):
    from test_predict import _fit

    from wsi_ncmi.commands.predict_cli import main as predict_main

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    _live_log_streams(monkeypatch)
    slides, feats, marker = tmp_path / "slides", tmp_path / "features", tmp_path / "pwned"
    for i in range(4):
        _slide(slides, tissue, name=f"s{i}.svs")
    assert _cli(["--input", slides, "--output", feats, *EXTRACT], capsys)[0] == 0
    split = tmp_path / "split.csv"
    split.write_text("slide_id,patient_id,label,split\ns0,p0,0,train\ns1,p1,1,train\ns2,p2,0,val\ns3,p3,1,test\n")
    dim = read_bag(feats / "bags" / "s0.h5").dim
    ckpt = _fit(feats / "bags", split, tmp_path / "run", "head", epochs=1, in_dim=dim)
    pickled, nan = tmp_path / "w.safetensors", _other_weights(tmp_path / "nan.safetensors", nan=True)
    torch.save({"w": torch.ones(1), "x": _Evil(marker)}, pickled)
    for weights, expect in ((tmp_path / "missing.pth", "no such file"), (pickled, "not a safetensors file"),
                            (nan, "hold NaN or inf")):
        out = tmp_path / f"pred_{weights.stem}"
        rc = predict_main(["--ckpt", str(ckpt), "--slides-dir", str(slides), "--weights", str(weights), "--out",
                           str(out), "--allow-mismatch"])
        line = _last(capsys.readouterr().err)
        assert rc == 2 and f"--weights {weights}: " in line and expect in line, line
        assert not marker.exists() and not list(out.rglob("*.h5"))
