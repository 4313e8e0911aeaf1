"""Output folders (`wsi_ncmi.data.outputs`), folder locks (`wsi_ncmi.data.locks`) and staged folders
(`wsi_ncmi.data.atomic.staged_folder`): the helpers behind the commands' one-line write errors."""

from __future__ import annotations

import errno
import json
import os
import time

import pytest

from wsi_ncmi.data.atomic import staged_folder
from wsi_ncmi.data.locks import HOST, LockHeldError, acquire_folder_lock, lock_holder, release_folder_lock
from wsi_ncmi.data.outputs import OutputError, check_output_dir, check_output_file, output_error


def test_staged_folder_replaces_the_folder_only_when_complete(tmp_path) -> None:
    out = tmp_path / "eval"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_folder(out) as stage:
        (stage / "new.txt").write_text("new")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"] and (out / "old.txt").read_text() == "old"
    with staged_folder(out) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".eval.") and not (out / "new.txt").exists()
        (stage / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"] and sorted(os.listdir(out)) == ["new.txt"]
    with staged_folder(tmp_path / "fresh") as stage:  # no earlier folder
        (stage / "a").write_text("a")
    assert (tmp_path / "fresh" / "a").read_text() == "a"


def test_check_output_dir_and_file(tmp_path, monkeypatch) -> None:
    afile = tmp_path / "f"
    afile.write_text("x")
    assert check_output_dir(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # creates nothing
    with pytest.raises(OutputError, match="is an existing file, not a folder"):
        check_output_dir(afile, "--out")
    with pytest.raises(OutputError, match=f"{afile} is a file, so no folder"):
        check_output_dir(afile / "sub", "--out")
    with pytest.raises(OutputError, match="is a folder; give the file"):
        check_output_file(tmp_path, "--out")
    from wsi_ncmi.data import outputs

    monkeypatch.setattr(outputs, "_read_only", lambda p: True)
    with pytest.raises(OutputError, match="read-only file system"):
        check_output_file(tmp_path / "a.png", "--out")


def test_output_error_names_the_file_or_the_folder(tmp_path) -> None:
    full = output_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert str(full) == f"{tmp_path}: cannot write: No space left on device; free some space and run again"
    denied = output_error(OSError(errno.EACCES, "Permission denied", "/x/y"), tmp_path)
    assert str(denied) == "/x/y: cannot write: Permission denied"
    assert output_error(OSError(errno.EIO, "I/O error"), tmp_path) is None


def test_folder_lock_refuses_a_live_holder_and_takes_over_dead_or_ownerless_ones(tmp_path) -> None:
    lock = acquire_folder_lock(tmp_path / "run", "fit.lock", "wsi-ncmi fit")
    assert lock_holder(lock)["pid"] == os.getpid()
    with pytest.raises(LockHeldError, match=rf"{tmp_path / 'run'}: another wsi-ncmi fit .*pid {os.getpid()} on "):
        acquire_folder_lock(tmp_path / "run", "fit.lock", "wsi-ncmi fit")
    assert release_folder_lock(lock) and not lock.exists() and not release_folder_lock(lock)
    # a dead process of this host: taken over
    lock.write_text(json.dumps({"pid": 2**22 + 12345, "host": HOST, "time": time.time(), "purpose": "x"}))
    assert acquire_folder_lock(tmp_path / "run", "fit.lock", "wsi-ncmi fit") == lock
    release_folder_lock(lock)
    # an empty lock (a crash between create and write): taken over once older than the grace period
    lock.write_text("")
    with pytest.raises(LockHeldError):
        acquire_folder_lock(tmp_path / "run", "fit.lock", "wsi-ncmi fit")
    old = time.time() - 60
    os.utime(lock, (old, old))
    assert acquire_folder_lock(tmp_path / "run", "fit.lock", "wsi-ncmi fit") == lock
    release_folder_lock(lock)
    # another host's lock cannot be probed: never taken over, and the message says how to remove it
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "time": 0, "purpose": "wsi-ncmi fit"}))
    with pytest.raises(LockHeldError, match=f"remove {lock} if that run is gone"):
        acquire_folder_lock(tmp_path / "run", "fit.lock", "wsi-ncmi fit")
    assert sorted(os.listdir(tmp_path / "run")) == ["fit.lock"]
