"""Fixed choices: ``Literal[...]`` options, the one runtime check (wsi_ncmi/choices.py) and the CLI's view of them."""

from __future__ import annotations

from typing import Literal

import pytest

from wsi_ncmi.choices import ChoiceError, check_choices, literal_choices
from wsi_ncmi.commands.natural_cli import main as natural_main
from wsi_ncmi.commands.train_cli import main_fit
from wsi_ncmi.data.cache import CacheError, resolve_cache_mode
from wsi_ncmi.data.plain import PlainValueError, check_signature_values
from wsi_ncmi.evaluation.probe import LinearProbe, ProbeError
from wsi_ncmi.natural.module import ImageModule, ImageModuleError
from wsi_ncmi.ncmi import NCMILoss
from wsi_ncmi.ncmi.simplex import NCMIError
from wsi_ncmi.training.mil_module import MILModule, TrainingConfigError

Mode = Literal["fast", "exact"]


def _opts(mode: Mode = "fast", level: Literal["low", "high"] | None = None,
          weights: list[float] | Literal["balanced"] | None = None, name: str = "x") -> None:
    """A callable with Literal options (and one free string) for the generic check."""


def test_literal_choices_reads_literals_and_unions() -> None:
    assert literal_choices(Mode) == ("fast", "exact")
    assert literal_choices(Literal["a"] | None) == ("a",)
    assert literal_choices(str) is None and literal_choices(int | None) is None


def test_a_bad_value_names_the_option_the_value_and_the_choices() -> None:
    with pytest.raises(ChoiceError, match=r"^opts: mode must be one of \('fast', 'exact'\), got 'slow'$"):
        check_choices(_opts, {"mode": "slow"}, "opts")
    with pytest.raises(ValueError, match=r"level must be one of \('low', 'high'\), got 3"):
        check_choices(_opts, {"level": 3}, "opts", ValueError)
    with pytest.raises(ChoiceError, match=r"weights must be one of \('balanced',\) \(or a list\[float\]\), got 'b'"):
        check_choices(_opts, {"weights": "b"}, "opts")


def test_good_values_other_union_arms_and_free_strings_pass() -> None:
    check_choices(_opts, {"mode": "exact", "level": None, "weights": [1.0, 2.0], "name": "anything", "other": 1}, "o")
    check_choices(_opts, {"weights": "balanced", "level": "high"}, "o")
    with pytest.raises(ChoiceError):  # case matters
        check_choices(_opts, {"mode": "FAST"}, "o")


@pytest.mark.parametrize(("build", "error", "text"), [
    (lambda: MILModule(objective="nope"), TrainingConfigError, "MILModule: objective must be one of ('head', 'ncmi')"),
    (lambda: MILModule(optimizer="lamb"), TrainingConfigError, "optimizer must be one of ('adamw', 'adam', 'radam'"),
    (lambda: MILModule(scheduler="step"), TrainingConfigError, "scheduler must be one of ('cosine', 'linear'"),
    (lambda: MILModule(class_weights="equal"), TrainingConfigError, "class_weights must be one of ('balanced',)"),
    (lambda: ImageModule(val_centroids="test"), ImageModuleError, "val_centroids must be one of ('train', 'xi')"),
    (lambda: ImageModule(objective="x"), ImageModuleError, "objective must be one of ('head', 'ncmi', 'contrastive')"),
    (lambda: NCMILoss(3, 4, variant="ratio"), NCMIError, "variant must be one of ('paper', 'official', 'harmonic')"),
    (lambda: NCMILoss(3, 4, centroid_update="adam"), NCMIError, "centroid_update must be one of ('sgd', 'frozen',"),
    (lambda: LinearProbe(2, solver="liblinear"), ProbeError, "solver must be one of ('lbfgs',"),
    (lambda: LinearProbe(2, refit="val"), ProbeError, "refit must be one of ('train', 'train+val')"),
    (lambda: LinearProbe(2, class_weight="auto"), ProbeError, "class_weight must be one of ('balanced',)"),
    (lambda: resolve_cache_mode("disk", 1, None, 0.5, "s.csv"), CacheError, "s.csv: mode must be one of ('auto',"),
])
def test_constructors_refuse_a_bad_choice_in_one_line(build, error, text) -> None:
    with pytest.raises(error) as info:
        build()
    assert text in str(info.value) and "\n" not in str(info.value)


def test_a_checkpoint_value_outside_the_choices_is_refused() -> None:
    assert check_signature_values(MILModule, {"objective": "ncmi"}, "c.ckpt") == {"objective": "ncmi"}
    with pytest.raises(PlainValueError, match="c.ckpt.objective: 'nope'"):
        check_signature_values(MILModule, {"objective": "nope"}, "c.ckpt")


def test_help_lists_the_choices(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main_fit(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--model.objective {head,ncmi}" in out
    assert "--model.centroid_init {public,class_means}" in out
    assert "--model.scheduler {cosine,linear,constant,multistep,none}" in out


def test_the_cli_refuses_a_bad_choice_in_one_line(tmp_path, capsys) -> None:
    argv = ["--model.objective", "nope", "--data.bags_dir", str(tmp_path), "--data.split_csv", str(tmp_path / "s.csv"),
            "--trainer.default_root_dir", str(tmp_path / "run")]
    assert main_fit(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("wsi-ncmi fit: error:")
    assert "model.objective" in err and "nope" in err and "'head', 'ncmi'" in err
    assert not (tmp_path / "run").exists()


def test_the_natural_cli_refuses_a_bad_choice_in_one_line(capsys) -> None:
    assert natural_main(["fit", "--model.val_centroids", "test", "--data.dataset", "digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.val_centroids" in err and "'train', 'xi'" in err
