"""``predict_checkpoint`` (the `wsi-ncmi predict` workflow) with an injected bag builder: the `--slides-dir`
checks, what the builder is asked for, failed slides reported and the others predicted."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as lightning
import pytest
import torch
from _synthetic import make_witness_bags

from wsi_ncmi.data import MILDataModule
from wsi_ncmi.data.bags import list_bags
from wsi_ncmi.data.provenance import CHECKPOINT_KEY, ProvenanceError
from wsi_ncmi.evaluation.predict import PredictError
from wsi_ncmi.evaluation.predict_run import predict_checkpoint
from wsi_ncmi.training import MILModule

DIM = 8


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict_run")
    bags = root / "bags"
    split = make_witness_bags(bags, n_slides=8, num_classes=2, dim=DIM, n_instances=(4, 8), seed=0)
    lightning.seed_everything(0, workers=True)
    dm = MILDataModule(str(bags), str(split), num_workers=0, pin_memory=False, num_classes=2)
    module = MILModule(model="abmil", model_kwargs={"inner_dim": 8, "attn_hidden": 8}, in_dim=DIM, num_classes=2)
    trainer = lightning.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    plain = root / "plain.ckpt"
    trainer.save_checkpoint(str(plain))
    state = torch.load(plain, weights_only=True)
    state[CHECKPOINT_KEY] = {**state[CHECKPOINT_KEY], "settings": {"encoder": "synthetic", "weights_sha256": "ab"}}
    recorded = root / "recorded.ckpt"
    torch.save(state, recorded)
    return {"bags": bags, "plain": plain, "recorded": recorded, "slides": root / "slides"}


@dataclass
class FakeRun:
    statuses: dict[str, str]
    calls: list[dict] = field(default_factory=list)

    def failed(self) -> list[str]:
        return sorted(s for s, st in self.statuses.items() if st == "error")


def _builder(bags: Path, fail: str):
    """A bag builder that 'preprocesses' by copying ``bags`` and reports ``fail`` as an error."""
    calls: list[dict] = []

    def build(settings, *, input, output, weights, slides, check_sha):
        calls.append({"settings": dict(settings), "input": input, "output": output, "weights": weights,
                      "slides": slides, "check_sha": check_sha})
        done = Path(output) / "bags"
        done.mkdir(parents=True)
        statuses = {}
        for sid, path in list_bags(bags).items():
            statuses[sid] = "error" if sid == fail else "ok"
            if sid != fail:
                shutil.copy(path, done / path.name)
        return FakeRun(statuses)

    return build, calls


def test_slides_dir_builds_bags_with_the_recorded_settings_and_reports_failed_slides(fitted, tmp_path) -> None:
    fitted["slides"].mkdir(exist_ok=True)
    fail = sorted(list_bags(fitted["bags"]))[0]
    build, calls = _builder(fitted["bags"], fail)
    warned: list[str] = []
    run = predict_checkpoint(fitted["recorded"], tmp_path / "out", slides_dir=fitted["slides"], build_bags=build,
                             weights="w.bin", warn=warned.append)
    assert calls == [{"settings": {"encoder": "synthetic", "weights_sha256": "ab"}, "input": str(fitted["slides"]),
                      "output": str(tmp_path / "out" / "features"), "weights": "w.bin", "slides": None,
                      "check_sha": True}]
    assert run.failed == [fail] and fail in warned[0] and "1 slide(s) failed preprocessing" in warned[0]
    assert sorted(run.prediction.table["slide_id"]) == sorted(set(list_bags(fitted["bags"])) - {fail})
    assert (tmp_path / "out" / "predictions.csv").is_file()


def test_slides_dir_refusals_name_the_flag(fitted, tmp_path) -> None:
    fitted["slides"].mkdir(exist_ok=True)
    build, calls = _builder(fitted["bags"], "")
    with pytest.raises(ProvenanceError, match="records no preprocessing settings"):
        predict_checkpoint(fitted["plain"], tmp_path / "a", slides_dir=fitted["slides"], build_bags=build,
                           weights="w.bin")
    with pytest.raises(ProvenanceError, match="--slides-dir needs --weights"):
        predict_checkpoint(fitted["recorded"], tmp_path / "b", slides_dir=fitted["slides"], build_bags=build)
    with pytest.raises(PredictError, match="--weights is only used with --slides-dir"):
        predict_checkpoint(fitted["recorded"], tmp_path / "c", bags=fitted["bags"], weights="w.bin")
    with pytest.raises(PredictError, match="no such folder"):
        predict_checkpoint(fitted["recorded"], tmp_path / "d", slides_dir=tmp_path / "nope", build_bags=build,
                           weights="w.bin")
    assert calls == []  # nothing was preprocessed
