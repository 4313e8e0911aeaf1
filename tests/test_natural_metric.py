"""`wsi-ncmi ncmi-metric` (paper Figure 2) over mixed checkpoints: per-file architectures, the project's own
Lightning checkpoints (CE head and NCMI), DDP / wrapper prefixes, ImageFolder and CIFAR-100 python folders."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from _images import write_imagefolder
from safetensors.torch import save_file

from wsi_ncmi.commands.ncmi_metric_cli import main_ncmi_metric
from wsi_ncmi.natural.backbones import create_classifier
from wsi_ncmi.natural.evaluate import classifier_ncmi
from wsi_ncmi.natural.metric import (
    NCMIMetricError,
    infer_resnet,
    parse_weight_spec,
    pearson_r,
    read_weights,
    strip_wrapper_prefixes,
)

W = 0.125  # tiny ResNets: stem width 8


_imagefolder = write_imagefolder


def _cifar(root: Path, n_test: int = 8) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n in (("train", 4), ("test", n_test)):
        blob = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": [(3 * i) % 100 for i in range(n)]}
        with open(folder / name, "wb") as fh:
            pickle.dump(blob, fh, protocol=2)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, fh, protocol=2)
    return folder


def _save_classifier(path: Path, arch: str, num_classes: int, seed: int, prefix: str = "", wrap: str | None = None,
                     cifar_stem: bool = False) -> Path:  # fmt: skip
    torch.manual_seed(seed)
    sd = {prefix + k: v.contiguous() for k, v in create_classifier(arch, num_classes, cifar_stem, width=W).state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({wrap: sd, "epoch": 3} if wrap else sd, str(path))
    return path


def _run(tmp_path: Path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "out"
    rc = main_ncmi_metric([*args, "--batch-size", "4", "--workers", "0", "--device", "cpu", "--out", str(out)])
    report = json.loads((out / "ncmi_vs_top1.json").read_text()) if rc == 0 else {}
    return rc, report


def test_parse_weight_spec_and_prefix_stripping(tmp_path: Path) -> None:
    assert parse_weight_spec("resnet50=/w/a.pth") == parse_weight_spec("resnet50=/w/a.pth", "a")
    spec = parse_weight_spec("resnet50=/w/a.pth")
    assert spec.arch == "resnet50" and spec.path == Path("/w/a.pth") and spec.name == "a"
    assert parse_weight_spec("/w/b.safetensors", "bee").arch is None
    assert parse_weight_spec("/w/x=y.pth").arch is None  # '=' inside a path is not a spec
    with pytest.raises(NCMIMetricError, match="'vgg16' is not an architecture"):
        parse_weight_spec("vgg16=/w/a.pth")
    t = torch.zeros(1)
    assert strip_wrapper_prefixes({"module.model.fc.weight": t, "module.model.conv1.weight": t}) == {
        "fc.weight": t, "conv1.weight": t,
    }  # fmt: skip
    mixed = {"model.fc.weight": t, "criterion.xi": t}
    assert strip_wrapper_prefixes(mixed) == mixed  # only when every key has the prefix


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_infer_resnet_from_state_dict(arch: str) -> None:
    sd = create_classifier(arch, 5, cifar_stem=arch == "resnet34", width=W).state_dict()
    assert infer_resnet(sd) == (arch, arch == "resnet34", W)
    assert infer_resnet({"fc.weight": torch.zeros(2, 2)}) is None


def test_per_file_architectures_prefixes_and_wrappers(tmp_path: Path, capsys) -> None:
    data = _imagefolder(tmp_path / "val")
    w18 = _save_classifier(tmp_path / "r18.safetensors", "resnet18", 3, 0)
    w34 = _save_classifier(tmp_path / "r34_ddp.pth", "resnet34", 3, 1, prefix="module.")  # DDP state dict
    w50 = _save_classifier(tmp_path / "r50.pth", "resnet50", 3, 2, prefix="model.", wrap="model")  # wrapped
    rc, rep = _run(tmp_path, "--weights", f"resnet18={w18}", f"resnet34={w34}", str(w50), "--model", "resnet50",
                   "--data", str(data), "--image-size", "32")  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert [r["arch"] for r in rep["rows"]] == ["resnet18", "resnet34", "resnet50"]
    assert [r["name"] for r in rep["rows"]] == ["r18", "r34_ddp", "r50"]
    assert all(r["n"] == 9 and r["classifier"] == "head" and r["probs"] == "softmax" for r in rep["rows"])
    assert rep["dataset"] == "imagefolder"
    assert rep["pearson_r"] == pytest.approx(
        pearson_r([r["ncmi"] for r in rep["rows"]], [r["top1"] for r in rep["rows"]]), nan_ok=True
    )
    # the r50 row is the measurement of exactly those weights
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from wsi_ncmi.natural.data import build_transform

    torch.manual_seed(2)
    model = create_classifier("resnet50", 3, width=W)
    loader = DataLoader(ImageFolder(str(data), transform=build_transform("imagenet", False, 32, 32)), batch_size=4)
    ref = classifier_ncmi(model, loader, 3)
    assert rep["rows"][2]["ncmi"] == pytest.approx(ref["ncmi"], rel=1e-6)
    assert rep["rows"][2]["top1"] == pytest.approx(ref["top1"])
    # without ARCH= and --model the architecture is inferred from the layout
    rc, rep = _run(tmp_path, "--weights", str(w34), "--data", str(data), "--image-size", "32")
    assert rc == 0 and rep["rows"][0]["arch"] == "resnet34"


def test_wrong_per_file_architecture_is_a_clear_error(tmp_path: Path, capsys) -> None:
    data = _imagefolder(tmp_path / "val", per_class=1)
    w18 = _save_classifier(tmp_path / "r18.safetensors", "resnet18", 3, 0)
    rc, _ = _run(tmp_path, "--weights", f"resnet50={w18}", "--data", str(data), "--image-size", "32")
    assert rc == 2 and "do not match a resnet50" in capsys.readouterr().err


def _lightning_ckpt(tmp_path: Path, objective: str, num_classes: int = 3) -> Path:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from wsi_ncmi.natural.module import ImageModule

    L.seed_everything(0)
    module = ImageModule(backbone="resnet18", num_classes=num_classes, objective="head" if objective == "ce" else objective,
                         loss=objective, width=W, cifar_stem=True, channels_last=False, ncmi_kwargs={"tau": 1.0})  # fmt: skip
    x = torch.randn(12, 3, 16, 16)
    y = torch.arange(12) % num_classes
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=12))
    path = tmp_path / f"{objective}.ckpt"
    trainer.save_checkpoint(str(path))
    return path


def test_lightning_checkpoints_of_natural_fit_ce_and_ncmi(tmp_path: Path, capsys) -> None:
    ce, ncmi = _lightning_ckpt(tmp_path, "ce"), _lightning_ckpt(tmp_path, "ncmi")
    sd, hp = read_weights(ncmi)
    assert hp is not None and hp["objective"] == "ncmi" and any(k.startswith("ncmi_training.loss.") for k in sd)
    assert not any(k.startswith("head.") for k in sd)
    data = _imagefolder(tmp_path / "val")
    rc, rep = _run(tmp_path, "--weights", str(ce), str(ncmi), "--data", str(data), "--image-size", "16")
    assert rc == 0, capsys.readouterr().err
    ce_row, ncmi_row = rep["rows"]
    assert (ce_row["classifier"], ce_row["probs"]) == ("head", "softmax")
    assert [r["name"] for r in rep["rows"]] == ["ce", "ncmi"]
    assert (ncmi_row["classifier"], ncmi_row["probs"]) == ("xi_centroids", "nsf")
    assert ncmi_row["arch"] == "resnet18" and ncmi_row["n"] == 9 and np.isfinite(ncmi_row["ncmi"])
    assert "different simplices" in (tmp_path / "out" / "ncmi_vs_top1.md").read_text()
    # the NCMI row is the ImageModule's own ξ-centroid prediction and its NSF probabilities
    from wsi_ncmi.natural.module import ImageModule

    module = ImageModule.load_from_checkpoint(str(ncmi), map_location="cpu", weights_only=True).eval()
    from torchvision.datasets import ImageFolder

    from wsi_ncmi.natural.data import build_transform

    ds = ImageFolder(str(data), transform=build_transform("imagenet", False, 16, 16))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        pred = module(x).argmax(dim=1)
    assert ncmi_row["top1"] == pytest.approx(float((pred == y).float().mean()), abs=1e-6)


def test_plain_ncmi_state_dict_without_hyperparameters_is_rejected(tmp_path: Path, capsys) -> None:
    ncmi = _lightning_ckpt(tmp_path, "ncmi")
    sd, _ = read_weights(ncmi)
    plain = tmp_path / "ncmi_plain.pth"
    torch.save({"module." + k: v for k, v in sd.items()}, str(plain))
    data = _imagefolder(tmp_path / "val", per_class=1)
    rc, _ = _run(tmp_path, "--weights", str(plain), "--data", str(data), "--image-size", "16")
    assert rc == 2 and "without classifier head" in capsys.readouterr().err


def test_plain_ce_module_state_dict_maps_head_to_fc(tmp_path: Path, capsys) -> None:
    ce = _lightning_ckpt(tmp_path, "ce")
    sd, _ = read_weights(ce)
    plain = tmp_path / "ce_plain.pth"
    torch.save({"state_dict": {"model." + k: v for k, v in sd.items()}}, str(plain))  # no hyper_parameters
    data = _imagefolder(tmp_path / "val", per_class=2)
    same = tmp_path / "other" / "ce.ckpt"  # same stem as `ce`: the second row gets a distinct name
    same.parent.mkdir()
    same.write_bytes(ce.read_bytes())
    rc, rep = _run(tmp_path, "--weights", f"resnet18={plain}", str(ce), str(same), "--data", str(data),
                   "--image-size", "16")  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert [r["name"] for r in rep["rows"]] == ["ce_plain", "ce", "ce-2"]
    a, b, _ = rep["rows"]
    assert a["top1"] == b["top1"] and a["ncmi"] == pytest.approx(b["ncmi"], rel=1e-6)


def test_cifar100_python_folder_is_accepted(tmp_path: Path, capsys) -> None:
    folder = _cifar(tmp_path / "cifar")
    w = _save_classifier(tmp_path / "c.safetensors", "resnet18", 100, 0, cifar_stem=True)
    rc, rep = _run(tmp_path, "--weights", str(w), "--data", str(folder.parent))
    assert rc == 0, capsys.readouterr().err
    assert rep["dataset"] == "cifar100" and rep["rows"][0]["n"] == 8
    rc, rep = _run(tmp_path, "--weights", str(w), "--data", str(folder), "--split", "train", "--limit", "3")
    assert rc == 0 and rep["rows"][0]["n"] == 3
    rc, _ = _run(tmp_path, "--weights", str(w), "--data", str(tmp_path), "--dataset", "cifar100")
    assert rc == 2 and "CIFAR-100 not found" in capsys.readouterr().err
