"""Reliability suite (issue #22, part 2): what `wsi-ncmi fit | evaluate | predict | heatmap` write.

Two fits into one run folder, an evaluation interrupted over an earlier report, a full disk, a read-only folder,
an output path of the wrong kind: each ends in one line naming the path (exit 2) and loses nothing already written.
Each test carries ``@pytest.mark.fault(kind=...)``, how the case ended before its fix.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_faults_training import DIM, _cli_args, _error_line, _snapshot


@pytest.fixture(scope="module")
def run_ready(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(bags_dir, split_csv, run folder) of a 1-epoch ABMIL run on tiny witness bags."""
    from _synthetic import make_witness_bags

    from wsi_ncmi.commands.train_cli import main_fit

    d = tmp_path_factory.mktemp("faults_outputs")
    split = make_witness_bags(d / "bags", n_slides=12, num_classes=2, dim=DIM, n_instances=(4, 8), seed=0)
    assert main_fit(_cli_args(d / "bags", split, d / "run")) == 0
    return d / "bags", split, d / "run"


@pytest.fixture()
def run_copy(run_ready, tmp_path) -> tuple[Path, Path, Path]:
    bags, split, run = run_ready
    shutil.copytree(run, tmp_path / "run")
    return bags, split, tmp_path / "run"


def _evaluate_args(ckpt: Path, bags: Path, split: Path, out: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(ckpt), "--data.bags_dir", str(bags), "--data.split_csv", str(split), "--out", str(out),
            "--no-plots", "--Cs", "1", *extra]


def _leftovers(folder: Path) -> list[str]:
    """Temporary files / staged folders that a finished or failed command must not leave behind."""
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial", ".old"))
                  or ".stale." in p.name)


# ------------------------------------------------------------------------------------------ run-folder lock
@pytest.mark.fault(kind="silent_wrong")
def test_a_second_fit_into_a_busy_run_folder_is_refused(run_copy, tmp_path, capsys) -> None:
    from wsi_ncmi.commands.train_cli import main_fit
    from wsi_ncmi.data.locks import HOST, LockHeldError, acquire_folder_lock, release_folder_lock
    from wsi_ncmi.training.cli import RUN_LOCK

    bags, split, run = run_copy
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # the first `fit`
    try:
        lock = run / RUN_LOCK
        lock.write_text(json.dumps({"pid": holder.pid, "host": HOST, "time": time.time(),
                                    "purpose": "wsi-ncmi fit"}))
        before = _snapshot(tmp_path)
        # used to train next to the other run, mixing config.yaml, metrics.csv and checkpoints, and exit 0
        assert main_fit(_cli_args(bags, split, run)) == 2
        line = _error_line(capsys.readouterr().err, "fit")
        assert str(run) in line and f"pid {holder.pid} on {HOST}" in line and "wsi-ncmi fit" in line
        assert _snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock is taken over, the run trains, and the lock is gone after
    assert main_fit(_cli_args(bags, split, run)) == 0
    assert not lock.exists() and not _leftovers(run)
    # in one process too: a held lock refuses, released it is free again
    held = acquire_folder_lock(run, RUN_LOCK, "wsi-ncmi fit")
    with pytest.raises(LockHeldError, match=f"pid {os.getpid()}"):
        acquire_folder_lock(run, RUN_LOCK, "wsi-ncmi fit")
    assert release_folder_lock(held) and not held.exists()


# ------------------------------------------------------------------------------- evaluate over a report
@pytest.mark.fault(kind="silent_wrong")
def test_an_interrupted_evaluate_keeps_the_earlier_report_intact(run_copy, tmp_path, capsys, monkeypatch) -> None:
    from wsi_ncmi.commands.evaluate_cli import main
    from wsi_ncmi.evaluation import run as run_mod

    bags, split, run = run_copy
    out = tmp_path / "eval"
    args = _evaluate_args(run / "checkpoints" / "best.ckpt", bags, split, out)
    assert main(args) == 0
    capsys.readouterr()
    earlier = _snapshot(out)
    assert "report.json" in earlier and "embeddings.npz" in earlier

    def interrupted(*a, **k):  # Ctrl-C once the new embeddings were written: they used to sit next to the old report
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "write_report", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert _snapshot(out) == earlier and not _leftovers(tmp_path)
    # a complete new evaluation replaces the folder as a whole: no file of the earlier one is left beside it
    monkeypatch.undo()
    assert main([*args, "--seeds", "0", "1"]) == 0
    assert not (out / "report.json").exists() and (out / "seed1" / "report.json").is_file()
    assert not _leftovers(tmp_path)


