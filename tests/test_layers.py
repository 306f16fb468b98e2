"""The package's layers: a lower part never imports a higher one (lazy imports included), and no circles."""

from __future__ import annotations

import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "idefics_cli")
# what each part may import from the package (besides itself); the top-level modules below are shared by all
SHARED = {"errors", "interface", "hub", "extras", "structured", "finite", "process", "ahead"}
ALLOWED = {
    "documents": set(),
    "runtime": set(),
    "remote": {"documents"},
    "tasks": {"documents", "runtime", "output"},
    "serve": {"documents", "runtime", "tasks", "output"},
    "mcp": {"documents"},  # the library's Model is handed in by the command (cli/tools.py)
    "dev": {"runtime", "tasks"},
}


def _imports(path: str, module: str) -> set[str]:
    """The package modules `path` imports, as dotted names under idefics_cli (every import, lazy ones too)."""
    tree = ast.parse(open(path).read())
    here = module.split(".")[:-1] if not path.endswith("__init__.py") else module.split(".")
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("idefics_cli"):
                out.add(name)
                out.update(f"{name}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("idefics_cli"))
    return out


def _modules():
    for folder, _, files in os.walk(PKG):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                yield path, rel.removesuffix(".__init__")


def test_each_part_imports_only_the_parts_below_it():
    parts = {p for p in os.listdir(PKG) if os.path.isdir(os.path.join(PKG, p)) and not p.startswith("__")}
    assert set(ALLOWED) | {"cli", "data"} >= parts, parts
    wrong = []
    for path, module in _modules():
        part = module.split(".")[1] if module.count(".") else ""
        if part not in ALLOWED:
            continue
        for name in _imports(path, module):
            bits = name.split(".")
            target = bits[1] if len(bits) > 1 else ""
            if target and target != part and target not in SHARED and target not in ALLOWED[part]:
                wrong.append(f"{module} imports {name}")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_shared_modules_import_no_part():
    wrong = []
    for path, module in _modules():
        if module.count(".") == 1 and module.split(".")[1] in SHARED:
            for name in _imports(path, module):
                bits = name.split(".")
                if len(bits) > 1 and bits[1] not in SHARED and bits[1] != "documents":
                    wrong.append(f"{module} imports {name}")
    assert not wrong, "\n".join(sorted(wrong))
