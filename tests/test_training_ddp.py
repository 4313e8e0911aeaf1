"""MILModule under multi-process DDP on CPU (gloo), and ``class_weights="balanced"``.

The DDP test runs this file as a script (``python tests/test_training_ddp.py WORKDIR OBJECTIVE``) so that
Lightning's ``strategy="ddp"`` can re-launch it as the second rank; every rank writes its NCMI state and
its validation metrics to ``WORKDIR/rank<r>.pt``. The test then checks that checkpoints were written once,
that both ranks hold the same weights / feature center / centroids, and that the DDP validation metrics
equal a single-process validation of the saved checkpoint over the same validation bags (an odd number, so
the distributed sampler pads one rank with a duplicate bag).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as lightning
import pytest
import torch
from _synthetic import make_witness_bags

from wsi_ncmi.data import MILDataModule
from wsi_ncmi.training import LastCheckpoint, MILModule, TrainingConfigError

DIM = 16
EPOCHS = 2
# 23 slides: 12 of class 0, 11 of class 1 -> 14 train, 7 val (odd), 2 test
N_SLIDES = 23
FRACTIONS = (0.6, 0.3, 0.1)


def _make_bags(root: Path) -> Path:
    return make_witness_bags(root / "bags", n_slides=N_SLIDES, num_classes=2, dim=DIM, n_instances=(4, 12),
                             seed=3, witness_strength=5.0, fractions=FRACTIONS)


def _module(dm: MILDataModule, objective: str) -> MILModule:
    ncmi_kwargs = {"center_momentum": 0.9} if objective == "ncmi" else None  # a fast EMA shows divergence
    return MILModule(model="abmil", in_dim=dm.in_dim,
                     num_classes=dm.num_classes, objective=objective, lr=3e-3, ncmi_kwargs=ncmi_kwargs,
                     center_init_batches=2, centroid_init="class_means" if objective == "ncmi" else "public")


class _CenterTrace(lightning.Callback):
    """The NCMI feature center right after every training step (before DDP's next buffer broadcast)."""

    def __init__(self) -> None:
        self.centers: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.ncmi_loss is not None:
            self.centers.append(pl_module.ncmi_loss.center.center.detach().clone())


def _worker(workdir: Path, objective: str) -> None:
    """One rank of the DDP fit (run as a script; rank 0 launches rank 1)."""
    torch.set_num_threads(1)
    lightning.seed_everything(0)
    split = workdir / "bags" / "split.csv"
    dm = MILDataModule(str(workdir / "bags"), str(split), num_workers=0, pin_memory=False)
    module = _module(dm, objective)
    trace = _CenterTrace()
    ckpt = lightning.callbacks.ModelCheckpoint(dirpath=workdir / "checkpoints", filename="best",
                                               monitor="val/f1_plus_auc", mode="max")
    last = LastCheckpoint(dirpath=str(workdir / "checkpoints"))
    trainer = lightning.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=2, strategy="ddp",
                                logger=False, enable_progress_bar=False, enable_model_summary=False,
                                callbacks=[ckpt, last, trace], default_root_dir=workdir, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    torch.save({"state": state, "metrics": metrics, "world_size": trainer.world_size, "centers": trace.centers},
               workdir / f"rank{trainer.global_rank}.pt")


def _single_process_validate(workdir: Path, ckpt: Path) -> dict[str, float]:
    dm = MILDataModule(str(workdir / "bags"), str(workdir / "bags" / "split.csv"), num_workers=0,
                       pin_memory=False)
    module = MILModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    trainer = lightning.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                enable_model_summary=False, default_root_dir=workdir)
    (out,) = trainer.validate(module, datamodule=dm, verbose=False)
    return {k: float(v) for k, v in out.items()}


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["head", "ncmi"])
def test_ddp_two_cpu_processes(tmp_path, objective):
    _make_bags(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1])])}  # this tree's package
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, str(tmp_path), objective], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks), elapsed

    # checkpoints: written once (rank 0), nothing per rank
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]

    # every parameter and buffer (weights, ξ, its momentum, the feature center) identical on both ranks
    s0, s1 = ranks[0]["state"], ranks[1]["state"]
    assert s0.keys() == s1.keys()
    for key in s0:
        assert torch.equal(s0[key], s1[key]), f"{key} differs across ranks"
    if objective == "ncmi":
        # the center EMA is fed the global batch mean: identical on both ranks after *every* step (DDP's own
        # buffer broadcast would only copy rank 0's center, built from rank 0's bags, at the next forward)
        c0, c1 = ranks[0]["centers"], ranks[1]["centers"]
        assert len(c0) == len(c1) == EPOCHS * 7
        for step, (a, b) in enumerate(zip(c0, c1)):
            assert torch.equal(a, b), f"feature center differs across ranks after step {step}"
        assert not torch.equal(c0[0], c0[-1])
        assert bool(s0["ncmi_training.loss.center.initialized"])
        momentum = s0["ncmi_training.xi_momentum"]
        assert float(momentum.abs().sum()) > 0

    # DDP validation metrics == single-process validation of the saved weights over all validation bags
    m_ddp = ranks[0]["metrics"]
    assert m_ddp == ranks[1]["metrics"]
    m_one = _single_process_validate(tmp_path, tmp_path / "checkpoints" / "last.ckpt")
    keys = ["val/loss", "val/accuracy", "val/macro_f1", "val/macro_auc"]
    if objective == "ncmi":
        keys += ["val/cmi", "val/gamma", "val/ncmi", "val/xi_accuracy"]
        assert 0.0 <= m_ddp["val/cc_accuracy"] <= 1.0  # online CC: class means all-reduced over both ranks
    for key in keys:
        assert m_ddp[key] == pytest.approx(m_one[key], rel=1e-5, abs=1e-6), (key, m_ddp, m_one)


