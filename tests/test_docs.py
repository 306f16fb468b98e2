"""docs/: every page's examples run as written, every command and flag of the code is documented, and no page
names a flag the code does not have; docs/picture.py draws the README's picture from a real run.

The examples run as README.md's do (tests/markdown_examples.py), with one difference that keeps them cheap: one
`idefics serve` of the tiny model (float32, CPU, no split) is started for the module, and the `ask`, `chat` and
`transcribe` lines that name no `--model` of their own are its clients (`--server`: the commands' own client,
whose output is a local run's, tests/test_client.py), so they import no torch; so are the Python examples (`load`
becomes `connect`). Lines the README also holds are run by tests/test_readme.py only, a line two pages hold runs
once, and ```sh blocks (a server left running, an agent host's command) are shown, not run."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from markdown_examples import ROOT, blocks, make_workdir, run_line, run_python, shell_lines, why_not
from test_serve import Server

PAGES = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
README_LINES = set(shell_lines(os.path.join(ROOT, "README.md")))


def docs_examples() -> list[tuple[str, str]]:
    """(page, line) for every shell example of docs/, each line once, in page order."""
    seen, out = set(), []
    for page in PAGES:
        for line in shell_lines(page, only_idefics=False):
            if line not in seen:
                seen.add(line)
                out.append((os.path.basename(page), line))
    return out


EXAMPLES = docs_examples()


COVERED = {  # lines left out to keep the module cheap, and where what they show is tested instead
    "idefics crops samples/invoice.pdf": "tests/test_crops.py runs crops with the default sheet name",
    "idefics crops scan.png --no-split --dir crops/": "tests/test_crops.py runs --dir and --no-split",
    "idefics doctor --device cpu --quant none --no-split --json | jq .estimate.total_bytes":
        "tests/test_doctor.py runs doctor --json (README.md's `idefics doctor --device cpu`: tests/test_readme.py)",
    'idefics quantize /tmp/idefics-nf4 --device cpu --dtype float32 && idefics ask --model /tmp/idefics-nf4 '
    '--device cpu --offline samples/invoice.pdf "What is the total?"':
        "tests/test_quantize.py quantizes the tiny model and asks the copy (answers as --quant 4bit does)",
}


def skip_reason(line: str) -> str | None:
    if line in README_LINES:
        return "README.md holds it: tests/test_readme.py runs it"
    if "invoices.jsonl" in line:
        return "reads what the `transcribe --schema invoice.schema.json` example writes (not run here, see it)"
    return COVERED.get(line) or why_not(line)


@pytest.fixture(scope="module")
def server(tiny_model):
    srv = Server(tiny_model).wait_ready()
    try:
        yield srv
    finally:
        assert srv.stop() == 0, "\n".join(srv.lines)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model, server):
    return make_workdir(tmp_path_factory.mktemp("docs"), tiny_model, server.url)


def subs(server, tmp_path) -> dict[str, str]:
    return {"http://127.0.0.1:8000": server.url, "localhost:8000": server.url.removeprefix("http://"),
            "/tmp/idefics-": str(tmp_path / "idefics-")}


def test_every_page_has_examples_and_most_run():
    pages = {page for page, _ in EXAMPLES}
    for command in ("ask", "transcribe", "chat", "crops", "doctor", "pull", "quantize", "serve", "schema", "scaling"):
        assert f"{command}.md" in pages, f"docs/{command}.md has no bash example"
    assert sum(skip_reason(line) is None for _, line in EXAMPLES) >= 12


@pytest.mark.parametrize("page,line", EXAMPLES, ids=[f"{p}:{line[:50]}" for p, line in EXAMPLES])
def test_docs_example_runs(page, line, workdir, server, tmp_path):
    reason = skip_reason(line)
    if reason:
        pytest.skip(reason)
    run_line(line, workdir, subs(server, tmp_path))


def test_docs_python_examples_run(workdir, server, tmp_path):
    """Every python block of docs/, as written, on the module's server: `idefics_cli.load("...")` becomes
    `idefics_cli.connect(URL)`, whose `Model` is used the same way (README.md's example loads the model)."""
    ran = 0
    for page in PAGES:
        for k, code in enumerate(blocks(page, "python")):
            code = re.sub(r'idefics_cli\.load\("[^"]*"\)', f"idefics_cli.connect({server.url!r}, max_new_tokens=8)",
                          code)
            for old, new in subs(server, tmp_path).items():
                code = code.replace(old, new)
            res = run_python(code, workdir, tmp_path / f"{os.path.basename(page)}-{k}")
            assert res.stdout.strip(), (page, k)
            ran += 1
    assert ran >= 3


# --- the commands and flags of the code against the pages --------------------------------------------------------

FOREIGN = {"--index-url", "--head", "--address", "--port", "--array", "--gres", "--cpus-per-task",  # pip, ray, Slurm
           "--dist"}  # pytest-xdist
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def commands() -> dict[str, list[str]]:
    """Each command of the typer app and its long flags (both halves of --x/--no-x)."""
    import typer.main

    from idefics_cli.cli import app

    group = typer.main.get_command(app)
    out = {"": [o for p in group.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]}
    for name, command in group.commands.items():
        out[name] = [o for p in command.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))
                     if o.startswith("--")] + ["--help"]
    return out


