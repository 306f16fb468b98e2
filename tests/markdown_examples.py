"""Run a Markdown page's examples as written, on the tiny model: the one runner of test_readme.py and test_docs.py.

A page's shell examples are the lines of its ```bash blocks (continued lines joined; `#` lines are comments).
Each runs in bash, `-o pipefail`, in a work folder holding the files the examples name (the bundled samples,
a scan, a folder of scans), with a `bin/idefics` first on PATH that runs this checkout: it adds `--model TINY`
(and for the commands that generate `--device cpu --max-new-tokens 8`) in front of the example's own options, or,
given a server, `--server URL` for ask, chat and transcribe lines that name no `--model` of their own. What cannot
run here is skipped, each with its reason (`NOT_HERE`). Python blocks run with `python -c` in a copy of the
work folder, `idefics_cli.load("...")` loading the tiny model instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from conftest import make_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_HERE = {  # the examples that cannot run on this machine, and why
    "pip install": "installs packages",
    "idefics pull": "downloads from the hub",
    "idefics2-8b-chatty": "downloads from the hub",
    **{f"-m {org}/": "loads a model from the hub (tests/test_families.py runs the tiny Idefics3 and SmolDocling)"
       for org in ("HuggingFaceM4", "HuggingFaceTB", "ds4sd", "ibm-granite")},
    "--install-completion": "edits the user's shell start-up files",
    "ray start": "starts a Ray cluster",
    "--engine ray": "needs a Ray cluster (tests/test_ray.py runs the Ray engine)",
    "SLURM_ARRAY_TASK_ID": "needs a Slurm job array",
    "invoice_number": "the random stand-in model never ends a free-text field (exit 5, schema_truncated): "
                      "tests/test_schema.py runs --schema",
    "invoice.schema.json": "the random stand-in model never ends a free-text field (exit 5, schema_truncated): "
                           "tests/test_schema.py runs --schema",
}
LOCAL = ("crops", "doctor", "quantize")  # commands that load the model (or its processor) here, never a server's
GENERATE = ("ask", "transcribe", "chat")


def blocks(path: str, lang: str) -> list[str]:
    """The ```lang blocks of a Markdown file, in order."""
    with open(path, encoding="utf-8") as f:
        return re.findall(rf"```{lang}\n(.*?)```", f.read(), re.S)


def shell_lines(path: str, only_idefics: bool = True) -> list[str]:
    """The command lines of a page's bash blocks (continued lines joined); with `only_idefics` those naming it."""
    lines = []
    for block in blocks(path, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#") and (not only_idefics or re.search(r"\bidefics\b", line)):
                lines.append(line)
    return lines


def runnable(line: str) -> str:
    """The part of an example that runs here: setup steps that install packages are dropped."""
    return " && ".join(s for s in line.split(" && ") if not s.startswith("pip install"))


def why_not(line: str) -> str | None:
    step = runnable(line)
    if not step:
        return "installs packages"
    if "python -m pytest" in step:
        return "runs the whole test suite"
    return next((why for marker, why in NOT_HERE.items() if marker in step), None)


def make_workdir(root, tiny_model: str, server: str | None = None):
    """A folder with what the examples name, and a bin/ whose `idefics` runs this checkout on the tiny model
    (or, with `server`, on that running server for ask, chat and transcribe)."""
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
    local = (f'exec "{sys.executable}" -m idefics_cli "$command" --model "{tiny_model}" --device cpu '
             '--max-new-tokens 8 "$@"')
    remote = f'exec "{sys.executable}" -m idefics_cli "$command" --server "{server}" --max-new-tokens 8 "$@"'
    wrapper = bin_dir / "idefics"
    wrapper.write_text(f"""#!/bin/sh
command="$1"; shift
case "$command" in
  {'|'.join(GENERATE)}) case " $* " in
      *" --model "*|*" -m "*) {local} ;;
      *) {remote if server else local} ;;
    esac ;;
  {'|'.join(LOCAL)}) exec "{sys.executable}" -m idefics_cli "$command" --model "{tiny_model}" "$@" ;;
  *) exec "{sys.executable}" -m idefics_cli "$command" "$@" ;;
esac
""")
    wrapper.chmod(0o755)
    return root


def environment(workdir) -> dict:
    env = {**os.environ, "PATH": f"{workdir / 'bin'}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}"
                                 f"{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])), "HF_HUB_OFFLINE": "1"}
    for name in ("IDEFICS_MODEL", "IDEFICS_SERVER", "IDEFICS_API_KEY"):
        env.pop(name, None)
    return env


def run_line(line: str, workdir, subs: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run one example line in `workdir` (`subs`: text replaced first, e.g. /tmp paths); it must exit 0 cleanly."""
    command = runnable(line)
    for old, new in (subs or {}).items():
        command = command.replace(old, new)
    res = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=workdir, env=environment(workdir),
                         capture_output=True, stdin=subprocess.DEVNULL, timeout=600)
    stderr = res.stderr.decode(errors="replace")
    assert res.returncode == 0, (command, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-2000:]
    return res


def tiny_load(code: str, tiny_model: str) -> tuple[str, int]:
    """`code` with each `idefics_cli.load("...")` loading the tiny model (CPU, 8 new tokens); and how many."""
    return re.subn(r'idefics_cli\.load\("[^"]*"\)',
                   f'idefics_cli.load({tiny_model!r}, device="cpu", max_new_tokens=8)', code)


def run_python(code: str, workdir, run_dir) -> subprocess.CompletedProcess:
    """Run a Python example in a copy of `workdir` (the shell examples may have written into it already)."""
    shutil.copytree(workdir, run_dir, ignore=shutil.ignore_patterns("transcripts"))
    res = subprocess.run([sys.executable, "-c", code], cwd=run_dir, env=environment(workdir), capture_output=True,
                         timeout=600)
    stderr = res.stderr.decode(errors="replace")
    assert res.returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
    return res
