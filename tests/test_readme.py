"""The README's code blocks marked `<!-- runnable -->` are executed as a user would type them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- runnable -->\s*\n```(bash|python)\n(.*?)```", re.S)


def _blocks() -> list[tuple[str, str]]:
    return BLOCK.findall((ROOT / "README.md").read_text(encoding="utf-8"))


def test_readme_has_runnable_blocks_of_both_kinds() -> None:
    kinds = {k for k, _ in _blocks()}
    assert kinds == {"bash", "python"}


@pytest.mark.parametrize("kind,code", _blocks(), ids=lambda v: v if v in {"bash", "python"} else "")
def test_readme_block_runs(kind: str, code: str, tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if kind == "bash":
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    else:
        script = tmp_path / "block.py"
        script.write_text(code, encoding="utf-8")
        cmd = [sys.executable, str(script)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"README {kind} block failed:\n{code}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
