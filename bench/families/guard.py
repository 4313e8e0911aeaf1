"""The held-out guard of issue #23: held-out draws run only with ``--held-out``, only on a frozen recipe.

A recipe is *frozen* when ``git status`` shows no change (tracked or untracked) under :data:`RECIPE_PATHS` — the
MIL configs, the NCMI / loss / training / model code, the family generators and the benchmark itself. The
results file then records the commit of the frozen recipe (the last commit that touched those paths) and HEAD.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from .base import HELD_OUT_DRAWS, TUNING_DRAWS, is_held_out

RECIPE_PATHS = ("configs/mil", "wsi_ncmi/ncmi", "wsi_ncmi/losses", "wsi_ncmi/training", "wsi_ncmi/models",
                "bench/families", "bench/mil_benchmark.py")


class HeldOutError(RuntimeError):
    """A held-out draw was asked for without ``--held-out``, or the recipe is not frozen in a commit."""


def choose_draws(draws: list[int] | None, held_out: bool) -> list[int]:
    """The draws to run: the tuning draws by default, the held-out draws with ``held_out``; refuses a held-out
    draw without ``held_out`` and a tuning draw with it (held-out runs report held-out numbers only)."""
    if draws is None:
        return list(HELD_OUT_DRAWS if held_out else TUNING_DRAWS)
    held = [d for d in draws if is_held_out(d)]
    if held and not held_out:
        raise HeldOutError(f"draws {held} are held out: they run only with --held-out, once, after the recipe is "
                           f"frozen in a commit (tune on draws {list(TUNING_DRAWS)})")
    tuning = [d for d in draws if not is_held_out(d)]
    if held_out and tuning:
        raise HeldOutError(f"--held-out reports held-out draws only; drop the tuning draws {tuning}")
    return list(draws)


def _git(root: Path, *args: str) -> str:
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HeldOutError(f"held-out runs need git to record the frozen recipe: {exc}") from exc
    if proc.returncode != 0:
        raise HeldOutError(f"held-out runs need a git checkout: git {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def frozen_recipe(root: Path) -> dict[str, str]:
    """``{"recipe_commit", "head"}`` of the checkout at ``root``; raises :class:`HeldOutError` when a recipe
    path has uncommitted changes."""
    dirty = _git(root, "status", "--porcelain", "--untracked-files=all", "--", *RECIPE_PATHS)
    if dirty:
        first = dirty.splitlines()[0].strip()
        raise HeldOutError(f"refusing held-out draws: the recipe is not frozen ({len(dirty.splitlines())} "
                           f"uncommitted change(s) under {', '.join(RECIPE_PATHS)}, e.g. {first}); commit it first")
    return {"recipe_commit": _git(root, "log", "-1", "--format=%H", "--", *RECIPE_PATHS),
            "head": _git(root, "rev-parse", "HEAD")}
