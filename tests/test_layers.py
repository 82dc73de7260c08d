"""The layering docs/ARCHITECTURE.md states, checked on the source: each module of `dart` imports
only from its own layer or the layers below it (read from the import statements, so a lazy import
inside a function counts too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "dart"

# Lowest first. A module may import from its own layer and every layer before it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("dart.results",)),
    ("core", ("dart.core",)),
    ("assets", ("dart.assets",)),
    ("runtime", ("dart.runtime",)),
    # options: typed option dataclasses -> flags and YAML keys, for every command line
    ("evaluation", ("dart.evaluate", "dart.lmeval", "dart.options")),
    (
        "shells",
        (
            "dart.options",
            "dart.experiment",
            "dart.study",
            "dart.lightning",
            "dart.report",
            "dart.cli",
            "dart.llamacpp",
            "dart.__main__",
        ),
    ),
]
# Layers that sit side by side: neither may import the other.
INDEPENDENT = {frozenset({"core", "assets"})}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer_of(module: str) -> int | None:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def _imports(path: Path) -> list[str]:
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import module` imports pkg.module
            found += [f"{target}.{a.name}" for a in node.names] if not node.module else [target]
    return [name for name in found if name == "dart" or name.startswith("dart.")]


SOURCES = sorted(p for p in ROOT.rglob("*.py") if p != ROOT / "__init__.py")


def test_every_module_has_a_layer():
    unplaced = [_module_name(p) for p in SOURCES if _layer_of(_module_name(p)) is None]
    assert not unplaced, f"modules in no layer of tests/test_layers.py: {unplaced}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: _module_name(p))
def test_imports_go_down_the_layers(path):
    own = _layer_of(_module_name(path))
    bad = []
    for target in _imports(path):
        layer = _layer_of(target)
        if layer is None:
            continue  # `dart` itself (the lazy public names) or a non-module name
        side_by_side = frozenset({LAYERS[own][0], LAYERS[layer][0]}) in INDEPENDENT
        if layer > own or side_by_side:
            bad.append(f"{target} ({LAYERS[layer][0]})")
    assert not bad, f"{_module_name(path)} ({LAYERS[own][0]}) imports a higher layer: {bad}"


def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch):
    # The check itself must be able to fail: a core module importing the CLI is flagged.
    fake = ROOT / "core" / "config.py"
    monkeypatch.setattr(Path, "read_text", lambda self: "from ..cli import main\n")
    targets = _imports(fake)
    assert targets == ["dart.cli"]
    assert _layer_of(targets[0]) > _layer_of(_module_name(fake))
