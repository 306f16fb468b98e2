"""extras.py: optional features found from package metadata, without importing them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

EXTRAS_PROBE = """
import json, sys
from idefics_cli import extras
print(json.dumps({"report": extras.report(), "imported": sorted(
    m for m in ("ray", "pyarrow", "pandas", "fastapi", "uvicorn", "prometheus_client", "mcp") if m in sys.modules)}))
"""


def _fake_distribution(site, name: str, version: str, module: bool = True) -> None:
    """A real installed distribution as importlib sees it, whose module refuses to be imported."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if module:
        (site / name).mkdir()
        (site / name / "__init__.py").write_text(f"raise RuntimeError('{name} was imported')\n")


def test_extras_are_found_from_metadata_without_importing_them(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _fake_distribution(site, "fastapi", "0.120.0")
    _fake_distribution(site, "uvicorn", "0.38.0")
    _fake_distribution(site, "prometheus_client", "0.26.0")
    _fake_distribution(site, "pyarrow", "21.0.0", module=False)  # metadata left behind, module gone: broken
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = tmp_path / "code"  # the package alone: no idefics-cli metadata (an .egg-info in a checkout) beside it
    shutil.copytree(os.path.join(root, "idefics_cli"), code / "idefics_cli")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(code)])}
    # -S: no site-packages, so the child sees only the fake distributions, whatever this environment has installed
    out = subprocess.run([sys.executable, "-S", "-c", EXTRAS_PROBE], env=env, capture_output=True, text=True,
                         cwd=tmp_path, check=True)  # not the checkout's folder, where an .egg-info may lie
    found = json.loads(out.stdout)
    assert found["imported"] == []  # nothing optional was imported, not even the two that would raise
    assert set(found["report"]) == {"serve", "ray", "mcp", "docling"}  # --schema is no extra: llguidance is core
    assert found["report"]["docling"]["installed"] is False
    serve, ray, mcp = (found["report"][k] for k in ("serve", "ray", "mcp"))
    assert serve["installed"] is True and serve["packages"] == {"fastapi": "0.120.0", "uvicorn": "0.38.0",
                                                                "prometheus-client": "0.26.0"}
    assert mcp == {"installed": False, "packages": {"mcp": None}, "install": "pip install mcp",
                   "enables": mcp["enables"]} and "idefics mcp" in mcp["enables"]
    assert ray["packages"] == {"ray": None, "pyarrow": "21.0.0", "pandas": None} and ray["installed"] is False
    assert ray["install"] == "pip install ray pyarrow pandas" and "--engine ray" in ray["enables"]
