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
