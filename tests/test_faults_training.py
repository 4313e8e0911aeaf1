"""Reliability suite, training / evaluation / heatmap side (issue #18): every bad input ends with one clear error
line naming the file (exit 2), changes nothing outside the output folder and loses no earlier result.

Each test carries ``@pytest.mark.fault(kind=...)``: how the case ended *before* its fix (``silent_wrong``,
``code_exec``, ``traceback``, ``unclear``, ``data_loss``); ``bench/faults.py`` tallies them.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _synthetic import make_witness_bags

from wsi_ncmi.data.bags import write_bag

DIM = 8


# ------------------------------------------------------------------------------------------------ helpers
def _snapshot(root: Path, exclude: Path | None = None) -> dict[str, tuple[int, str]]:
    """Every file under ``root`` (except under ``exclude``) -> (size, sha1): what a failed command must not touch."""
    out: dict[str, tuple[int, str]] = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or (exclude is not None and (p == exclude or exclude in p.parents)):
            continue
        data = p.read_bytes()
        out[str(p.relative_to(root))] = (len(data), hashlib.sha1(data).hexdigest())
    return out


def _error_line(err: str, command: str) -> str:
    """The command's error output must be exactly one line ``wsi-ncmi <command>: error: ...``."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"wsi-ncmi {command}: error: "), lines[0]
    return lines[0]


def _cli_args(bags_dir: Path, split: Path, root: Path, *extra: str) -> list[str]:
    return ["--data.bags_dir", str(bags_dir), "--data.split_csv", str(split), "--data.num_workers", "0",
            "--data.pin_memory", "false", "--trainer.default_root_dir", str(root), "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.max_epochs", "1", "--model.lr", "3e-3", "--seed_everything", "0",
            "--model.model_kwargs", '{"inner_dim": 8, "attn_hidden": 8}', *extra]


def _leaky_split(split: Path, out: Path) -> tuple[Path, str]:
    """A copy of ``split`` where one val slide belongs to the patient of a train slide; returns (csv, patient)."""
    rows = list(csv.DictReader(split.open()))
    train = next(r for r in rows if r["split"] == "train")
    val = next(r for r in rows if r["split"] == "val")
    val["patient_id"] = train["patient_id"]
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out, train["patient_id"]


class _MakeDir:
    """A pickled object that runs ``os.mkdir(path)`` when unpickled: stands for any code in a malicious file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _malicious_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {}, "epoch": 0, "payload": _MakeDir(marker)}, path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(bags_dir, split_csv, run_dir) of a 1-epoch ABMIL run on tiny witness bags (checkpoints/best+last.ckpt)."""
    from wsi_ncmi.commands.train_cli import main_fit

    d = tmp_path_factory.mktemp("faults_train")
    bags = d / "bags"
    split = make_witness_bags(bags, n_slides=12, num_classes=2, dim=DIM, n_instances=(4, 8), seed=0)
    run = d / "run"
    assert main_fit(_cli_args(bags, split, run)) == 0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    return bags, split, run


@pytest.fixture()
def workdir(trained, tmp_path) -> tuple[Path, Path, Path]:
    """A private copy of the trained run's bags + split + run folder (tests may corrupt them)."""
    import shutil

    bags, split, run = trained
    shutil.copytree(bags, tmp_path / "bags")
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "bags", tmp_path / "bags" / split.name, tmp_path / "run"


# ------------------------------------------------------------------------------------ 1. patient leak
@pytest.mark.fault(kind="silent_wrong")
def test_fit_refuses_a_patient_leak_unless_allowed(workdir, tmp_path, capsys) -> None:
    import yaml

    from wsi_ncmi.commands.train_cli import main_fit

    bags, split, _ = workdir
    leaky, patient = _leaky_split(split, tmp_path / "leaky.csv")
    before = _snapshot(tmp_path)
    root = tmp_path / "new_run"
    assert main_fit(_cli_args(bags, leaky, root)) == 2
    line = _error_line(capsys.readouterr().err, "fit")
    assert str(leaky) in line and patient in line and "--allow_patient_leak" in line
    assert _snapshot(tmp_path) == before and not root.exists()
    # the explicit override trains, and the run's config records it
    assert main_fit(_cli_args(bags, leaky, root, "--allow_patient_leak", "true")) == 0
    assert yaml.safe_load((root / "config.yaml").read_text())["allow_patient_leak"] is True


