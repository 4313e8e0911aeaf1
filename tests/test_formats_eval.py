"""`wsi-ncmi heatmap` and `wsi-ncmi predict` on the slide formats preprocessing reads beyond OpenSlide files
(issue #24): a DICOM WSI folder (the real CMU Aperio slide converted with wsidicomizer) and an OME-TIFF.

The DICOM folder and the SVS it came from are both preprocessed; their bags share the slide id ``cmu`` and the
tile grid, so only the recorded source size (a folder's summed file sizes, as preprocessing computes it) tells
the SVS's bag from the folder's own.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _images import cmu_slide, dicomize, preprocess_config, write_ome_tiff

from wsi_ncmi.data.bags import read_bag

C = 2


def _tiny_checkpoint(root: Path, dim: int) -> Path:
    """A 1-epoch ABMIL (head objective) checkpoint on witness bags of feature dim ``dim``."""
    import lightning.pytorch as lightning
    from _synthetic import make_witness_bags

    from wsi_ncmi.data import MILDataModule
    from wsi_ncmi.training import MILModule

    lightning.seed_everything(0, workers=True)
    split = make_witness_bags(root / "bags", n_slides=8, num_classes=C, dim=dim, n_instances=(4, 8), seed=0)
    dm = MILDataModule(str(root / "bags"), str(split), num_workers=0, pin_memory=False, num_classes=C)
    module = MILModule(model="abmil", model_kwargs={"inner_dim": 16, "attn_hidden": 16}, in_dim=dim,
                       num_classes=C, objective="head", lr=1e-3)
    trainer = lightning.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    ckpt = root / "checkpoints" / "best.ckpt"
    trainer.save_checkpoint(str(ckpt))
    return ckpt


@pytest.fixture(scope="module")
def cmu_dicom(tmp_path_factory) -> dict[str, Path]:
    """``folder``: CMU as a DICOM WSI folder ``cmu/``; ``dicom_bag`` / ``svs_bag``: its bag and the SVS's
    (same slide id and tiles); ``ckpt``: a checkpoint for their feature dim."""
    src = cmu_slide()
    d = tmp_path_factory.mktemp("formats_eval")
    folder = dicomize(src, d / "dicom" / "cmu")
    (d / "svs").mkdir()
    os.symlink(src, d / "svs" / "cmu.svs")
    from preprocessing.extract import run

    for name in ("dicom", "svs"):
        res = run(preprocess_config(d / name, d / f"out_{name}", target_mpp=4.0, patch_size=32, min_tissue=0.1))
        assert res.statuses == {"cmu": "ok"}
    dicom_bag, svs_bag = d / "out_dicom/bags/cmu.h5", d / "out_svs/bags/cmu.h5"
    return {"folder": folder, "dicom_bag": dicom_bag, "svs_bag": svs_bag,
            "ckpt": _tiny_checkpoint(d / "run", read_bag(dicom_bag).dim)}


def _heatmap(run: dict[str, Path], slide: Path, bag: Path, out: Path, *extra: str) -> int:
    from wsi_ncmi.commands.heatmap_cli import main

    return main(["--ckpt", str(run["ckpt"]), "--slide", str(slide), "--bag", str(bag), "--out", str(out), *extra])


def test_heatmap_of_a_dicom_folder_and_the_size_check(cmu_dicom, tmp_path, capsys) -> None:
    from PIL import Image

    folder, bag = cmu_dicom["folder"], read_bag(cmu_dicom["dicom_bag"])
    folder_size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    svs_size = Path(read_bag(cmu_dicom["svs_bag"]).attrs["source_path"]).stat().st_size
    assert int(bag.attrs["source_size"]) == folder_size != svs_size  # preprocessing's rule for a folder

    out = tmp_path / "hm" / "cmu.png"
    assert _heatmap(cmu_dicom, folder, cmu_dicom["dicom_bag"], out, "--csv") == 0, capsys.readouterr().err
    assert f"{bag.n} tiles of slide cmu" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.size[0] > 100 and im.size[1] > 100
    assert len(pd.read_csv(out.with_suffix(".tiles.csv"))) == bag.n

    # one of the folder's .dcm instances names the folder, as in preprocessing (slide id = folder name)
    instance = next(folder.glob("*.dcm"))
    assert _heatmap(cmu_dicom, instance, cmu_dicom["dicom_bag"], tmp_path / "hm" / "cmu2.png") == 0
    capsys.readouterr()

    # the SVS's bag: same id, same tiles, another source: refused by the recorded size, nothing written
    refused = tmp_path / "refused.png"
    assert _heatmap(cmu_dicom, folder, cmu_dicom["svs_bag"], refused) == 2
    err = capsys.readouterr().err
    assert f"records a source of {svs_size} bytes, the slide has {folder_size}" in err
    assert "tiles lie outside" not in err and "slide_id" not in err and not refused.exists()
    # and the folder's bag is refused on the SVS
    svs = Path(read_bag(cmu_dicom["svs_bag"]).attrs["source_path"])
    assert _heatmap(cmu_dicom, svs, cmu_dicom["dicom_bag"], refused) == 2
    assert f"records a source of {folder_size} bytes, the slide has {svs_size}" in capsys.readouterr().err

    # a folder that is not a slide: one line naming it
    (tmp_path / "empty").mkdir()
    assert _heatmap(cmu_dicom, tmp_path / "empty", cmu_dicom["dicom_bag"], refused) == 2
    assert "empty: no reader" in capsys.readouterr().err


def test_predict_finds_dicom_folders_and_ome_tiffs_and_draws_them(cmu_dicom, tmp_path) -> None:
    from preprocessing.discovery import slide_paths
    from preprocessing.readers import open_slide
    from wsi_ncmi.evaluation.predict import slide_file, write_heatmaps
    from wsi_ncmi.training.checkpoint import load_mil_module

    slides = tmp_path / "slides"
    (slides / "site_a").mkdir(parents=True)
    os.symlink(cmu_dicom["folder"], slides / "site_a" / "cmu", target_is_directory=True)
    rgb = np.full((256, 384, 3), 235, np.uint8)
    write_ome_tiff(slides / "ome.ome.tif", [rgb, rgb[::2, ::2]], 0.5, "µm")
    (slides / "notes.txt").write_text("not a slide")
    out = slides / "pred"  # the output folder inside --slides-dir is not searched
    (out / "heatmaps").mkdir(parents=True)
    write_ome_tiff(out / "heatmaps" / "old.ome.tif", [rgb], 0.5, "µm")

    found = slide_paths(slides, out)
    assert found == {"cmu": slides / "site_a" / "cmu", "ome.ome": slides / "ome.ome.tif"}
    assert slide_file(cmu_dicom["dicom_bag"], found) == slides / "site_a" / "cmu"
    # without a listing: the bag's recorded source, here a folder
    assert slide_file(cmu_dicom["dicom_bag"]) == cmu_dicom["folder"]

    model = load_mil_module(cmu_dicom["ckpt"])[0].model
    done = write_heatmaps(model, {"cmu": cmu_dicom["dicom_bag"]}, out / "heatmaps", slide_paths=found,
                          max_side=256, open_slide=open_slide)
    assert done == {"cmu": str(out / "heatmaps" / "cmu.png")} and (out / "heatmaps" / "cmu.png").is_file()
