"""One error base (issue #25): every error class the project raises about user input derives from
``wsi_ncmi.errors.UserError``, and the commands catch that one class."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from wsi_ncmi.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _error_classes() -> list[tuple[str, str, list[str]]]:
    out = []
    for pkg in ("wsi_ncmi", "preprocessing"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                    bases = [ast.unparse(b) for b in node.bases]
                    out.append((str(path.relative_to(ROOT)), node.name, bases))
    return out


def test_no_error_class_derives_from_valueerror_directly() -> None:
    direct = [f"{f}:{name}" for f, name, bases in _error_classes() if "ValueError" in bases and name != "UserError"]
    assert not direct, f"derive these from wsi_ncmi.errors.UserError: {direct}"


@pytest.mark.parametrize("command", ["evaluate_cli", "predict_cli", "heatmap_cli", "train_cli", "natural_cli"])
def test_commands_catch_the_one_base(command: str) -> None:
    src = (ROOT / "wsi_ncmi" / "commands" / f"{command}.py").read_text(encoding="utf-8")
    assert "except UserError" in src and "_user_errors" not in src and "_USER_ERRORS" not in src


def test_user_errors_reach_the_user_as_one_line(tmp_path, capsys) -> None:
    from wsi_ncmi.commands.evaluate_cli import main
    from wsi_ncmi.data.bags import BagError
    from wsi_ncmi.training.checkpoint import CheckpointError

    assert issubclass(BagError, UserError) and issubclass(CheckpointError, UserError)
    assert issubclass(UserError, ValueError)  # callers catching ValueError keep working
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"not a checkpoint")
    assert main(["--ckpt", str(ckpt), "--out", str(tmp_path / "e")]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(ckpt) in lines[0]
