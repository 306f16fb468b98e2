"""Options shared by the commands (see README.md), declared once as Typer annotations.

Contract: commands take these as parameters and call `model_options(...)` to build the library's
`ModelOptions` (`--offline` defaults to the user's own HF hub offline variable, `env_offline()`: the one
place the environment's offline setting is read; `ANSWER_TOKENS`, the default `--max-new-tokens` of answers, is
the library's); `engine(opts, server, api_key, out)` loads the model, or with `--server` (IDEFICS_SERVER)
connects to a running `idefics serve` instead (client.py); every command ends with `run_and_exit(body, out)`
(which first opts the process in to the commands' settings, process.py);
help panels group them as "Model", "Server" and "Document". `Command` is the command class of every command:
usage lines name the arguments as written
(`idefics ask [OPTIONS] DOC... QUESTION`, `[MODEL]` when optional) and a value option without a metavar shows its
name (`--pages PAGES`), never a Python type (`<str>`, `<list[str]>`); choices are listed. `Command` and `Group` (the
app's) coerce plain values without typer's pydantic (`PlainCoercion`). No heavy imports.
"""

from __future__ import annotations

import enum
import os
import re
from typing import Annotated, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

from ..model import DEFAULT_MODEL, ModelOptions

ANSWER_TOKENS = ModelOptions.max_new_tokens  # ask, chat: the library's default answer length
MODEL_PANEL = "Model"
DOC_PANEL = "Document"


class Quant(str, enum.Enum):
    bit4 = "4bit"
    bit8 = "8bit"
    none = "none"


class Dtype(str, enum.Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class Command(TyperCommand):
    """Help that reads like the README: arguments by their metavar, option values by a name, not a type; plain
    values coerced without pydantic (`PlainCoercion`)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        plain_coercion(self, ctx)
        return super().parse_args(ctx, args)

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(_argument_name(param))
        return pieces

    def format_options(self, ctx, formatter) -> None:
        args, opts = [], []
        for param in self.get_params(ctx):
            if param.param_type_name == "option" and not (param.is_flag or param.count) and param.metavar is None \
                    and not param.type_descriptor.is_choice:
                param.metavar = param.name.upper()
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                args.append((_argument_name(param), record[1]))
            else:
                opts.append(record)
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


class Group(TyperGroup):
    """The `idefics` group: its own options (--version, completion) coerced as `Command`'s are."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        plain_coercion(self, ctx)
        return super().parse_args(ctx, args)


def plain_coercion(command, ctx) -> None:
    """Give each parameter of `command` (--help included) that typer has not coerced yet a `PlainCoercion`."""
    for param in command.get_params(ctx):
        if getattr(param, "_runtime_param", False) is None and hasattr(param, "type_descriptor"):
            param._runtime_param = PlainCoercion(param.type_descriptor)


_NOT_PLAIN = object()
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,17}")


class PlainCoercion:
    """A parameter's value as typer gives it, without typer's pydantic when the value is plain (~70 ms of imports and
    TypeAdapters on every command line, which `ask --server` pays in full).

    Typer (0.20+) coerces every parameter through a pydantic TypeAdapter built when the command runs. Here a str, a
    list of str, an int within the option's min..max given as decimal digits, an enum member or its exact value, and
    a missing value are taken as they are, giving typer's own result; any other value (a bad number, an unknown
    choice: anything that may be an error) goes to typer's own coercion, so its messages are typer's. Installed by
    `Command.parse_args` only where typer has this lazy hook (`_runtime_param`); tests/test_options.py checks it
    against typer's coercion.
    """

    def __init__(self, descriptor):
        self.descriptor = descriptor
        self.full = None  # typer's own RuntimeParam, built on the first value that is not plain

    def coerce(self, value, param, ctx):
        multi = param.multiple or param.nargs == -1
        if value is None:
            return () if multi else None
        plain = _plain(self.descriptor, value, multi, ctx)
        if plain is not _NOT_PLAIN:
            return plain
        if self.full is None:
            from typer._coercion import build_runtime_param

            self.full = build_runtime_param(self.descriptor)
        return self.full.coerce(value, param=param, ctx=ctx)


def _plain(descriptor, value, multi: bool, ctx):
    """`value` coerced as typer would, or _NOT_PLAIN when typer's own coercion must decide."""
    annotation, info = descriptor.annotation, descriptor.parameter_info
    if descriptor.is_file or getattr(info, "parser", None) is not None or getattr(info, "click_type", None) is not None:
        return _NOT_PLAIN
    if multi:
        if annotation == list[str] and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return [str(v) for v in value]
        return _NOT_PLAIN
    if annotation is str and isinstance(value, str) and not descriptor.is_path:
        return str(value)
    if annotation is int and not getattr(info, "clamp", False):
        if type(value) is int:
            number = value
        elif isinstance(value, str) and _DECIMAL.fullmatch(value):
            number = int(value)
        else:
            return _NOT_PLAIN
        low, high = getattr(info, "min", None), getattr(info, "max", None)
        low_ok, high_ok = low is None or number >= low, high is None or number <= high
        return number if low_ok and high_ok else _NOT_PLAIN
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        if isinstance(value, annotation):
            return value
        normalized = ctx is not None and ctx.token_normalize_func is not None
        if isinstance(value, str) and getattr(info, "case_sensitive", True) and not normalized:
            for member in annotation:
                if str(member.value) == value:
                    return member
    return _NOT_PLAIN


