"""README.md: every `idefics` example in its shell blocks runs, as written, on the tiny model.

Each example line is run by bash in a folder holding the files the README names (the bundled samples, a scan,
a folder of scans). `idefics` there is a small wrapper that adds `--model TINY` (and, for the commands that
generate, a small `--max-new-tokens` on the CPU) in front of the example's own options, so an example that
names its own `--model` keeps it. Only what cannot run here is left out, each with its reason. The runner is
tests/markdown_examples.py, shared with tests/test_docs.py."""

from __future__ import annotations

import json
import os
import re

import pytest
from markdown_examples import ROOT, make_workdir, run_line, run_python, shell_lines, tiny_load, why_not

README = os.path.join(ROOT, "README.md")
EXAMPLES = shell_lines(README)


def test_readme_has_examples_and_most_run_here():
    assert len(EXAMPLES) >= 10
    assert sum(why_not(line) is None for line in EXAMPLES) >= 8


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model):
    """A folder with what the examples name, and a bin/ whose `idefics` runs this checkout on the tiny model."""
    return make_workdir(tmp_path_factory.mktemp("readme"), tiny_model)


@pytest.mark.parametrize("line", EXAMPLES, ids=[f"{k}:{line[:60]}" for k, line in enumerate(EXAMPLES)])
def test_readme_example_runs(line, workdir, tmp_path):
    reason = why_not(line)
    if reason:
        pytest.skip(reason)
    run_line(line, workdir, {"/tmp/idefics-tiny": str(tmp_path / "idefics-tiny")})


def readme_python() -> str:
    """The README's "Python" section: its one python block, as written."""
    with open(README, encoding="utf-8") as f:
        section = f.read().split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_readme_python_runs_on_the_tiny_model(workdir, tiny_model, tmp_path):
    """The Python section, run as written; only `load`'s model is the tiny one (on the CPU, 8 new tokens),
    as the shell examples' wrapper does for `--model`."""
    code, loads = tiny_load(readme_python(), tiny_model)
    assert loads == 1, "the README's example loads the model once"
    run_dir = tmp_path / "python"
    res = run_python(code, workdir, run_dir)
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
