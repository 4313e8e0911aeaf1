"""Imports flow one way (docs/internals.md): parse every module and check what it imports of ours."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package prefix -> prefixes of ours it may import (its own package is always allowed)
ALLOWED: dict[str, tuple[str, ...]] = {
    "wsi_ncmi.ncmi": (),
    "wsi_ncmi.losses": ("wsi_ncmi.ncmi",),
    "wsi_ncmi.data": (),
    "wsi_ncmi.metrics": (),
    "wsi_ncmi.models": (),
    "wsi_ncmi.training": ("wsi_ncmi.ncmi", "wsi_ncmi.losses", "wsi_ncmi.models", "wsi_ncmi.data", "wsi_ncmi.metrics"),
    "wsi_ncmi.evaluation": ("wsi_ncmi.ncmi", "wsi_ncmi.data", "wsi_ncmi.models", "wsi_ncmi.metrics"),
    # the natural-image track: nothing below imports it, only the top layer (cli, commands, demo)
    "wsi_ncmi.natural": ("wsi_ncmi.ncmi", "wsi_ncmi.losses", "wsi_ncmi.data", "wsi_ncmi.metrics", "wsi_ncmi.training"),
    "preprocessing": ("wsi_ncmi.data.bags", "wsi_ncmi.data.atomic", "wsi_ncmi.data.weights"),
}
OURS = ("wsi_ncmi", "preprocessing")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    mod = _module_name(path)
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


def _files() -> list[Path]:
    return sorted(p for pkg in OURS for p in (ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_one_way(path: Path) -> None:
    mod = _module_name(path)
    layer = _layer(mod)
    if layer is None:  # top layer (cli, commands, demo) may import anything
        return
    allowed = (layer, *ALLOWED[layer])
    bad = [
        name
        for name in _imports(path)
        if not any(name == a or name.startswith(a + ".") for a in allowed)
        and not (name == "wsi_ncmi" and layer != "preprocessing")  # `from wsi_ncmi import __version__`
    ]
    assert not bad, f"{mod} ({layer}) imports {bad}; allowed: {allowed} (see docs/internals.md)"


def test_checker_catches_a_violation(tmp_path: Path) -> None:
    src = "from wsi_ncmi.training import x\nimport wsi_ncmi.models.abmil\n"
    f = ROOT / "wsi_ncmi" / "ncmi" / "_tmp_probe_violation.py"
    f.write_text(src)
    try:
        names = _imports(f)
    finally:
        f.unlink()
    assert names == ["wsi_ncmi.training", "wsi_ncmi.models.abmil"]
    assert _layer("wsi_ncmi.ncmi._tmp_probe_violation") == "wsi_ncmi.ncmi"
