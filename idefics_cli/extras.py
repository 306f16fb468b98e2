"""Optional features and the packages they need: which are installed, found without importing them.

Contract: `EXTRAS` lists the optional features (Ray Data, the HTTP server, the MCP server, DocTags to Markdown;
`--schema` is core): the distributions each needs, the module each must provide, and what it enables.
`report()` returns, per feature, `{"installed": bool, "packages": {distribution: version or None}, "enables":
str, "install": str}`, from package metadata and `importlib.util.find_spec` only: no optional package is
imported, so `idefics doctor` stays fast and a broken optional install cannot break it.
`install` is `pip install 'idefics-cli[NAME]'` when this package declares that extra, else the plain
`pip install` of the packages.
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


def declared_extras() -> set[str]:
    """The extras this installed idefics-cli declares (empty when it runs from a source tree)."""
    try:
        return set(metadata.metadata("idefics-cli").get_all("Provides-Extra") or [])
    except metadata.PackageNotFoundError:
        return set()


def report() -> dict[str, dict]:
    declared = declared_extras()
    found = {}
    for extra in EXTRAS:
        packages = {dist: _version(dist) for dist in extra.packages}
        installed = all(packages.values()) and all(_importable(m) for m in extra.modules)
        install = (f"pip install 'idefics-cli[{extra.name}]'" if extra.name in declared
                   else "pip install " + " ".join(extra.packages))
        found[extra.name] = {"installed": installed, "packages": packages, "enables": extra.enables,
                             "install": install}
    return found
