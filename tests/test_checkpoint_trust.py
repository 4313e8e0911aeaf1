"""Checkpoints and weight files are untrusted data (issue #22, part 1).

For every command that reads a checkpoint or a weight file, two payloads — a pickled object that would run code
when unpickled, and a pickle-free checkpoint whose hyper-parameters name a class to build (``class_path:
subprocess.Popen``) — each with and without ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``: no code runs (no marker
file appears), the command exits non-zero and prints one line naming the file. Then the schema itself: unknown
keys, wrong types, ``class_path`` anywhere, the other track's checkpoint, a resume into another model's config,
and the old ``wsi-ncmi fit`` checkpoints that must keep loading.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from _synthetic import make_witness_bags

from wsi_ncmi.data.plain import PlainValueError, check_plain, check_signature_values

DIM = 8
MIL_ARGS = ["--data.num_workers", "0", "--data.pin_memory", "false", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.max_epochs", "1", "--model.lr", "3e-3", "--seed_everything", "0",
            "--model.model_kwargs", '{"inner_dim": 8, "attn_hidden": 8}']
NATURAL_ARGS = ["--data.dataset", "digits", "--data.image_size", "16", "--data.num_workers", "0",
                "--data.batch_size", "16", "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1",
                "--trainer.enable_progress_bar", "false", "--model.width", "0.125"]


class _MakeDir:
    """Unpickling this runs ``os.mkdir(path)``: stands for any code in a malicious pickle."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _popen(marker: Path) -> dict:
    """What jsonargparse would build: ``subprocess.Popen(["touch", marker])``."""
    return {"class_path": "subprocess.Popen", "init_args": {"args": ["touch", str(marker)]}}


def _pickled(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 0, "payload": _MakeDir(marker)}, path)
    return path


def _class_path(base: Path, path: Path, marker: Path, where: str) -> Path:
    """A copy of the real checkpoint ``base`` whose ``hyper_parameters[where]`` names a class (no pickle)."""
    state = torch.load(str(base), map_location="cpu", weights_only=True)
    hp = state["hyper_parameters"]
    hp[where] = {**(hp.get(where) or {}), "x": _popen(marker)}
    hp["_instantiator"] = "lightning.pytorch.cli.instantiate_module"
    torch.save(state, path)
    return path


def _one_line_naming(err: str, path: Path) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert str(path) in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def mil(tmp_path_factory) -> dict[str, Path]:
    """A 1-epoch ABMIL run on tiny witness bags: bags, split, run, best.ckpt."""
    from wsi_ncmi.commands.train_cli import main_fit

    d = tmp_path_factory.mktemp("trust_mil")
    bags = d / "bags"
    split = make_witness_bags(bags, n_slides=12, num_classes=2, dim=DIM, n_instances=(4, 8), seed=0)
    run = d / "run"
    assert main_fit(["--data.bags_dir", str(bags), "--data.split_csv", str(split),
                     "--trainer.default_root_dir", str(run), *MIL_ARGS]) == 0
    return {"bags": bags, "split": split, "run": run, "ckpt": run / "checkpoints" / "best.ckpt"}


@pytest.fixture(scope="module")
def natural(tmp_path_factory) -> Path:
    """A natural-image checkpoint (tiny ResNet-18 on digits) as `wsi-ncmi natural fit` saves it."""
    from wsi_ncmi.natural.module import ImageModule

    d = tmp_path_factory.mktemp("trust_nat")
    module = ImageModule(backbone="resnet18", num_classes=10, width=0.125)
    path = d / "natural.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "datamodule_hyper_parameters": {"dataset": "digits", "image_size": 16, "num_workers": 0,
                                                "batch_size": 16}, "epoch": 0}, path)
    return path


