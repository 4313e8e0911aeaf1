"""Imports flow one way (docs/internals.md): parse every module and check what it imports of ours."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package prefix -> prefixes of ours it may import (its own package is always allowed)
# the top layer (wsi_ncmi.cli, wsi_ncmi.commands, wsi_ncmi.demo) may import everything below it, but:
# - the demo calls library functions, never a command (no CLI driven by argv inside the library);
# - a command never imports another command, except the shared one-line error formatter commands/errors.py.
TOP_FORBIDDEN: dict[str, tuple[str, ...]] = {
    "wsi_ncmi.demo": ("wsi_ncmi.commands", "wsi_ncmi.cli"),
    "wsi_ncmi.commands": ("wsi_ncmi.commands", "wsi_ncmi.cli"),
}
TOP_SHARED = ("wsi_ncmi.commands.errors",)

# every layer may import the one error base (wsi_ncmi/errors.py, a leaf of the standard library only) and the
# one check of fixed choices (wsi_ncmi/choices.py, a leaf of the standard library and errors.py)
SHARED_LEAVES = ("wsi_ncmi.errors", "wsi_ncmi.choices")

ALLOWED: dict[str, tuple[str, ...]] = {
    "wsi_ncmi.errors": (),
    "wsi_ncmi.choices": (),
    "wsi_ncmi.ncmi": (),
    "wsi_ncmi.losses": ("wsi_ncmi.ncmi",),
    "wsi_ncmi.data": (),
    "wsi_ncmi.metrics": (),
    "wsi_ncmi.models": (),
    "wsi_ncmi.training": ("wsi_ncmi.ncmi", "wsi_ncmi.losses", "wsi_ncmi.models", "wsi_ncmi.data", "wsi_ncmi.metrics"),
    # evaluation reads checkpoints through the one loader (evaluate_checkpoint); training never imports evaluation
    "wsi_ncmi.evaluation": ("wsi_ncmi.ncmi", "wsi_ncmi.data", "wsi_ncmi.models", "wsi_ncmi.metrics",
                            "wsi_ncmi.training.checkpoint"),
    # the natural-image track: nothing below imports it, only the top layer (cli, commands, demo)
    "wsi_ncmi.natural": ("wsi_ncmi.ncmi", "wsi_ncmi.losses", "wsi_ncmi.data", "wsi_ncmi.metrics", "wsi_ncmi.training"),
    "preprocessing": ("wsi_ncmi.data.bags", "wsi_ncmi.data.atomic", "wsi_ncmi.data.weights"),
}
OURS = ("wsi_ncmi", "preprocessing")


def _module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    mod = _module_name(path, root)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if node.module is None or node.level:
                out += [f"{name}.{a.name}" for a in node.names] if node.module is None else [name]
            else:
                out.append(name)
    return [n for n in out if n.split(".")[0] in OURS]


def _layer(mod: str) -> str | None:
    for prefix in sorted(ALLOWED, key=len, reverse=True):
        if mod == prefix or mod.startswith(prefix + "."):
            return prefix
    return None


def _top_violations(mod: str, names: list[str]) -> list[str]:
    """The imports of top-layer module ``mod`` that TOP_FORBIDDEN refuses (its own module and TOP_SHARED pass)."""
    bad = []
    for prefix, forbidden in TOP_FORBIDDEN.items():
        if mod != prefix and not mod.startswith(prefix + "."):
            continue
        for name in names:
            if name == mod or any(name == s or name.startswith(s + ".") for s in TOP_SHARED):
                continue
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(name)
    return bad


def _files() -> list[Path]:
    return sorted(p for pkg in OURS for p in (ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_one_way(path: Path) -> None:
    mod = _module_name(path)
    layer = _layer(mod)
    if layer is None:  # top layer (cli, commands, demo): anything below it, see TOP_FORBIDDEN
        bad = _top_violations(mod, _imports(path))
        assert not bad, f"{mod} (top layer) imports {bad} (see TOP_FORBIDDEN and docs/internals.md)"
        return
    allowed = (layer, *ALLOWED[layer], *SHARED_LEAVES)
    bad = [
        name
        for name in _imports(path)
        if not any(name == a or name.startswith(a + ".") for a in allowed)
        and not (name == "wsi_ncmi" and layer != "preprocessing")  # `from wsi_ncmi import __version__`
    ]
    assert not bad, f"{mod} ({layer}) imports {bad}; allowed: {allowed} (see docs/internals.md)"


def test_checker_catches_a_violation(tmp_path: Path) -> None:
    # the probe lives in a copy of the package layout under tmp_path: nothing is written into the package
    src = "from wsi_ncmi.training import x\nimport wsi_ncmi.models.abmil\nfrom . import simplex\n"
    f = tmp_path / "wsi_ncmi" / "ncmi" / "_tmp_probe_violation.py"
    f.parent.mkdir(parents=True)
    f.write_text(src)
    names = _imports(f, root=tmp_path)
    assert names == ["wsi_ncmi.training", "wsi_ncmi.models.abmil", "wsi_ncmi.ncmi.simplex"]
    assert _module_name(f, root=tmp_path) == "wsi_ncmi.ncmi._tmp_probe_violation"
    assert _layer("wsi_ncmi.ncmi._tmp_probe_violation") == "wsi_ncmi.ncmi"


def test_top_layer_checker_catches_a_violation() -> None:
    assert _top_violations("wsi_ncmi.demo.pipeline", ["wsi_ncmi.commands.evaluate_cli"]) == [
        "wsi_ncmi.commands.evaluate_cli"
    ]
    assert _top_violations("wsi_ncmi.demo.pipeline", ["wsi_ncmi.evaluation.run", "wsi_ncmi.demo.cohort"]) == []
    assert _top_violations("wsi_ncmi.commands.demo_cli", ["wsi_ncmi.commands.train_cli"]) == [
        "wsi_ncmi.commands.train_cli"
    ]
    assert _top_violations("wsi_ncmi.commands.demo_cli", ["wsi_ncmi.commands.errors", "wsi_ncmi.demo"]) == []
    assert _top_violations("wsi_ncmi.cli", ["wsi_ncmi.commands.train_cli"]) == []  # the command table