def _argument_name(param) -> str:
    name = param.metavar or param.name.upper()
    return name if param.required else f"[{name}]"


Model = Annotated[str, typer.Option("--model", "-m", metavar="ID_OR_DIR", envvar="IDEFICS_MODEL",
                                    rich_help_panel=MODEL_PANEL, help="Hub id or local folder of the model.")]
Revision = Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).",
                                              rich_help_panel=MODEL_PANEL)]
QuantOpt = Annotated[Quant, typer.Option("--quant", help="4bit = bitsandbytes nf4 + double quant.",
                                         rich_help_panel=MODEL_PANEL)]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="auto: bfloat16/float16 on a GPU, float32 on the CPU.",
                                         rich_help_panel=MODEL_PANEL)]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", rich_help_panel=MODEL_PANEL)]
Offline = Annotated[bool, typer.Option("--offline", help="Never touch the network; use the local cache only.",
                                       rich_help_panel=MODEL_PANEL)]
Split = Annotated[bool, typer.Option("--split/--no-split",
                                     help="Image splitting: 4 crops + the original (5 x 64 visual tokens).",
                                     rich_help_panel=MODEL_PANEL)]
Pages = Annotated[str | None, typer.Option("--pages", "-p", metavar="SPEC", rich_help_panel=DOC_PANEL,
                                           help="1-based pages per document: 3, 1-4, 1,3,7-, -2.")]
Dpi = Annotated[int | None, typer.Option(min=10, max=1200, rich_help_panel=DOC_PANEL,
                                         help="Render PDFs at this DPI (default: longest side 1960 px).")]
Password = Annotated[str | None, typer.Option(help="Password for encrypted PDFs.", rich_help_panel=DOC_PANEL)]
SchemaOpt = Annotated[str | None, typer.Option("--schema", metavar="SCHEMA",
                                               help="Answer as JSON valid against this JSON Schema: a file, inline "
                                                    "JSON, or fields 'vendor, total float, paid bool' (types str, "
                                                    "int, float, bool). Needs idefics-cli[schema].")]


SERVER_PANEL = "Server"
Server = Annotated[str | None, typer.Option("--server", metavar="URL", envvar="IDEFICS_SERVER", show_envvar=True,
                                            rich_help_panel=SERVER_PANEL,
                                            help="Use the model of a running `idefics serve` (pages are rendered "
                                                 "here); the model options are then the server's.")]
ApiKey = Annotated[str | None, typer.Option("--api-key", metavar="KEY", envvar="IDEFICS_API_KEY", show_envvar=True,
                                            rich_help_panel=SERVER_PANEL, help="The --server's API key.")]


def engine(opts: ModelOptions, server: str | None, api_key: str | None, out):
    """The engine a command runs on: the model loaded here, or with `server` that server's model (client.py;
    nothing of torch is imported then). A `--model` other than the server's is reported, not used."""
    if not server:
        from ..model import load

        with out.status(f"Loading {opts.model} ({opts.quant})…"):
            return load(opts)
    from ..client import connect

    with out.status(f"Connecting to {server}…"):
        remote = connect(server, api_key=api_key, max_new_tokens=opts.max_new_tokens)
    if opts.model not in (DEFAULT_MODEL, remote.options.model):
        out.warn(f"--model {opts.model} is not used: the server at {remote.url} serves {remote.options.model}")
    return remote


def max_new_tokens_option(default: int):
    return Annotated[int, typer.Option(min=1, max=32768, metavar="N", help="Most tokens to generate per answer.",
                                       rich_help_panel=MODEL_PANEL)]


OFFLINE_ENV = "HF_HUB_OFFLINE"  # the Hugging Face hub's own switch, read here and nowhere else


def env_offline() -> bool:
    """Whether the user's environment asks for offline mode, read as huggingface_hub reads it (1, on, yes,
    true): the default of `--offline`. The library never reads or writes it; offline travels in the options."""
    return os.environ.get(OFFLINE_ENV, "").upper() in ("1", "ON", "YES", "TRUE")


def model_options(model: str, revision: str | None, quant: Quant, dtype: Dtype, device: str, offline: bool,
                  split: bool, max_new_tokens: int) -> ModelOptions:
    offline = offline or env_offline()
    return ModelOptions(model=model or DEFAULT_MODEL, revision=revision, quant=quant.value, dtype=dtype.value,
                        device=device, offline=offline, split=split, max_new_tokens=max_new_tokens)


def run_and_exit(body, out=None) -> NoReturn:
    """A command's last line: opt the process in (process.py), run its body through `output.run` (errors as one
    line) and exit with the status."""
    from ..output import run
    from ..process import tune_process

    tune_process()

    raise typer.Exit(run(body, out))