def _mil_commands(mil: dict[str, Path], evil: Path, out: Path) -> list[tuple[str, object, list[str]]]:
    from wsi_ncmi.commands import evaluate_cli, heatmap_cli, predict_cli, train_cli

    slide = out / "a.svs"
    slide.parent.mkdir(parents=True, exist_ok=True)
    slide.write_bytes(b"x")
    data = ["--data.bags_dir", str(mil["bags"]), "--data.split_csv", str(mil["split"])]
    train = [*data, "--trainer.default_root_dir", str(out / "run"), *MIL_ARGS, "--ckpt_path", str(evil)]
    return [
        ("evaluate", evaluate_cli.main, ["--ckpt", str(evil), *data, "--out", str(out / "eval"), "--no-plots"]),
        ("predict", predict_cli.main, ["--ckpt", str(evil), "--bags", str(mil["bags"]), "--out", str(out / "pred")]),
        ("heatmap", heatmap_cli.main, ["--ckpt", str(evil), "--slide", str(slide),
                                       "--bag", str(mil["bags"] / "slide_000.h5"), "--out", str(out / "h.png")]),
        ("fit", train_cli.main_fit, train),
        ("validate", train_cli.main_validate, train),
        ("test", train_cli.main_test, train),
    ]


def _natural_commands(evil: Path, out: Path) -> list[tuple[str, object, list[str]]]:
    from wsi_ncmi.commands import natural_cli

    train = [*NATURAL_ARGS, "--trainer.default_root_dir", str(out / "run"), "--ckpt_path", str(evil)]
    return [
        ("natural evaluate", natural_cli.main, ["evaluate", "--ckpt", str(evil), "--out", str(out / "e.json")]),
        ("natural fit", natural_cli.main, ["fit", *train]),
        ("natural validate", natural_cli.main, ["validate", *train]),
        ("natural test", natural_cli.main, ["test", *train]),
    ]


def _weights_commands(mil: dict[str, Path], evil: Path, out: Path) -> list[tuple[str, object, list[str]]]:
    """``predict --slides-dir --weights`` reads its weights through wsi-preprocess (listed), after checking the
    file's SHA-256 against the training bags' (tests/test_predict.py): a foreign file is not even opened."""
    from _images import write_imagefolder

    from preprocessing.cli import main as preprocess_main
    from wsi_ncmi.commands import ncmi_metric_cli

    slides = out / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    from preprocessing import synthetic

    rgb, _ = synthetic.synthetic_tissue(200, 240, seed=3, n_blobs=1, coverage=0.5)
    synthetic.write_svs(slides / "s.svs", rgb, mpp=0.5, downsamples=(1, 4))
    images = write_imagefolder(out / "images")
    return [
        ("ncmi-metric", ncmi_metric_cli.main_ncmi_metric,
         ["--weights", f"resnet18={evil}", "--data", str(images), "--image-size", "16", "--batch-size", "4",
          "--workers", "0", "--device", "cpu", "--out", str(out / "metric")]),
        ("wsi-preprocess", preprocess_main,
         ["--input", str(slides), "--output", str(out / "feats"), "--encoder", "test_resnet", "--weights", str(evil),
          "--device", "cpu", "--workers", "0", "--no-progress", "--seg-mpp", "4", "--target-mpp", "2",
          "--patch-size", "32"]),
    ]


def _assert_refused(commands, evil: Path, marker: Path, capsys) -> None:
    for name, main, argv in commands:
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc != 0, f"{name}: exit 0 on {evil}"
        _one_line_naming(err, evil)
    time.sleep(0.5)  # a Popen that had started would have touched the marker by now
    assert not marker.exists(), "code from the file ran"


