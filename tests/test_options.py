"""cli/options.py: the help every command prints reads like the README (usage, metavars, choices, defaults)."""

import re

import pytest
from typer.testing import CliRunner

from idefics_cli.cli import app
from idefics_cli.prompts import TRANSCRIBE_PROMPT


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], prog_name="idefics", terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("command, usage", [
    ("ask", "Usage: idefics ask [OPTIONS] DOC... QUESTION"),
    ("pull", "Usage: idefics pull [OPTIONS] [MODEL]"),
    ("transcribe", "Usage: idefics transcribe [OPTIONS] PATH..."),
    ("chat", "Usage: idefics chat [OPTIONS] DOC"),
    ("crops", "Usage: idefics crops [OPTIONS] DOC"),
    ("quantize", "Usage: idefics quantize [OPTIONS] OUT_DIR"),
    ("doctor", "Usage: idefics doctor [OPTIONS]"),
])
def test_usage_line_names_the_arguments_as_written(command, usage):
    text = _help(command)
    assert text.splitlines()[0] == usage
    # no Python types, no doubled brackets, no braces anywhere in the help
    assert not re.search(r"<(str|int|list\[str\]|int range)>|\[\[|\{", text), text


def test_engine_lists_its_choices_and_prompt_shows_its_default():
    text = " ".join(_help("transcribe").split())
    assert "--engine <local|ray>" in text
    assert " ".join(TRANSCRIBE_PROMPT.split()) in text
    assert "--pages SPEC" in text and "--max-new-tokens N" in text


def test_engine_choice_is_checked_by_the_parser():
    result = CliRunner().invoke(app, ["transcribe", "x.pdf", "--engine", "spark"])
    assert result.exit_code == 2 and "spark" in result.output


@pytest.mark.parametrize("value, offline", [("1", True), ("true", True), ("ON", True), ("yes", True), ("", False),
                                            ("0", False), ("false", False), ("no", False)])
def test_offline_defaults_to_the_users_hub_switch_read_as_the_hub_reads_it(monkeypatch, value, offline):
    """HF_HUB_OFFLINE is read in this one place, as huggingface_hub reads it ("false" is not offline)."""
    from idefics_cli.cli.options import Dtype, Quant, env_offline, model_options

    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert env_offline() is offline
    assert model_options("m", None, Quant.none, Dtype.auto, "cpu", False, True, 8).offline is offline
    assert model_options("m", None, Quant.none, Dtype.auto, "cpu", True, True, 8).offline is True  # --offline


def _typer_coerced(param, value, ctx):
    """`value` through typer's own coercion (its pydantic TypeAdapter), or the error message it raises."""
    from typer._coercion import build_runtime_param

    try:
        return build_runtime_param(param.type_descriptor).coerce(value, param=param, ctx=ctx)
    except Exception as exc:  # noqa: BLE001 - the message is what is compared
        return f"{type(exc).__name__}: {exc}"


def _plain_coerced(param, value, ctx):
    from idefics_cli.cli.options import PlainCoercion

    try:
        return PlainCoercion(param.type_descriptor).coerce(value, param=param, ctx=ctx)
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"


VALUES = [None, "", "x", "doc.pdf", "0", "1", "7", "10", "512", "1200", "1201", "32768", "32769", "-1", "+5", "007",
          " 12", "1_0", "12.0", "1e3", "abc", "99999999999999999999", 0, 1, 10, 512, 32769, True,
          "4bit", "8bit", "none", "4BIT", "auto", "bfloat16", "float32", "hf", "ray", ("a.pdf", "q"), ["a", "b"], ()]


@pytest.mark.parametrize("command", ["ask", "transcribe", "chat", "crops", "serve", "doctor", "pull", "quantize"])
def test_plain_coercion_gives_typers_own_values_and_errors(command):
    """Every parameter of every command (and the group's), over plain and bad values: PlainCoercion's result (the
    value, or the error typer raises) is typer's own."""
    import typer

    group = typer.main.get_command(app)
    sub = group.commands[command]
    ctx = sub.make_context(command, ["--help"], resilient_parsing=True)
    for param in [*sub.get_params(ctx), *group.get_params(ctx)]:
        multi = param.multiple or param.nargs == -1
        for value in VALUES:
            if multi != isinstance(value, (tuple, list)) and value is not None:
                continue
            want, got = _typer_coerced(param, value, ctx), _plain_coerced(param, value, ctx)
            assert got == want and type(got) is type(want), (command, param.name, value, got, want)


def test_the_ask_command_line_imports_no_pydantic(tmp_path):
    """`idefics ask` parses its command line (here up to a missing file) without typer's pydantic adapters."""
    import json
    import subprocess
    import sys

    code = ("import json, sys\nfrom idefics_cli.cli import app\ntry:\n"
            "    app(['ask', 'missing.pdf', 'Q?', '--pages', '1-2', '--dpi', '96', '--json', '--quant', 'none',\n"
            "         '--max-new-tokens', '16', '--server', 'http://127.0.0.1:9'], prog_name='idefics')\n"
            "except SystemExit as e:\n    code = e.code\n"
            "print(json.dumps([code, sorted(m for m in ('pydantic', 'typer._adapters') if m in sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=tmp_path, timeout=120)
    assert json.loads(out.stdout) == [4, []], out.stderr.decode()  # not_found: the options were all taken
