"""cli/__init__.py: the app, its commands' help and usage, and its usage errors (cli/options.py's `Group`)."""

import os
import subprocess
import sys

import pytest


def _help(*args: str, columns: int = 80) -> str:
    env = {**os.environ, "COLUMNS": str(columns), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "idefics_cli", *args, "--help"], capture_output=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr.decode()
    return res.stdout.decode()


def test_idefics_help_at_80_columns_gives_every_command_a_whole_sentence():
    from typer.main import get_command

    from idefics_cli.cli import app

    names = list(get_command(app).commands)
    listed = _help().split("\nCommands:\n", 1)[1].splitlines()
    rows = dict(line.split(None, 1) for line in listed if line.startswith("  ") and line.strip())
    assert list(rows) == names  # every command, on one line each, in the app's order
    for name, summary in rows.items():
        assert summary.endswith(".") and not summary.endswith("..."), (name, summary)
        assert len(f"  {name:<10}  {summary}") <= 80, (name, summary)


def test_help_names_no_extra_that_the_core_install_has():
    """`--schema` is in the core install (llguidance, jsonschema): no help text may ask for idefics-cli[schema]."""
    for command in ("ask", "chat", "transcribe"):
        text = _help(command, columns=200)
        assert "--schema SCHEMA" in text and "[schema]" not in text, command


@pytest.mark.parametrize("args, named", [
    (("ask", "a.png", "q", "--max-new-tokens", "0"), "'--max-new-tokens'"),
    (("ask", "a.png", "q", "--dpi", "5"), "'--dpi'"),
    (("ask", "a.png", "q", "--quant", "foo"), "'--quant'"),
    (("crops", "a.png", "--page", "0"), "'--page'"),
    (("ask", "a.png", "q", "--bogus"), "--bogus"),
    (("ask", "a.png", "q", "--max-new-tokens"), "'--max-new-tokens'"),
    (("crops",), "'DOC'"),
    (("--bogus",), "--bogus"),
    (("nosuch",), "'nosuch'"),
])
def test_click_usage_errors_are_one_line_naming_what_was_wrong(cli, args, named):
    """Click's own checks (ranges, choices, unknown options and commands, missing values) print as every error does."""
    result = cli(*args)
    lines = result.stderr.splitlines()
    assert result.exit_code == 2 and result.stdout == "", (result.stdout, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error [usage]: ") and named in lines[0], lines


def test_a_usage_error_points_at_its_commands_help(cli):
    line = cli("ask", "a.png", "q", "--dpi", "5").stderr.strip()
    assert line.startswith("error [usage]: Invalid value for '--dpi': ") and line.endswith("(see idefics ask --help)")
    assert cli("nosuch").stderr.strip().endswith("(see idefics --help)")


def test_the_installed_entry_point_prints_usage_errors_as_one_line_and_help_as_before():
    res = subprocess.run([sys.executable, "-m", "idefics_cli", "ask", "a.png", "q", "--max-new-tokens", "0"],
                         capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    lines = res.stderr.decode().splitlines()
    assert res.returncode == 2 and res.stdout == b"" and len(lines) == 1, lines
    assert lines[0].startswith("error [usage]: Invalid value for '--max-new-tokens': "), lines
    assert _help("ask").startswith("Usage: ") and "--max-new-tokens N" in _help("ask", columns=200)
    bare = subprocess.run([sys.executable, "-m", "idefics_cli"], capture_output=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"})
    assert bare.returncode == 2 and "Usage: " in bare.stderr.decode() and "Commands:" in bare.stderr.decode()


BUSY_TORCH = """
import sys, threading, time
import torch

def busy():  # as a model loading in its daemon thread: in and out of torch's C++ code
    a = torch.randn(400, 400)
    while True:
        torch.linalg.qr(a)

threading.Thread(target=busy, daemon=True).start()
time.sleep(0.5)
from idefics_cli.cli import entry
sys.argv = ["idefics", "ask", "/nonexistent.pdf", "q"]
entry()
"""


def test_a_command_ending_while_a_daemon_thread_is_inside_torch_exits_with_its_status(tmp_path):
    """Ctrl-C or an error while the model still loads in its thread: the command's own status, never SIGABRT
    ("terminate called without an active exception") from the thread unwound as the interpreter finalizes."""
    script = tmp_path / "busy.py"
    script.write_text(BUSY_TORCH)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
            for _ in range(6)]  # without the fix about half of them abort
    ended = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read().decode()) for p in runs]
    assert [(code, out) for code, out, _ in ended] == [(4, b"")] * 6, ended
    assert all(err.startswith("error [not_found]: /nonexistent.pdf") for _, _, err in ended), ended


CTRL_C_AT = {  # Ctrl-C while the command line's modules import, and while its arguments are parsed
    "import": "import builtins\nreal = builtins.__import__\n"
              "builtins.__import__ = lambda name, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()) "
              "if name == 'typer' else real(name, *a, **k)\n",
    "parse": "import idefics_cli.cli as cli\ncli.app = lambda: (_ for _ in ()).throw(KeyboardInterrupt())\n",
}


@pytest.mark.parametrize("when", sorted(CTRL_C_AT))
def test_ctrl_c_as_the_command_line_starts_is_exit_130_without_a_traceback(when):
    code = CTRL_C_AT[when] + "import sys\nsys.argv = ['idefics', '-h']\nfrom idefics_cli.__main__ import main\nmain()\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert (res.returncode, res.stdout, res.stderr) == (130, b"", b"interrupted\n")


SECOND_CTRL_C = ("import atexit, os, signal, time\n"  # a second Ctrl-C (or SIGTERM) as the exit handlers run
                 "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), os.kill(os.getpid(), signal.SIGTERM),"
                 " time.sleep(0.5)))\n")


@pytest.mark.parametrize("how", ["raised", "status"])
def test_a_second_ctrl_c_while_an_interrupted_command_exits_is_no_traceback(how):
    """The first Ctrl-C stops `transcribe` (130); an impatient second one, landing in the exit handlers (the document
    workers', torch's), printed "Exception ignored in atexit callback" and a traceback. Once interrupted, the
    command ignores further Ctrl-C and SIGTERM while it exits."""
    stop = ("(_ for _ in ()).throw(KeyboardInterrupt())" if how == "raised"
            else "(_ for _ in ()).throw(SystemExit(130))")  # the command's own handling: run() gave 130
    code = (SECOND_CTRL_C + f"import idefics_cli.cli as cli\ncli.app = lambda: {stop}\n"
            "import sys\nsys.argv = ['idefics', '-h']\nfrom idefics_cli.__main__ import main\nmain()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert (res.returncode, res.stdout) == (130, b"") and b"Traceback" not in res.stderr, res.stderr.decode()
    assert res.stderr == (b"interrupted\n" if how == "raised" else b"")
