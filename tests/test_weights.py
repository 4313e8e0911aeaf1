"""wsi_ncmi.data.weights: the weight-file reader shared by preprocessing and the image backbones."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wsi_ncmi.data.weights import (
    check_device,
    read_weight_file,
    resolve_device,
    strip_prefixes,
    tensors_only,
    unwrap_state_dict,
)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.mkdir, (str(self.marker),))


def test_reads_safetensors_and_torch_files(tmp_path: Path) -> None:
    sd = {"a.weight": torch.ones(2, 3)}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "w.ckpt")
    assert torch.equal(read_weight_file(tmp_path / "w.safetensors")["a.weight"], sd["a.weight"])
    raw = read_weight_file(tmp_path / "w.ckpt")
    assert raw["epoch"] == 3 and torch.equal(unwrap_state_dict(raw)["a.weight"], sd["a.weight"])
    with pytest.raises(FileNotFoundError):
        read_weight_file(tmp_path / "missing.pth")


def test_never_unpickles_code(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's own default would run it
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(1), "x": _Evil(marker)}, evil, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(Exception, match="(?i)weights_only"):
        read_weight_file(evil)
    assert not marker.exists()


def test_prefix_rules() -> None:
    t = torch.zeros(1)
    wrapped = {"module._orig_mod.a": t, "module._orig_mod.b": t}
    assert set(strip_prefixes(wrapped, ("module.", "_orig_mod."), every_key=True)) == {"a", "b"}
    mixed = {"module.a": t, "b": t}
    assert set(strip_prefixes(mixed, ("module.",), every_key=True)) == {"module.a", "b"}  # not a wrapper
    assert set(strip_prefixes(mixed, ("module.",), every_key=False)) == {"a", "b"}  # key by key
    assert set(tensors_only({"a": t, "step": 3})) == {"a"}
    assert unwrap_state_dict({"model": {"module": {"a": t}}}, ("state_dict", "model", "module")) == {"a": t}


def test_resolve_device() -> None:
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cuda:1") == "cuda:1"


def test_check_device_names_the_missing_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device("auto") == "cpu" and check_device("cpu") == "cpu"
    with pytest.raises(ValueError, match=r"^--device cuda:1: CUDA is not available on this machine$"):
        check_device("cuda:1")