@pytest.mark.fault(kind="traceback")
def test_a_full_disk_during_evaluate_is_one_line_and_keeps_the_earlier_report(run_copy, tmp_path, capsys,
                                                                              monkeypatch) -> None:
    from wsi_ncmi.commands.evaluate_cli import main
    from wsi_ncmi.evaluation import run as run_mod

    bags, split, run = run_copy
    out = tmp_path / "eval"
    out.mkdir()
    (out / "report.json").write_text('{"earlier": true}\n')
    earlier = _snapshot(out)
    real_savez = run_mod.np.savez_compressed

    def disk_full(fh, **arrays):  # half of embeddings.npz reaches the disk, then it is full
        real_savez(fh, **arrays)
        fh.truncate(fh.tell() // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(run_mod.np, "savez_compressed", disk_full)
    assert main(_evaluate_args(run / "checkpoints" / "best.ckpt", bags, split, out)) == 2  # was a raw OSError
    line = _error_line(capsys.readouterr().err, "evaluate")
    assert f"--out {out}" in line and "No space left on device" in line and "free some space" in line
    assert "the earlier report in --out is unchanged" in line
    assert _snapshot(out) == earlier and not _leftovers(tmp_path)


@pytest.mark.fault(kind="silent_wrong")
def test_a_killed_evaluate_leaves_the_earlier_report_intact(run_copy, tmp_path) -> None:
    bags, split, run = run_copy
    out = tmp_path / "eval"
    (out / "seed0").mkdir(parents=True)
    (out / "report.json").write_text('{"earlier": true}\n')
    (out / "embeddings.npz").write_bytes(b"earlier")
    earlier = _snapshot(out)
    # SIGKILL inside the write of the new report (after its embeddings.npz): nothing runs after a kill -9
    code = ("import os, signal, sys\n"
            "from wsi_ncmi.evaluation import run\n"
            "run.write_report = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
            "from wsi_ncmi.commands.evaluate_cli import main\n"
            f"sys.exit(main({_evaluate_args(run / 'checkpoints' / 'best.ckpt', bags, split, out)!r}))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get(
        "PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert _snapshot(out) == earlier
    staged = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert len(staged) == 1 and (staged[0] / "embeddings.npz").is_file()  # the new half, beside; safe to delete


# ------------------------------------------------------------------------------------------ full disk
@pytest.mark.fault(kind="data_loss")
def test_a_full_disk_during_fit_keeps_the_previous_checkpoints(run_copy, tmp_path, capsys, monkeypatch) -> None:
    from wsi_ncmi.commands.train_cli import main_fit
    from wsi_ncmi.training import callbacks

    bags, split, run = run_copy
    ckpts = run / "checkpoints"
    earlier = _snapshot(ckpts)
    real_open = open

    class _HalfWritten(io.FileIO):  # writes half of what it is given, then the disk is full
        def write(self, data) -> int:
            super().write(bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_disk_open(path, mode="r", *a, **k):
        return _HalfWritten(path, mode.replace("b", "")) if "w" in mode else real_open(path, mode, *a, **k)

    monkeypatch.setattr(callbacks, "open", full_disk_open, raising=False)
    # used to leave a truncated best.ckpt / last.ckpt in place of the good one, with a raw OSError traceback
    assert main_fit(_cli_args(bags, split, run, "--trainer.max_epochs", "2")) == 2
    line = _error_line(capsys.readouterr().err, "fit")
    assert str(ckpts) in line and "cannot write the checkpoint: No space left on device" in line
    assert "is kept" in line
    assert _snapshot(ckpts) == earlier and not _leftovers(run)
    assert not (run / "fit.lock").exists()


# ------------------------------------------------------------------------------- read-only / wrong kind
def _heatmap(ckpt: Path, bag: Path, out: Path, tmp_path: Path) -> int:
    from wsi_ncmi.commands.heatmap_cli import main

    slide = tmp_path / "a.svs"
    slide.write_bytes(b"x")  # refused before it is opened
    return main(["--ckpt", str(ckpt), "--slide", str(slide), "--bag", str(bag), "--out", str(out)])


@pytest.mark.fault(kind="traceback")
def test_read_only_output_folders_are_named_in_one_line(run_copy, tmp_path, capsys, monkeypatch) -> None:
    from wsi_ncmi.commands import evaluate_cli, predict_cli, train_cli
    from wsi_ncmi.data import outputs

    bags, split, run = run_copy
    ckpt = run / "checkpoints" / "best.ckpt"
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(outputs, "_read_only", lambda p: Path(p).absolute() == ro)  # e.g. a CD or a ro mount
    before = _snapshot(tmp_path)
    calls = {
        "fit": lambda: train_cli.main_fit(_cli_args(bags, split, ro / "run")),
        "evaluate": lambda: evaluate_cli.main(_evaluate_args(ckpt, bags, split, ro / "eval")),
        "predict": lambda: predict_cli.main(["--ckpt", str(ckpt), "--bags", str(bags), "--out", str(ro / "pred")]),
        "heatmap": lambda: _heatmap(ckpt, bags / "slide_000.h5", ro / "hm" / "a.png", tmp_path),
    }
    for command, call in calls.items():
        assert call() == 2, command  # each used to end in a raw OSError traceback
        line = _error_line(capsys.readouterr().err, command)
        assert str(ro) in line and "read-only file system" in line, line
    assert _snapshot(tmp_path) == {**before, "a.svs": _snapshot(tmp_path)["a.svs"]}
    # a write that fails anyway (permissions changed meanwhile) is one line naming the path too
    err = outputs.output_error(OSError(errno.EROFS, os.strerror(errno.EROFS), str(ro / "x")), ro)
    assert err is not None and str(ro / "x") in str(err) and "writable disk" in str(err)
    assert outputs.output_error(OSError(errno.EIO, "I/O error"), ro) is None  # not a user error: re-raised


@pytest.mark.fault(kind="traceback")
def test_output_and_checkpoint_paths_of_the_wrong_kind(run_copy, tmp_path, capsys) -> None:
    from wsi_ncmi.commands import evaluate_cli, predict_cli, train_cli

    bags, split, run = run_copy
    ckpt = run / "checkpoints" / "best.ckpt"
    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    before = _snapshot(tmp_path)
    cases = [  # (command, call, what the line says)
        ("fit", lambda: train_cli.main_fit(_cli_args(bags, split, afile)), "is an existing file, not a folder"),
        ("evaluate", lambda: evaluate_cli.main(_evaluate_args(ckpt, bags, split, afile)), "is an existing file"),
        ("predict", lambda: predict_cli.main(["--ckpt", str(ckpt), "--bags", str(bags), "--out", str(afile)]),
         "is an existing file"),
        ("evaluate", lambda: evaluate_cli.main(_evaluate_args(ckpt, bags, split, afile / "eval")), "is a file"),
        ("heatmap", lambda: _heatmap(ckpt, bags / "slide_000.h5", tmp_path, tmp_path), "is a folder; give the file"),
        ("evaluate", lambda: evaluate_cli.main(_evaluate_args(ckpt.parent, bags, split, tmp_path / "e")),
         "is a folder; give the checkpoint file"),
        ("predict", lambda: predict_cli.main(["--ckpt", str(ckpt.parent), "--bags", str(bags), "--out",
                                              str(tmp_path / "p")]), "is a folder; give the checkpoint file"),
        ("heatmap", lambda: _heatmap(ckpt.parent, bags / "slide_000.h5", tmp_path / "h.png", tmp_path),
         "is a folder; give the file"),
        # --out of evaluate is replaced as a whole: a folder holding anything but an evaluation is refused
        ("evaluate", lambda: evaluate_cli.main(_evaluate_args(ckpt, bags, split, run)), "holds no earlier evaluation"),
    ]
    for command, call, says in cases:
        assert call() == 2, (command, says)
        line = _error_line(capsys.readouterr().err, command)
        assert says in line, line
    after = _snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k != "a.svs"} == before and afile.read_text() == "keep me\n"
