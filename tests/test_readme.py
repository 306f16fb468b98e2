"""README.md: every `idefics` example in its shell blocks runs, as written, on the tiny model.

Each example line is run by bash in a folder holding the files the README names (the bundled samples, a scan,
a folder of scans). `idefics` there is a small wrapper that adds `--model TINY` (and, for the commands that
generate, a small `--max-new-tokens` on the CPU) in front of the example's own options, so an example that
names its own `--model` keeps it. Only what cannot run here is left out, each with its reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import make_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_HERE = {  # the examples that cannot run on this machine, and why
    "pip install": "installs packages",
    "idefics pull": "downloads from the hub",
    **{f"-m {org}/": "loads a model from the hub (tests/test_families.py runs the tiny Idefics3 and SmolDocling)"
       for org in ("HuggingFaceM4", "HuggingFaceTB", "ds4sd")},
    "--install-completion": "edits the user's shell start-up files",
    "ray start": "starts a Ray cluster",
    "--engine ray": "needs a Ray cluster (tests/test_ray.py runs the Ray engine)",
    "SLURM_ARRAY_TASK_ID": "needs a Slurm job array",
    "invoice_number": "the random stand-in model never ends a free-text field (exit 5, schema_truncated): "
                      "tests/test_schema.py runs --schema",
    "invoice.schema.json": "the random stand-in model never ends a free-text field (exit 5, schema_truncated): "
                           "tests/test_schema.py runs --schema",
}


def readme_examples() -> list[str]:
    """The command lines of README.md's bash blocks that mention idefics (continued lines joined)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    lines = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#") and re.search(r"\bidefics\b", line):
                lines.append(line)
    return lines


def runnable(line: str) -> str:
    """The part of an example that runs here: setup steps that install packages are dropped."""
    steps = [s for s in line.split(" && ") if not s.startswith("pip install")]
    return " && ".join(steps)


def why_not(line: str) -> str | None:
    step = runnable(line)
    if "python -m pytest" in step:
        return "runs the whole test suite"
    return next((why for marker, why in NOT_HERE.items() if marker in step), None)


EXAMPLES = readme_examples()


def test_readme_has_examples_and_most_run_here():
    assert len(EXAMPLES) >= 10
    assert sum(why_not(line) is None for line in EXAMPLES) >= 8


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model):
    """A folder with what the examples name, and a bin/ whose `idefics` runs this checkout on the tiny model."""
    root = tmp_path_factory.mktemp("readme")
    shutil.copytree(os.path.join(ROOT, "samples"), root / "samples")
    for name in ("report.pdf", "receipt.jpg", "invoice.pdf"):
        shutil.copy(root / "samples" / name, root / name)
    make_image(seed=7).save(root / "scan.png")
    (root / "scans").mkdir()
    make_image(seed=8).save(root / "scans" / "page-1.png")
    shutil.copy(root / "samples" / "invoice.pdf", root / "scans" / "invoice.pdf")
    (root / "scans" / "notes.txt").write_text("not a document: skipped\n")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "idefics"
    wrapper.write_text(f"""#!/bin/sh
command="$1"; shift
case "$command" in
  ask|transcribe|chat) exec "{sys.executable}" -m idefics_cli "$command" --model "{tiny_model}" --device cpu \\
                            --max-new-tokens 8 "$@" ;;
  crops|doctor|quantize) exec "{sys.executable}" -m idefics_cli "$command" --model "{tiny_model}" "$@" ;;
  *) exec "{sys.executable}" -m idefics_cli "$command" "$@" ;;
esac
""")
    wrapper.chmod(0o755)
    return root


@pytest.mark.parametrize("line", EXAMPLES, ids=[f"{k}:{line[:60]}" for k, line in enumerate(EXAMPLES)])
def test_readme_example_runs(line, workdir, tmp_path):
    reason = why_not(line)
    if reason:
        pytest.skip(reason)
    command = runnable(line).replace("/tmp/idefics-tiny", str(tmp_path / "idefics-tiny"))
    env = {**os.environ, "PATH": f"{workdir / 'bin'}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}"
                                 f"{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])), "HF_HUB_OFFLINE": "1"}
    env.pop("IDEFICS_MODEL", None)
    res = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=workdir, env=env, capture_output=True,
                         stdin=subprocess.DEVNULL, timeout=600)
    assert res.returncode == 0, (command, res.stderr.decode(errors="replace")[-2000:])
    assert "Traceback" not in res.stderr.decode(errors="replace")


def readme_python() -> str:
    """The README's "Python" section: its one python block, as written."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        section = f.read().split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_readme_python_runs_on_the_tiny_model(workdir, tiny_model, tmp_path):
    """The Python section, run as written; only `load`'s model is the tiny one (on the CPU, 8 new tokens),
    as the shell examples' wrapper does for `--model`."""
    code, loads = re.subn(r'idefics_cli\.load\("[^"]*"\)',
                          f'idefics_cli.load({tiny_model!r}, device="cpu", max_new_tokens=8)', readme_python())
    assert loads == 1, "the README's example loads the model once"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1"}
    run_dir = tmp_path / "python"  # a copy: the shell examples may have transcribed scans/ already (resume)
    shutil.copytree(workdir, run_dir, ignore=shutil.ignore_patterns("transcripts"))
    res = subprocess.run([sys.executable, "-c", code], cwd=run_dir, env=env, capture_output=True, timeout=600)
    stderr = res.stderr.decode(errors="replace")
    assert res.returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
    lines = res.stdout.decode().splitlines(keepends=True)
    k = max(i for i, line in enumerate(lines) if line.startswith('{"schema"'))  # the answer's JSON line
    out, transcribed = "".join(lines[:k + 1]), "".join(lines[k:])
    record = json.loads(out.splitlines()[-1])
    assert out.startswith(record["answer"] + "\n")  # what streamed is the whole answer
    assert out.splitlines()[-2] == f"{record['finish_reason']} {record['usage']}"
    # engine.transcribe: one line per page of scans/, as its records file says, written under transcripts/
    lines = transcribed.splitlines()[1:]
    with open(os.path.join(run_dir, "transcripts", "records.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert lines and lines == [f"{r['path']} {r['page']} {r['status']}" for r in records]
    assert record["sources"] == [{"path": "report.pdf", "pages": [2, 3]}] and record["usage"]["completion_tokens"]
    assert record["model"]["quantization"] == "none"  # --quant auto: the tiny model is far below 4B parameters
    assert record["model"]["quantization_reason"].startswith("auto: ")
