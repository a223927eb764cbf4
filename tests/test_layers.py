"""The layers of DESIGN.md hold: no module imports from a layer above its own."""

import ast
from pathlib import Path

import vlkit

ROOT = Path(vlkit.__file__).parent
RANK = {
    **dict.fromkeys(["config", "errors", "files", "precision", "boxes", "nn", "losses"], 0),
    **dict.fromkeys(["vision", "text", "lm"], 1),
    "connectors": 2,
    **dict.fromkeys(["models", "data"], 3),
    **dict.fromkeys(["train", "eval", "interop", "index", "report", "loading"], 4),
}
"""Rank of each top-level module or folder (``loading`` is interop plus the model classes, so trainers
and the index may load a folder); anything unlisted (cli, demo, serve, the
commands' modules) is the top layer, free to import anything."""
TOP = 5


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vlkit."):
            yield node.module
        elif isinstance(node, ast.ImportFrom) and node.module == "vlkit":
            yield from (f"vlkit.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("vlkit."))


def upward_imports() -> list[str]:
    found = []
    for path in ROOT.rglob("*.py"):
        part = path.relative_to(ROOT).parts[0].removesuffix(".py")
        for module in _imports(path):
            target = module.split(".")[1]
            if target != part and RANK.get(target, TOP) > RANK.get(part, TOP):
                found.append(f"{path.relative_to(ROOT)} imports {module}")
    return sorted(found)


def test_no_module_imports_from_a_layer_above_its_own():
    assert upward_imports() == []
