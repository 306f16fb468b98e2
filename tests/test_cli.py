"""cli/__init__.py: the app, its commands' help and usage."""

import sys


def _help(*args: str, columns: int = 80) -> str:
    import os
    import subprocess

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
