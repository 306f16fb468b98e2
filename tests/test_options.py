"""cli/options.py: the help every command prints reads like the README (usage, metavars, choices, defaults)."""

import os
import re

import pytest
from typer.testing import CliRunner

from idefics_cli.cli import app
from idefics_cli.interface import TRANSCRIBE_PROMPT


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
    assert re.search(r"--engine [<\[]local\|ray[>\]]", text), text  # typer's versions bracket choices differently
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


def _probe_app(**decorator):
    """A one-command app whose command is declared like the real ones; it records the `ModelOptions` it gets."""
    import typer

    from idefics_cli.cli import options as o

    probe, got = typer.Typer(), {}

    @probe.command(cls=o.Command)
    @o.model_params(**decorator)
    def run(doc: str, opts: o.ModelOptions = None, server: o.Server = None) -> None:
        got.update(doc=doc, opts=opts, server=server)

    return probe, got


def test_model_params_hand_the_command_one_model_options(monkeypatch):
    from idefics_cli.runtime.model import ModelOptions

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("IDEFICS_MODEL", "env/model")
    probe, got = _probe_app(max_new_tokens=1024)
    result = CliRunner().invoke(probe, ["a.pdf", "--quant", "none", "--dtype", "float32", "--device", "cpu",
                                        "--no-split", "--max-new-tokens", "7", "--revision", "v1"])
    assert result.exit_code == 0, result.output
    assert got == {"doc": "a.pdf", "server": None,
                   "opts": ModelOptions(model="env/model", revision="v1", quant="none", dtype="float32", device="cpu",
                                        offline=False, split=False, max_new_tokens=7)}
    result = CliRunner().invoke(probe, ["b.pdf", "-m", "m", "--offline", "--server", "http://s"])
    assert result.exit_code == 0, result.output
    assert got["opts"] == ModelOptions(model="m", offline=True, max_new_tokens=1024) and got["server"] == "http://s"
    assert CliRunner().invoke(probe, ["c.pdf", "--max-new-tokens", "0"]).exit_code == 2  # min=1, typer's check


def test_model_params_only_shows_some_and_fixes_the_others(monkeypatch):
    from idefics_cli.runtime.model import ModelOptions

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    probe, got = _probe_app(max_new_tokens=1, only=("model", "offline"), fixed={"device": "cpu"})
    assert CliRunner().invoke(probe, ["a.pdf", "--model", "m"]).exit_code == 0
    assert got["opts"] == ModelOptions(model="m", device="cpu", max_new_tokens=1)
    result = CliRunner().invoke(probe, ["a.pdf", "--quant", "none"])
    assert result.exit_code == 2 and "--quant" in result.output


@pytest.mark.parametrize("command, names", [
    ("ask", ["model", "revision", "quant", "dtype", "device", "offline", "split", "max_new_tokens"]),
    ("chat", ["model", "revision", "quant", "dtype", "device", "offline", "split", "max_new_tokens"]),
    ("transcribe", ["model", "revision", "quant", "dtype", "device", "offline", "split", "max_new_tokens"]),
    ("doctor", ["model", "revision", "quant", "dtype", "device", "offline", "split", "max_new_tokens"]),
    ("serve", ["model", "revision", "quant", "dtype", "device", "offline", "split", "max_new_tokens"]),
    ("mcp", ["model", "revision", "quant", "dtype", "device", "offline", "split", "max_new_tokens"]),
    ("crops", ["model", "revision", "offline", "split"]),
    ("quantize", ["model", "revision", "dtype", "device", "offline"]),
])
def test_every_command_shows_the_same_model_options(command, names):
    """The model options of every command are one declaration: the same flags, help, env var and panel."""
    import typer

    def shown(name):
        sub = typer.main.get_command(app).commands[name]
        return {p.name: (tuple(p.opts), tuple(p.secondary_opts), p.help, p.envvar, p.rich_help_panel)
                for p in sub.params if p.name in names}

    got, ask = shown(command), shown("ask")
    assert list(got) == names and all(got[n] == ask[n] for n in names)


BAD_DEVICES = ["tpu", "gpu", "mps", "CPU", "cuda:", "cuda:x", "cuda:-1", " cpu", ""]


@pytest.mark.parametrize("device", BAD_DEVICES)
def test_a_bad_device_is_a_usage_error_before_anything_loads(cli, tmp_path, device):
    """--device takes auto, cpu, cuda or cuda:N: anything else is one usage line and exit 2, before the model is
    looked for (a missing model would otherwise be model_error, exit 5); doctor does not get to say "ready"."""
    page = tmp_path / "p.png"
    page.write_bytes(b"never read")
    for args in (["ask", page, "q"], ["transcribe", page, "--out", tmp_path / "r.jsonl"], ["doctor"],
                 ["quantize", tmp_path / "q"]):
        result = cli(*args, "--model", tmp_path / "no-model", "--device", device)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and result.stdout == "", (args, result.stdout, lines)
        assert lines == [f"error [usage]: --device {device!r} is not a device (use auto, cpu, cuda or cuda:N)"]
    assert sorted(os.listdir(tmp_path)) == ["p.png"]


def test_good_devices_are_handed_on():
    probe, got = _probe_app()
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert CliRunner().invoke(probe, ["a.pdf", "--device", device]).exit_code == 0
        assert got["opts"].device == device


def _documented_metavars() -> list[tuple[str, str, str]]:
    """(command, flag, METAVAR) for each `--flag METAVAR` in the first column of docs/COMMAND.md's option table
    (docs/models.md's: the model options, as `ask` shows them)."""
    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
    found = []
    for command in ("ask", "transcribe", "chat", "crops", "doctor", "pull", "quantize", "serve", "models"):
        with open(os.path.join(docs, f"{command}.md"), encoding="utf-8") as f:
            firsts = [line.split("|")[1] for line in f if line.startswith("| `-")]
        for cell in firsts:
            for flag, metavar in re.findall(r"`(--[\w-]+)(?:, -\w)? ([A-Z][A-Z_/]*)", cell):
                found.append(("ask" if command == "models" else command, flag, metavar))
    return found


@pytest.mark.parametrize("command, flag, metavar", _documented_metavars())
def test_help_names_each_value_as_the_docs_do(command, flag, metavar):
    """`--dpi N` in docs/ask.md is `--dpi N` in `idefics ask --help`, not `--dpi DPI`."""
    assert re.search(rf"{flag} {re.escape(metavar)}\b", _help(command)), f"idefics {command} --help: {flag}"