@pytest.mark.fault(kind="code_exec")
@pytest.mark.parametrize("force_unpickle", [False, True], ids=["default", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"])
@pytest.mark.parametrize("payload", ["pickle", "class_path"])
def test_mil_commands_run_no_code_from_a_checkpoint(mil, tmp_path, capsys, monkeypatch, payload,
                                                     force_unpickle) -> None:
    if force_unpickle:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    evil = (_pickled(tmp_path / "evil.ckpt", marker) if payload == "pickle"
            else _class_path(mil["ckpt"], tmp_path / "evil.ckpt", marker, "model_kwargs"))
    _assert_refused(_mil_commands(mil, evil, tmp_path / "out"), evil, marker, capsys)


@pytest.mark.fault(kind="code_exec")
@pytest.mark.parametrize("force_unpickle", [False, True], ids=["default", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"])
@pytest.mark.parametrize("payload", ["pickle", "class_path"])
def test_natural_commands_run_no_code_from_a_checkpoint(natural, tmp_path, capsys, monkeypatch, payload,
                                                         force_unpickle) -> None:
    if force_unpickle:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    evil = (_pickled(tmp_path / "evil.ckpt", marker) if payload == "pickle"
            else _class_path(natural, tmp_path / "evil.ckpt", marker, "ncmi_kwargs"))
    _assert_refused(_natural_commands(evil, tmp_path / "out"), evil, marker, capsys)


@pytest.mark.fault(kind="code_exec")
@pytest.mark.parametrize("force_unpickle", [False, True], ids=["default", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"])
@pytest.mark.parametrize("payload", ["pickle", "class_path"])
def test_weight_file_commands_run_no_code(mil, natural, tmp_path, capsys, monkeypatch, payload,
                                          force_unpickle) -> None:
    if force_unpickle:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    evil = (_pickled(tmp_path / "evil.pth", marker) if payload == "pickle"
            else _class_path(natural, tmp_path / "evil.pth", marker, "loss_kwargs"))
    _assert_refused(_weights_commands(mil, evil, tmp_path / "out"), evil, marker, capsys)


# ------------------------------------------------------------------------------------------ the schema
def test_check_plain_refuses_code_keys_and_objects_anywhere() -> None:
    check_plain({"a": 1, "b": [1.5, "x", None, True], "c": {"d": "e"}}, "opts")
    for bad, says in (({"class_path": "os.system"}, "opts.class_path"),
                      ({"a": [{"init_args": {}}]}, "opts.a[0].init_args"),
                      ({"a": {"b": {"_class_path": "x"}}}, "opts.a.b._class_path"),
                      ({"a": object()}, "object is not a plain value"),
                      ({"a": torch.zeros(1)}, "Tensor is not a plain value")):
        with pytest.raises(PlainValueError, match=None) as err:
            check_plain(bad, "opts")
        assert says in str(err.value)


def test_check_signature_values_checks_keys_and_annotated_types() -> None:
    from wsi_ncmi.training.mil_module import MILModule

    ok = check_signature_values(MILModule, {"model": "abmil", "lr": 1, "class_weights": "balanced",
                                            "_instantiator": "lightning.pytorch.cli.instantiate_module"}, "f.ckpt",
                                ignore={"_instantiator": "lightning.pytorch.cli.instantiate_module"})
    assert ok == {"model": "abmil", "lr": 1, "class_weights": "balanced"}  # the bookkeeping key is dropped
    cases = [({"not_an_arg": 1}, "unknown key 'not_an_arg'"),
             ({"lr": "0.1"}, "f.ckpt.lr: '0.1' is not a float"),
             ({"num_classes": True}, "f.ckpt.num_classes: True is not a int"),
             ({"class_weights": [1, "a"]}, "f.ckpt.class_weights"),
             ({"_instantiator": "os.system"}, "f.ckpt._instantiator: refused"),
             ({"_class_path": "subprocess.Popen"}, "f.ckpt._class_path: refused")]
    for values, says in cases:
        with pytest.raises(PlainValueError) as err:
            check_signature_values(MILModule, values, "f.ckpt",
                                   ignore={"_instantiator": "lightning.pytorch.cli.instantiate_module"})
        assert says in str(err.value), str(err.value)


@pytest.mark.fault(kind="code_exec")
def test_the_module_refuses_a_class_path_in_kwargs_from_a_config(mil, tmp_path, capsys) -> None:
    from wsi_ncmi.commands.train_cli import main_fit

    marker = tmp_path / "pwned"
    payload = '{"inner_dim": 8, "attn_hidden": {"class_path": "subprocess.Popen", "init_args": {"args": ["touch", "%s"]}}}'
    args = ["--data.bags_dir", str(mil["bags"]), "--data.split_csv", str(mil["split"]),
            "--trainer.default_root_dir", str(tmp_path / "run"), *MIL_ARGS, "--model.model_kwargs", payload % marker]
    assert main_fit(args) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model_kwargs.attn_hidden.class_path: refused" in line
    time.sleep(0.5)
    assert not marker.exists()


@pytest.mark.fault(kind="traceback")
def test_a_natural_checkpoint_given_to_a_mil_command_and_back_is_named(mil, natural, tmp_path, capsys) -> None:
    from wsi_ncmi.commands import evaluate_cli, natural_cli

    rc = evaluate_cli.main(["--ckpt", str(natural), "--data.bags_dir", str(mil["bags"]), "--data.split_csv",
                            str(mil["split"]), "--out", str(tmp_path / "e"), "--no-plots"])
    line = _one_line_naming(capsys.readouterr().err, natural)
    assert rc == 2 and "natural-image checkpoint" in line and "wsi-ncmi natural evaluate" in line
    rc = natural_cli.main(["evaluate", "--ckpt", str(mil["ckpt"]), "--out", str(tmp_path / "e.json")])
    line = _one_line_naming(capsys.readouterr().err, mil["ckpt"])
    assert rc == 2 and "MIL checkpoint" in line and "wsi-ncmi evaluate" in line


@pytest.mark.fault(kind="silent_wrong")
def test_resume_into_a_config_of_another_model_is_refused(mil, tmp_path, capsys) -> None:
    from wsi_ncmi.commands.train_cli import main_fit

    run = tmp_path / "run"
    args = ["--data.bags_dir", str(mil["bags"]), "--data.split_csv", str(mil["split"]),
            "--trainer.default_root_dir", str(run), *MIL_ARGS, "--model.model", "aem",
            "--model.model_kwargs", '{"inner_dim": 8, "num_heads": 2}', "--ckpt_path", str(mil["ckpt"])]
    assert main_fit(args) == 2
    line = _one_line_naming(capsys.readouterr().err, mil["ckpt"])
    assert "model='abmil' (config: 'aem')" in line and "config.yaml" in line
    assert not (run / "checkpoints").exists()


def test_old_fit_checkpoints_keep_loading(mil, tmp_path) -> None:
    """A checkpoint exactly as `wsi-ncmi fit` writes it (with Lightning's ``_instantiator``) loads, and gives the
    same embedding as the module it was saved from."""
    from wsi_ncmi.data.bags import read_bag
    from wsi_ncmi.training.checkpoint import load_mil_module

    state = torch.load(str(mil["ckpt"]), map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["_instantiator"] == "lightning.pytorch.cli.instantiate_module"
    copy = tmp_path / "copy.ckpt"
    shutil.copy(mil["ckpt"], copy)
    module, loaded = load_mil_module(copy)
    assert loaded["datamodule_hyper_parameters"]["bags_dir"] == str(mil["bags"])
    x = torch.as_tensor(read_bag(mil["bags"] / "slide_000.h5").features[:], dtype=torch.float32)[None]
    sd = {k: v for k, v in module.state_dict().items()}
    assert all(torch.equal(sd[k], v) for k, v in state["state_dict"].items())
    assert torch.isfinite(module.embed(x)).all()


@pytest.mark.fault(kind="unclear")
def test_a_folder_given_as_checkpoint_is_named_as_a_folder(mil, tmp_path, capsys) -> None:
    from wsi_ncmi.commands.train_cli import main_fit

    folder = tmp_path / "ckpts"
    folder.mkdir()
    args = ["--data.bags_dir", str(mil["bags"]), "--data.split_csv", str(mil["split"]),
            "--trainer.default_root_dir", str(tmp_path / "run"), *MIL_ARGS, "--ckpt_path", str(folder)]
    assert main_fit(args) == 2
    line = _one_line_naming(capsys.readouterr().err, folder)
    assert "a folder, not a checkpoint file" in line