# ------------------------------------------------------------------------------------ balanced weights
def test_balanced_class_weights(tmp_path):
    # 3 classes with 9 / 6 / 3 training bags
    split = make_witness_bags(tmp_path, n_slides=18, num_classes=3, dim=8, n_instances=(4, 6), seed=1,
                              fractions=(1.0, 0.0, 0.0))
    rows = split.read_text().splitlines()
    header, body = rows[0], rows[1:]
    labels = [0] * 9 + [1] * 6 + [2] * 3
    new_body = []
    for row, y in zip(body, labels):
        sid, pid, _label, _split = row.split(",")
        new_body.append(f"{sid},{pid},{y},train")
    new_body[0] = new_body[0].rsplit(",", 1)[0] + ",val"  # one class-0 bag to validation
    split.write_text("\n".join([header, *new_body]) + "\n")
    dm = MILDataModule(str(tmp_path), str(split), num_workers=0, pin_memory=False)
    module = MILModule(in_dim=dm.in_dim, num_classes=3, class_weights="balanced")
    trainer = lightning.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, accelerator="cpu",
                                logger=False, enable_progress_bar=False, enable_model_summary=False,
                                enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    counts = torch.tensor([8.0, 6.0, 3.0])  # training split only (one class-0 bag is in val)
    expected = counts.sum() / (3 * counts)
    assert torch.allclose(module.criterion.weight, expected)
    # the weight reaches the loss: weighted CE of a fixed batch equals torch's weighted CE
    logits, target = torch.randn(5, 3), torch.tensor([0, 1, 2, 2, 1])
    got = module.criterion(logits, target)["loss"]
    assert torch.allclose(got, torch.nn.functional.cross_entropy(logits, target, weight=expected))
    # saved with the module: a fresh module loading the state gets the same weights
    clone = MILModule(in_dim=dm.in_dim, num_classes=3, class_weights="balanced")
    clone.load_state_dict(module.state_dict())
    assert torch.allclose(clone.criterion.weight, expected)


def test_class_weights_rejects_unknown_string():
    with pytest.raises(TrainingConfigError, match="class_weights"):
        MILModule(in_dim=8, num_classes=2, class_weights="inverse")


if __name__ == "__main__":  # one DDP rank (see the module docstring)
    _worker(Path(sys.argv[1]), sys.argv[2])
