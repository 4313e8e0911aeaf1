"""End to end: synthetic bags → aggregator (+ NCMI loss) → embed → LP / CC / head → report on disk;
and `wsi-ncmi evaluate` / `wsi-ncmi report` on real MILModule checkpoints trained for 2 epochs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _synthetic import make_witness_bags

from wsi_ncmi.evaluation.embed import EmbedError, embed_split, embed_splits
from wsi_ncmi.evaluation.protocols import evaluate_run
from wsi_ncmi.evaluation.report import read_report, write_report
from wsi_ncmi.models import create_model
from wsi_ncmi.ncmi import NCMILoss

DIM, C = 16, 3


@pytest.fixture(scope="module")
def bags(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("bags")
    split = make_witness_bags(out, n_slides=30, num_classes=C, dim=DIM, n_instances=(4, 12), seed=0)
    return out, split


def _datamodule(bags: tuple[Path, Path]):
    from wsi_ncmi.data import MILDataModule

    return MILDataModule(bags_dir=str(bags[0]), split_csv=str(bags[1]), pin_memory=False, num_classes=C)


def _train_a_little(model, loss, dm, steps: int = 30) -> None:
    params = list(model.parameters()) + [p for p in loss.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    model.train(), loss.train()
    it = 0
    while it < steps:
        for batch in dm.dataloader("train", shuffle=True):
            emb = model.forward_features(batch["features"], batch["mask"]).embedding
            terms = loss(emb, batch["label"]) if isinstance(loss, NCMILoss) else {
                "loss": torch.nn.functional.cross_entropy(model.forward_head(emb), batch["label"])}
            opt.zero_grad()
            terms["loss"].backward()
            opt.step()
            it += 1
            if it >= steps:
                break


def test_embed_split_contents_and_modes(bags) -> None:
    torch.manual_seed(0)
    dm = _datamodule(bags)
    model = create_model("abmil", in_dim=DIM, num_classes=C, inner_dim=8, attn_hidden=8)
    model.train()
    s = embed_split(model, dm.dataloader("val"), center=np.zeros(8))
    assert model.training  # mode restored
    n = dm.split_sizes()["val"]
    assert s.embeddings.shape == (n, 8) and s.logits.shape == (n, C) and s.log_probs is None
    np.testing.assert_allclose(np.linalg.norm(s.normalized, axis=1), 1.0, rtol=1e-6)
    assert s.slide_ids == dm.dataset("val").slide_ids and s.labels.tolist() == dm.dataset("val").labels
    # same embedding as a direct forward in eval mode
    batch = next(iter(dm.dataloader("val")))
    model.eval()
    with torch.no_grad():
        ref = model.forward_features(batch["features"], batch["mask"]).embedding.numpy()
    np.testing.assert_allclose(s.embeddings[:1], ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.input_means[0], batch["features"][0].float().mean(0).numpy(), rtol=1e-5)
    with pytest.raises(EmbedError):
        embed_split(model, [])
    with pytest.raises(EmbedError, match="dict"):
        embed_split(model, [torch.zeros(1, 3, DIM)])
    with pytest.raises(EmbedError, match="train"):
        embed_splits(model, {"val": dm.dataloader("val")})


@pytest.mark.slow
def test_ncmi_pipeline_without_training_module(bags, tmp_path: Path) -> None:
    torch.manual_seed(0)
    dm = _datamodule(bags)
    model = create_model("abmil", in_dim=DIM, num_classes=0, inner_dim=8, attn_hidden=8)
    loss = NCMILoss(C, model.embed_dim, tau=0.5, center_momentum=0.9)
    _train_a_little(model, loss, dm)
    loaders = {s: dm.dataloader(s) for s in ("train", "val", "test")}
    splits = embed_splits(model, loaders, ncmi_loss=loss)
    tr = splits["train"]
    assert tr.logits is None and tr.log_probs.shape == tr.embeddings.shape
    np.testing.assert_allclose(np.exp(tr.log_probs).sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(tr.normalized, loss.normalized(torch.from_numpy(tr.embeddings)).numpy(), rtol=1e-5)
    report, preds = evaluate_run(splits, C, dataset="synthetic", split_csv=str(bags[1]), model="abmil",
                                 objective="ncmi", class_names=dm.class_names, Cs=(0.1, 1.0, 10.0))
    paths = write_report(tmp_path, report, preds)
    back = read_report(paths["json"])
    assert set(back["metrics"]) == {"lp", "cc"}
    assert back["n_slides"] == dm.split_sizes()
    # the witness rule is learnable: after a little training, train-set CC is far above chance
    assert back["metrics"]["cc"]["train"]["accuracy"] > 0.6


def _fit_module(bags, run_dir: Path, objective: str, seed: int) -> Path:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from wsi_ncmi.training import MILModule

    pl.seed_everything(seed, workers=True)
    dm = _datamodule(bags)
    module = MILModule(model="abmil", model_kwargs={"inner_dim": 8, "attn_hidden": 8}, in_dim=DIM, num_classes=C,
                       objective=objective, lr=1e-3, ncmi_kwargs={"center_momentum": 0.9} if objective == "ncmi" else None)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=CSVLogger(str(run_dir), name="logs"),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, dm)
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    trainer.save_checkpoint(str(ckpt))
    return ckpt


@pytest.mark.slow
def test_cli_evaluate_and_report_on_real_checkpoints(bags, tmp_path: Path, capsys) -> None:
    from wsi_ncmi.cli import main

    outs = []
    for objective, seed in (("ncmi", 0), ("head", 1)):
        ckpt = _fit_module(bags, tmp_path / f"run_{objective}", objective, seed)
        out = tmp_path / f"eval_{objective}"
        seeds = ["--seeds", "0", "1", "--lp-input", "raw"] if objective == "head" else []
        rc = main(["evaluate", "--ckpt", str(ckpt), "--data.bags_dir", str(bags[0]), "--data.split_csv", str(bags[1]),
                   "--out", str(out), "--dataset", "bracs", "--Cs", "0.1", "1", "10", *seeds])
        assert rc == 0
        outs.append(out)
    ncmi_report = json.loads((outs[0] / "report.json").read_text())
    assert ncmi_report["objective"] == "ncmi" and set(ncmi_report["metrics"]) == {"lp", "cc"}
    assert ncmi_report["model"] == "abmil" and ncmi_report["centroid_update"] == "sgd"
    for name in ("report.md", "predictions.csv", "roc_lp_test.png", "roc_cc_test.png", "embedding_pca.png",
                 "training_curves.png", "embeddings.npz", "reliability.png", "classifier.npz", "classifier.json"):
        assert (outs[0] / name).stat().st_size > 0, name
    assert "0.701" in (outs[0] / "report.md").read_text()  # bracs (3 classes) / abmil / +NCMI-LP row
    with np.load(outs[0] / "embeddings.npz", allow_pickle=False) as npz:
        assert npz["test_log_probs"].shape[0] == ncmi_report["n_slides"]["test"]
    assert ncmi_report["calibration"]["classifier"] == "lp" and ncmi_report["calibration"]["reliability_png"]
    for k in (0, 1):  # two LP seeds -> one folder each, each with its classifier; the run folder points at seed 0
        assert (outs[1] / f"seed{k}" / "classifier.npz").is_file()
        head = read_report(outs[1] / f"seed{k}" / "report.json")
        assert set(head["metrics"]) == {"lp", "head"}
        assert head["protocol_info"]["lp"]["input"] == "raw slide embedding f"  # --lp-input raw
        assert set(head["protocol_info"]["lp"]["input_val_scores"]) == {"raw"}
        # "seed" is the checkpoint's training seed (pl.seed_everything(1) above), the LP seed is probe_seed
        assert (head["seed"], head["seed_source"], head["probe_seed"]) == (1, "training", k)
    assert (ncmi_report["seed"], ncmi_report["seed_source"]) == (0, "training")
    lp_info = ncmi_report["protocol_info"]["lp"]  # default --lp-input auto: both inputs fitted, one kept
    assert lp_info["lp_input"] == "auto" and set(lp_info["input_val_scores"]) == {"normalized", "raw"}
    assert "lp" in capsys.readouterr().out
    pointers = json.loads((tmp_path / "run_head" / "evaluations.json").read_text())
    assert [Path(v["classifier_dir"]) for v in pointers.values()] == [(outs[1] / "seed0").resolve()]

    rc = main(["report", str(outs[0]), str(outs[1]), "--out", str(tmp_path / "summary")])
    assert rc == 0
    summary = json.loads((tmp_path / "summary" / "summary.json").read_text())
    counts = sorted((g["objective"], g["n_runs"], g["n_checkpoints"]) for g in summary["groups"])
    assert counts == [("head", 2, 1), ("ncmi", 1, 1)]

    assert main(["evaluate", "--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "x")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "empty_dir_missing"), "--out", str(tmp_path / "y")]) == 2


def test_training_seed_from_checkpoint_or_run_config(tmp_path: Path) -> None:
    from wsi_ncmi.evaluation.run import training_seed
    from wsi_ncmi.training.checkpoint import read_checkpoint

    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {}}, ckpt)
    assert training_seed(read_checkpoint(ckpt), ckpt) is None
    (tmp_path / "run" / "config.yaml").write_text("seed_everything: 5\ntrainer: {}\n")
    assert training_seed(read_checkpoint(ckpt), ckpt) == 5
    torch.save({"state_dict": {}, "training_seed": 11}, ckpt)
    assert training_seed(read_checkpoint(ckpt), ckpt) == 11