def script_flags() -> set[str]:
    """The flags of the scripts the pages also show: bench/*.py, `python -m idefics_cli.dev.tiny`, docs/picture.py."""
    found = set()
    for path in [*glob.glob(os.path.join(ROOT, "bench", "*.py")), *glob.glob(os.path.join(ROOT, "idefics_cli", "dev",
                                                                                          "*.py")),
                 os.path.join(ROOT, "docs", "picture.py")]:
        with open(path, encoding="utf-8") as f:
            found.update(re.findall(r"[\"'](--[a-z][a-z0-9-]*)[\"']", f.read()))
    return found


def page_text(name: str) -> str:
    with open(os.path.join(ROOT, "docs", name), encoding="utf-8") as f:
        return f.read()


def mentions(text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def test_every_command_and_flag_has_a_page():
    models = page_text("models.md")
    missing = []
    for name, flags in commands().items():
        if not name:
            continue
        assert os.path.exists(os.path.join(ROOT, "docs", f"{name}.md")), f"no docs/{name}.md"
        page = page_text(f"{name}.md")
        missing += [f"{name} {flag}" for flag in flags
                    if flag != "--help" and not mentions(page, flag) and not mentions(models, flag)]
    assert not missing, f"flags in no page (docs/COMMAND.md or docs/models.md): {missing}"


def test_no_page_names_a_flag_the_code_does_not_have():
    known = commands()
    every = {flag for flags in known.values() for flag in flags} | script_flags() | FOREIGN
    wrong = []
    for path in [*PAGES, os.path.join(ROOT, "README.md")]:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        name = os.path.relpath(path, ROOT)
        wrong += [f"{name}: {flag}" for flag in sorted(set(FLAG.findall(text)) - every)]
        # `idefics COMMAND ... --flag`: the flag is that command's
        for command, rest in re.findall(r"\bidefics (\w+)((?:[^`|;&\n]|&(?!&))*)", text):
            if command in known:
                wrong += [f"{name}: idefics {command} {flag}" for flag in FLAG.findall(rest)
                          if flag not in known[command] and flag not in known[""]]
    assert not wrong, f"flags the code does not have: {wrong}"


def test_index_links_every_page():
    index = page_text("README.md")
    for page in PAGES:
        if os.path.basename(page) != "README.md":
            assert f"]({os.path.basename(page)})" in index, f"docs/README.md does not link {os.path.basename(page)}"


# --- the picture --------------------------------------------------------------------------------------------------

def test_the_picture_is_drawn_from_a_real_run(tiny_model, tmp_path):
    """docs/picture.py into tmp_path (never into the repo): an SVG whose animated text is the answer it streamed."""
    out = tmp_path / "ask.svg"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "picture.py"), "--model", tiny_model, "--out",
                          str(out)], env=env, capture_output=True, timeout=600)
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-2000:]
    answer = res.stdout.decode().removesuffix("\n")
    svg = out.read_text(encoding="utf-8")
    texts = [el.text or "" for el in ET.fromstring(svg).iter("{http://www.w3.org/2000/svg}text")]
    drawn = "".join(texts).replace("\xa0", " ")
    assert "idefics ask samples/invoice.pdf" in drawn and answer.strip()
    assert re.sub(r"\s", "", answer) in re.sub(r"\s", "", drawn)  # the whole answer, wrapped into lines
    assert svg.count("animation: idefics-show") >= 8  # its pieces appear in turn
    with open(os.path.join(ROOT, "docs", "ask.svg"), encoding="utf-8") as f:
        committed = f.read()
    assert "idefics-show" in committed and "samples/invoice.pdf" in committed  # the README's copy: the script's


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_pages_lead_somewhere():
    broken = []
    for path in [*PAGES, os.path.join(ROOT, "README.md")]:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            file, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            if not os.path.exists(dest):
                broken.append(f"{os.path.relpath(path, ROOT)}: {target}")
            elif anchor and dest.endswith(".md"):
                with open(dest, encoding="utf-8") as f:
                    headings = re.findall(r"(?m)^#+ (.+)$", re.sub(r"```.*?```", "", f.read(), flags=re.S))
                if anchor not in {slug(h) for h in headings}:
                    broken.append(f"{os.path.relpath(path, ROOT)}: {target}")
    assert not broken, broken
