"""Optional features and the packages they need: which are installed, found without importing them.

`EXTRAS` lists the optional features, the distributions and modules each needs, and what it enables. `report()`:
per feature `{"installed", "packages": {dist: version or None}, "enables", "install"}`, from package metadata and
`find_spec` only (nothing optional is imported); `install` names this package's extra when it declares one.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from importlib.util import find_spec


@dataclass(frozen=True)
class Extra:
    name: str
    packages: tuple[str, ...]  # distributions, as pip names them
    modules: tuple[str, ...]  # top-level modules they must provide
    enables: str


EXTRAS = (
    Extra("ray", ("ray", "pyarrow", "pandas"), ("ray", "pyarrow", "pandas"),
          "`transcribe --engine ray`: the same pipeline on Ray Data, across GPUs and machines"),
    Extra("serve", ("fastapi", "uvicorn", "prometheus-client"), ("fastapi", "uvicorn", "prometheus_client"),
          "`idefics serve`: the model behind an OpenAI-compatible HTTP API"),
    Extra("mcp", ("mcp",), ("mcp",), "`idefics mcp`: documents as tools for agent hosts (Model Context Protocol)"),
    Extra("docling", ("docling-core",), ("docling_core",),
          "Markdown from the DocTags of SmolDocling and granite-docling (`transcribe` records' \"markdown\")"),
)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _importable(module: str) -> bool:
    try:
        return find_spec(module) is not None  # a top-level name: finds the package, runs none of its code
    except (ImportError, ValueError):
        return False


def report() -> dict[str, dict]:
    try:
        declared = set(metadata.metadata("idefics-cli").get_all("Provides-Extra") or [])
    except metadata.PackageNotFoundError:  # run from a source tree
        declared = set()
    found = {}
    for extra in EXTRAS:
        packages = {dist: _version(dist) for dist in extra.packages}
        installed = all(packages.values()) and all(_importable(m) for m in extra.modules)
        install = (f"pip install 'idefics-cli[{extra.name}]'" if extra.name in declared
                   else "pip install " + " ".join(extra.packages))
        found[extra.name] = {"installed": installed, "packages": packages, "enables": extra.enables,
                             "install": install}
    return found
