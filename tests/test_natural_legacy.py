"""Checkpoints of ``natural fit`` saved before the ImageModule alignment (old hparam names) still load."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest
import torch

from wsi_ncmi.natural.legacy import migrate_hparams
from wsi_ncmi.natural.metric import WeightSpec, load_metric_model
from wsi_ncmi.natural.module import ImageModule
from wsi_ncmi.natural.run import evaluate_checkpoint

TINY = dict(backbone="resnet18", num_classes=4, width=0.125, cifar_stem=True, channels_last=False)
OLD_NCMI = dict(TINY, objective="ncmi", loss_kwargs=None, weights=None, tau=0.7, center_momentum=0.99, variant="paper",
                centroid_update="sgd", centroids_per_class=1, use_nsf=True, use_centering=False, lr=0.1,
                schedule="multistep", milestones=[2], lr_gamma=0.2, warmup_epochs=0.0)  # fmt: skip


def test_migrate_hparams_maps_the_old_names() -> None:
    new = migrate_hparams(OLD_NCMI)
    assert new["objective"] == "ncmi" and new["scheduler"] == "multistep" and "schedule" not in new
    assert new["ncmi_kwargs"] == {"tau": 0.7, "center_momentum": 0.99, "variant": "paper", "centroid_update": "sgd",
                                  "centroids_per_class": 1, "use_nsf": True, "use_centering": False}  # fmt: skip
    assert "tau" not in new and "loss_kwargs" not in new
    old_ce = dict(TINY, objective="focal", loss_kwargs={"gamma": 2.0}, tau=0.5, schedule="none", warmup_epochs=1.0)
    ce = migrate_hparams(old_ce)
    assert (ce["objective"], ce["loss"], ce["loss_kwargs"]) == ("head", "focal", {"gamma": 2.0})
    assert ce["scheduler"] == "constant" and "tau" not in ce  # old "none" kept the warm-up: today's "constant"
    assert migrate_hparams(dict(TINY, objective="supcon", schedule="cosine"))["objective"] == "contrastive"
    today = dict(TINY, objective="head", loss="ce", scheduler="cosine", ncmi_kwargs=None)
    assert migrate_hparams(today) == today


def _old_checkpoint(path: Path, old: dict, module: ImageModule) -> Path:
    """A checkpoint as ``natural fit`` wrote it before the alignment: today's tensors, the old hparam dict."""
    data = {"dataset": "digits", "batch_size": 16, "num_workers": 0, "image_size": 16, "limit_train": 32,
            "limit_val": 16}  # fmt: skip
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": old, "pytorch-lightning_version": L.__version__,
                "datamodule_hyper_parameters": data}, str(path))  # fmt: skip
    return path


def test_an_old_ncmi_checkpoint_loads_with_its_ncmi_options(tmp_path: Path, caplog) -> None:
    torch.manual_seed(0)
    ref = ImageModule(objective="ncmi", ncmi_kwargs={k: OLD_NCMI[k] for k in ("tau", "center_momentum",
                      "use_centering")}, **TINY).eval()  # fmt: skip
    ckpt = _old_checkpoint(tmp_path / "old.ckpt", OLD_NCMI, ref)
    with caplog.at_level(logging.INFO, logger="wsi_ncmi.natural.legacy"):
        loaded = load_metric_model(WeightSpec(name="old", path=ckpt, arch=None))
    assert f"{ckpt}: hyper-parameters saved before the ImageModule alignment" in caplog.text
    assert (loaded.classifier, loaded.probs) == ("xi_centroids", "nsf")
    module = loaded.model.module.eval()
    assert module.criterion.tau == pytest.approx(0.7) and module.criterion.use_centering is False
    assert module.hparams.scheduler == "multistep" and module.hparams.milestones == [2]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(module(x), ref(x))
    res = evaluate_checkpoint(ckpt, protocols=("cc",), device="cpu")
    assert res["run"]["objective"] == "ncmi" and res["run"]["use_centering"] is False


def test_an_old_head_checkpoint_evaluates(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = ImageModule(objective="head", loss="ce", **TINY).eval()
    old = dict(TINY, objective="ce", loss_kwargs=None, tau=0.5, schedule="cosine")
    res = evaluate_checkpoint(_old_checkpoint(tmp_path / "ce.ckpt", old, ref), protocols=("head",), device="cpu")
    assert res["run"]["objective"] == "head" and 0.0 <= res["protocols"]["head"]["top1"] <= 1.0