@pytest.mark.fault(kind="silent_wrong")
def test_evaluate_refuses_a_patient_leak_unless_allowed(workdir, tmp_path, capsys) -> None:
    import json

    from wsi_ncmi.commands.evaluate_cli import main

    bags, split, run = workdir
    leaky, patient = _leaky_split(split, tmp_path / "leaky.csv")
    ckpt = run / "checkpoints" / "best.ckpt"
    out = tmp_path / "eval"
    before = _snapshot(tmp_path)
    args = ["--ckpt", str(ckpt), "--data.bags_dir", str(bags), "--data.split_csv", str(leaky), "--out", str(out),
            "--no-plots"]
    assert main(args) == 2
    line = _error_line(capsys.readouterr().err, "evaluate")
    assert str(leaky) in line and patient in line and "--allow-patient-leak" in line
    assert _snapshot(tmp_path) == before and not out.exists()
    assert main([*args, "--allow-patient-leak"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["allow_patient_leak"] is True and any(patient in p for p in report["patient_leaks"])


# ------------------------------------------------------------------------- 3. checkpoints never unpickle code
@pytest.mark.fault(kind="code_exec")
def test_resume_from_a_malicious_last_ckpt_runs_no_code(workdir, tmp_path, capsys, monkeypatch) -> None:
    from wsi_ncmi.commands.train_cli import main_fit

    bags, split, run = workdir
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's default would unpickle anything
    marker = tmp_path / "pwned"
    last = _malicious_checkpoint(run / "checkpoints" / "last.ckpt", marker)
    before = _snapshot(tmp_path)
    assert main_fit(_cli_args(bags, split, run, "--ckpt_path", "last")) == 2
    line = _error_line(capsys.readouterr().err, "fit")
    assert not marker.exists()
    assert str(last) in line and "weights_only" in line
    assert _snapshot(tmp_path) == before  # last.ckpt, best.ckpt and metrics.csv untouched
    # an explicit path, and `test`, take the same way
    from wsi_ncmi.commands.train_cli import main_test

    assert main_test(_cli_args(bags, split, tmp_path / "t", "--ckpt_path", str(last))) == 2
    assert str(last) in _error_line(capsys.readouterr().err, "test") and not marker.exists()
    # asking Lightning to unpickle is refused
    good = run / "checkpoints" / "best.ckpt"
    assert main_test(_cli_args(bags, split, tmp_path / "t", "--ckpt_path", str(good), "--weights_only",
                               "false")) == 2
    assert "weights_only" in _error_line(capsys.readouterr().err, "test")
    # a good last.ckpt resumes, and every torch.load on the way (ours and Lightning's) is weights_only=True
    import shutil

    shutil.copy(good, last)
    real_load, flags = torch.load, []

    def spy(*args, **kwargs):
        flags.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    assert main_fit(_cli_args(bags, split, run, "--ckpt_path", "last", "--trainer.max_epochs", "2")) == 0
    assert len(flags) >= 2 and all(f is True for f in flags), flags
    assert not marker.exists()


@pytest.mark.fault(kind="traceback")
def test_natural_track_resume_runs_no_code_either(tmp_path, capsys, monkeypatch) -> None:
    from wsi_ncmi.commands.natural_cli import main

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    evil = _malicious_checkpoint(tmp_path / "last.ckpt", marker)
    before = _snapshot(tmp_path)
    argv = ["fit", "--data.dataset", "digits", "--data.image_size", "16", "--data.num_workers", "0",
            "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--ckpt_path", str(evil)]
    assert main(argv) == 2
    line = _error_line(capsys.readouterr().err, "natural fit")
    assert str(evil) in line and not marker.exists() and _snapshot(tmp_path) == before


@pytest.mark.fault(kind="traceback")
def test_evaluate_and_heatmap_refuse_a_malicious_checkpoint_in_one_line(workdir, tmp_path, capsys,
                                                                       monkeypatch) -> None:
    from wsi_ncmi.commands import evaluate_cli, heatmap_cli

    bags, split, _ = workdir
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    evil = _malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    before = _snapshot(tmp_path)
    assert evaluate_cli.main(["--ckpt", str(evil), "--data.bags_dir", str(bags), "--data.split_csv", str(split),
                              "--out", str(tmp_path / "eval"), "--no-plots"]) == 2
    line = _error_line(capsys.readouterr().err, "evaluate")
    assert str(evil) in line and "weights_only" in line
    slide = tmp_path / "a.svs"
    slide.write_bytes(b"x")
    before = _snapshot(tmp_path)
    assert heatmap_cli.main(["--ckpt", str(evil), "--slide", str(slide), "--bag", str(bags / "slide_000.h5"),
                             "--out", str(tmp_path / "hm" / "a.png")]) == 2
    line = _error_line(capsys.readouterr().err, "heatmap")
    assert str(evil) in line and not marker.exists() and _snapshot(tmp_path) == before


@pytest.mark.fault(kind="traceback")
def test_predict_refuses_a_malicious_or_truncated_checkpoint_in_one_line(workdir, tmp_path, capsys,
                                                                          monkeypatch) -> None:
    from wsi_ncmi.commands.predict_cli import main

    bags, _, run = workdir
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    evil = _malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    half = tmp_path / "half.ckpt"
    data = (run / "checkpoints" / "best.ckpt").read_bytes()
    half.write_bytes(data[: len(data) // 2])
    before = _snapshot(tmp_path)
    for ckpt, says in ((evil, "weights_only"), (half, "truncated or corrupt")):
        assert main(["--ckpt", str(ckpt), "--bags", str(bags), "--out", str(tmp_path / "pred")]) == 2
        line = _error_line(capsys.readouterr().err, "predict")
        assert str(ckpt) in line and says in line
    assert not marker.exists() and _snapshot(tmp_path) == before


@pytest.mark.fault(kind="traceback")
def test_a_pickle_renamed_safetensors_is_named_in_one_line(workdir, tmp_path, capsys) -> None:
    import pickle

    from wsi_ncmi.commands.evaluate_cli import main

    bags, split, _ = workdir
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(pickle.dumps({"state_dict": {"w": [1.0, 2.0]}}))
    before = _snapshot(tmp_path)
    assert main(["--ckpt", str(fake), "--data.bags_dir", str(bags), "--data.split_csv", str(split),
                 "--out", str(tmp_path / "eval"), "--no-plots"]) == 2
    line = _error_line(capsys.readouterr().err, "evaluate")
    assert str(fake) in line and "wsi-ncmi fit" in line
    assert _snapshot(tmp_path) == before


@pytest.mark.fault(kind="traceback")
def test_a_truncated_last_ckpt_is_named_and_kept(workdir, tmp_path, capsys) -> None:
    from wsi_ncmi.commands.train_cli import main_fit

    bags, split, run = workdir
    last = run / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    before = _snapshot(tmp_path)
    assert main_fit(_cli_args(bags, split, run, "--ckpt_path", "last")) == 2
    line = _error_line(capsys.readouterr().err, "fit")
    assert str(last) in line and "truncated or corrupt" in line
    assert _snapshot(tmp_path) == before  # the half file stays for inspection; best.ckpt, metrics.csv kept


# ------------------------------------------------------------------------------- 4. bad bags in fit/evaluate
@pytest.mark.fault(kind="traceback")
def test_fit_names_a_bag_with_nan_features(workdir, tmp_path, capsys) -> None:
    from wsi_ncmi.commands.train_cli import main_fit

    bags, split, _ = workdir
    rows = list(csv.DictReader(split.open()))
    bad = bags / f"{next(r for r in rows if r['split'] == 'train')['slide_id']}.h5"
    feats = np.ones((5, DIM), np.float16)
    feats[3, 2] = np.inf
    write_bag(bad, feats, np.zeros((5, 2), np.int64), check_values=False)
    before = _snapshot(tmp_path, exclude=tmp_path / "new_run")
    # with DataLoader workers too: the error crosses the process boundary and still prints as one line
    assert main_fit(_cli_args(bags, split, tmp_path / "new_run", "--data.num_workers", "1")) == 2
    line = _error_line(capsys.readouterr().err, "fit")
    assert str(bad) in line and "NaN or inf" in line
    assert _snapshot(tmp_path, exclude=tmp_path / "new_run") == before


@pytest.mark.fault(kind="traceback")
def test_evaluate_names_bags_with_nan_features_or_another_dim(workdir, tmp_path, capsys) -> None:
    from wsi_ncmi.commands.evaluate_cli import main

    bags, split, run = workdir
    rows = list(csv.DictReader(split.open()))
    test_ids = [r["slide_id"] for r in rows if r["split"] == "test"]
    odd = bags / f"{test_ids[-1]}.h5"
    write_bag(odd, np.ones((5, DIM + 4), np.float32), np.zeros((5, 2), np.int64))
    args = ["--ckpt", str(run / "checkpoints" / "best.ckpt"), "--data.bags_dir", str(bags),
            "--data.split_csv", str(split), "--out", str(tmp_path / "eval"), "--no-plots"]
    before = _snapshot(tmp_path)
    assert main(args) == 2
    line = _error_line(capsys.readouterr().err, "evaluate")
    assert odd.name in line and f"D={DIM + 4}" in line
    assert _snapshot(tmp_path) == before
    feats = np.ones((5, DIM), np.float32)
    feats[0, 0] = np.nan
    write_bag(odd, feats, np.zeros((5, 2), np.int64), check_values=False)
    before = _snapshot(tmp_path)
    assert main(args) == 2
    line = _error_line(capsys.readouterr().err, "evaluate")
    assert str(odd) in line and "NaN or inf" in line
    assert _snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------- heatmaps
def _slide_rgb(h: int = 512, w: int = 768) -> np.ndarray:
    rgb = np.full((h, w, 3), 235, np.uint8)
    rgb[100:300, 200:500] = (150, 60, 140)
    return rgb


def _bag_for(slide: Path, bag: Path, slide_mpp: float | None = 0.5, slide_id: str | None = None) -> Path:
    """A bag as ``wsi-preprocess`` writes it for ``slide``: 128-px level-0 tiles over the slide, provenance attrs."""
    from preprocessing.readers import open_slide

    with open_slide(slide, mpp=slide_mpp) as r:
        w0, h0 = r.dimensions
    coords = np.array([[x, y] for y in range(0, h0 - 127, 128) for x in range(0, w0 - 127, 128)], np.int64)
    feats = np.random.default_rng(0).standard_normal((len(coords), DIM)).astype(np.float16)
    attrs = {"slide_id": slide_id or slide.stem, "source_path": str(slide), "source_size": slide.stat().st_size}
    if slide_mpp is not None:
        attrs.update(slide_mpp=slide_mpp, target_mpp=slide_mpp, effective_mpp=slide_mpp)
    return write_bag(bag, feats, coords, attrs,
                     coords_attrs={"patch_size": 128, "patch_level": 0, "patch_size_level0": 128})


def _heatmap(ckpt: Path, slide: Path, bag: Path, out: Path, *extra: str) -> int:
    from wsi_ncmi.commands.heatmap_cli import main

    return main(["--ckpt", str(ckpt), "--slide", str(slide), "--bag", str(bag), "--out", str(out), *extra])


@pytest.mark.fault(kind="silent_wrong")
def test_heatmap_refuses_another_slides_bag(trained, tmp_path, capsys) -> None:
    from preprocessing.synthetic import write_svs

    ckpt = trained[2] / "checkpoints" / "best.ckpt"
    a = write_svs(tmp_path / "a.svs", _slide_rgb(), mpp=0.5, downsamples=(1, 4))
    b = write_svs(tmp_path / "b.svs", _slide_rgb(640, 896), mpp=0.5, downsamples=(1, 4))
    bag_b = _bag_for(b, tmp_path / "b.h5")
    out = tmp_path / "hm" / "a.png"
    before = _snapshot(tmp_path)
    assert _heatmap(ckpt, a, bag_b, out) == 2
    line = _error_line(capsys.readouterr().err, "heatmap")
    assert str(bag_b) in line and str(a) in line and "'b'" in line and "--allow-slide-mismatch" in line
    assert "tiles lie outside" in line and "bytes" in line
    assert _snapshot(tmp_path) == before and not out.parent.exists()
    # a CLAM-style bag (no provenance attributes) named like the slide is still checked by its tile geometry
    bag_nameless = write_bag(tmp_path / "a.h5", np.ones((2, DIM), np.float32), np.array([[0, 0], [800, 600]]),
                             coords_attrs={"patch_size_level0": 128})
    assert _heatmap(ckpt, a, bag_nameless, out) == 2
    assert "1 of 2 tiles lie outside" in _error_line(capsys.readouterr().err, "heatmap")
    # the override draws it anyway; the slide's own bag needs none
    assert _heatmap(ckpt, a, bag_b, out, "--allow-slide-mismatch") == 0 and out.is_file()
    assert _heatmap(ckpt, b, bag_b, tmp_path / "hm" / "b.png") == 0


@pytest.mark.fault(kind="unclear")
def test_heatmap_mpp_of_a_slide_whose_mpp_came_from_the_mpp_csv(trained, tmp_path, capsys) -> None:
    from preprocessing.synthetic import write_svs

    ckpt = trained[2] / "checkpoints" / "best.ckpt"
    slide = write_svs(tmp_path / "nompp.tif", _slide_rgb(), mpp=None, downsamples=(1, 4))  # no mpp in the file
    bag = _bag_for(slide, tmp_path / "nompp.h5", slide_mpp=0.5)  # extracted with --mpp-csv nompp,0.5
    assert _heatmap(ckpt, slide, bag, tmp_path / "out.png", "--mpp", "4") == 0
    assert "thumbnail 96x64 px, downsample 8, 4 um/px)" in capsys.readouterr().out
    # a bag without a recorded mpp: the slide has none either -> one line naming the slide
    plain = _bag_for(slide, tmp_path / "plain" / "nompp.h5", slide_mpp=None)
    before = _snapshot(tmp_path)
    assert _heatmap(ckpt, slide, plain, tmp_path / "out2.png", "--mpp", "4") == 2
    line = _error_line(capsys.readouterr().err, "heatmap")
    assert str(slide) in line and "no pixel size" in line and "--level" in line
    assert _snapshot(tmp_path) == before


@pytest.mark.fault(kind="unclear")
def test_heatmap_of_a_plain_stripped_tiff(trained, tmp_path, capsys) -> None:
    import tifffile

    ckpt = trained[2] / "checkpoints" / "best.ckpt"
    slide = tmp_path / "strip.tif"
    tifffile.imwrite(slide, _slide_rgb(), photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5),
                     resolutionunit="CENTIMETER")  # not tiled: OpenSlide refuses it, preprocessing reads it whole
    bag = _bag_for(slide, tmp_path / "strip.h5", slide_mpp=0.5)
    out = tmp_path / "strip.png"
    assert _heatmap(ckpt, slide, bag, out, "--mpp", "2", "--csv") == 0
    text = capsys.readouterr().out
    assert "thumbnail 192x128 px, downsample 4, 2 um/px)" in text and out.is_file()
    assert out.with_suffix(".tiles.csv").is_file()


@pytest.mark.fault(kind="silent_wrong")
def test_heatmap_of_a_72_dpi_tiff_uses_the_bags_mpp_not_the_files(trained, tmp_path, capsys) -> None:
    from preprocessing.synthetic import write_svs

    ckpt = trained[2] / "checkpoints" / "best.ckpt"
    # with the file's 352.8 um/px (72 dpi), --mpp 8 drew a 16928x11285 px upsampled picture, silently
    slide = write_svs(tmp_path / "dpi.tif", _slide_rgb(256, 384), mpp=352.8, vendor="generic", downsamples=(1,))
    bag = _bag_for(slide, tmp_path / "dpi.h5", slide_mpp=0.5)  # preprocessing rejected 352.8; mpp came from the CSV
    assert _heatmap(ckpt, slide, bag, tmp_path / "dpi.png", "--mpp", "8") == 0
    assert "thumbnail 24x16 px, downsample 16, 8 um/px)" in capsys.readouterr().out
    # without a recorded mpp the implausible file value is rejected, as preprocessing does, and named
    plain = _bag_for(slide, tmp_path / "plain" / "dpi.h5", slide_mpp=None)
    before = _snapshot(tmp_path)
    assert _heatmap(ckpt, slide, plain, tmp_path / "dpi2.png", "--mpp", "4") == 2
    line = _error_line(capsys.readouterr().err, "heatmap")
    assert str(slide) in line and "rejected 352.8" in line
    assert _snapshot(tmp_path) == before
