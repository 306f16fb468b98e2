"""Options shared by the commands, each declared once as a Typer annotation; no heavy imports.

Contract: `@model_params(max_new_tokens)` puts the model options in place of a command's `opts` parameter and hands
them to it as one `ModelOptions`; `@runs` makes a command's first parameter its `Output` and runs the body through
`output.run` (errors as one line, the exit status). `connect_first()` connects to `--server` before pages are
rendered; `engine()` loads the model otherwise. `Command`: every command's usage and help, as the README writes.
`Group`: the app, whose click usage errors (bad values, unknown options or commands, missing arguments) are one line.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import inspect
import os
from typing import Annotated, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

from ..errors import IdeficsError, UsageError
from ..interface import DEVICES, DPI_RANGE, MAX_NEW_TOKENS, check_device
from ..runtime.families import render_side
from ..runtime.model import DEFAULT_MODEL, ModelOptions

ANSWER_TOKENS = ModelOptions.max_new_tokens  # ask, chat: the library's default answer length
Quant = enum.Enum("Quant", {"auto": "auto", "bit4": "4bit", "bit8": "8bit", "none": "none"}, type=str)
Dtype = enum.Enum("Dtype", {name: name for name in ("auto", "bfloat16", "float16", "float32")}, type=str)


class Command(TyperCommand):
    """Help that reads like the README: arguments by their metavar, option values by a name, not a type."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        return pieces + [_argument_name(p) for p in self.get_params(ctx) if p.param_type_name == "argument"]

    def format_options(self, ctx, formatter) -> None:
        args, opts = [], []
        for param in self.get_params(ctx):
            if param.param_type_name == "option" and not (param.is_flag or param.count) and param.metavar is None \
                    and not _is_choice(param):
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


# click's UsageError, from whichever click typer runs on (newer typer carries its own copy): BadParameter's base
ClickUsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class OneLineUsageError(ClickUsageError):
    """A click usage error shown as the house's one stderr line: `error [usage]: <click's message> (see CMD --help)`."""

    def __init__(self, error):
        super().__init__(error.format_message(), error.ctx)

    def show(self, file=None) -> None:
        hint = f"see {self.ctx.command_path} --help" if self.ctx is not None else None
        typer.echo(IdeficsError("usage", self.message, hint).one_line(), file=file, err=True)


@contextlib.contextmanager
def _one_line_usage():
    try:
        yield
    except ClickUsageError as error:
        if type(error).__name__ == "NoArgsIsHelpError":  # click 8.2+: `idefics` alone prints its help, as before
            raise
        raise OneLineUsageError(error) from error


class Group(TyperGroup):
    """The app's group: click's usage errors, its own and its commands', raise `OneLineUsageError` (exit status 2);
    help, with no arguments too, is as click prints it."""

    def make_context(self, info_name, args, parent=None, **extra):
        with _one_line_usage():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with _one_line_usage():
            return super().invoke(ctx)


def _is_choice(param) -> bool:
    """Whether an option's values are choices (typer 0.27+ says so; older typer, as the docling extra pins, not)."""
    described = getattr(param, "type_descriptor", None)
    return described.is_choice if described is not None else bool(getattr(param.type, "choices", None))


def _argument_name(param) -> str:
    name = param.metavar or param.name.upper()
    return name if param.required else f"[{name}]"


ModelOpt = Annotated[str, typer.Option("--model", "-m", metavar="ID_OR_DIR", envvar="IDEFICS_MODEL",
                                       help="Hub id or local folder of the model.")]
Revision = Annotated[str | None, typer.Option(metavar="REV", help="Hub revision (branch, tag or commit).")]
QuantOpt = Annotated[Quant, typer.Option("--quant", help="auto: 4bit from 4B parameters, else none; 4bit = "
                                                         "bitsandbytes nf4 + double quant.")]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="auto: bfloat16/float16 on a GPU, float32 on the CPU.")]
Device = Annotated[str, typer.Option(help=f"{DEVICES}.")]
Offline = Annotated[bool, typer.Option("--offline", help="Never touch the network; use the local cache only.")]
Split = Annotated[bool, typer.Option("--split/--no-split",
                                     help="Image splitting: 4 crops + the original (5 x 64 visual tokens).")]
MaxNewTokens = Annotated[int, typer.Option(min=1, max=MAX_NEW_TOKENS, metavar="N",
                                           help="Most tokens to generate per answer.")]
Doc = Annotated[str, typer.Argument(metavar="DOC", show_default=False, help="A PDF or image (- for stdin).")]
PagesOpt = Annotated[str | None, typer.Option("--pages", "-p", metavar="SPEC",
                                              help="1-based pages per document: 3, 1-4, 1,3,7-, -2.")]
Dpi = Annotated[int | None, typer.Option(min=DPI_RANGE[0], max=DPI_RANGE[1], metavar="N",
                                         help="Render PDFs at N dpi (default: longest side 1960 px, or the model's "
                                              "own image size).")]
Password = Annotated[str | None, typer.Option(metavar="PW", help="Password for encrypted PDFs.")]
SchemaOpt = Annotated[str | None, typer.Option("--schema", metavar="SCHEMA",
                                               help="Answer as JSON valid against this JSON Schema: a file, inline "
                                                    "JSON, or fields 'vendor, total float, paid bool' (types str, "
                                                    "int, float, bool).")]
Server = Annotated[str | None, typer.Option("--server", metavar="URL", envvar="IDEFICS_SERVER", show_envvar=True,
                                            help="Use the model of a running `idefics serve` (pages are rendered "
                                                 "here); the model options are then the server's.")]
ApiKey = Annotated[str | None, typer.Option("--api-key", metavar="KEY", envvar="IDEFICS_API_KEY", show_envvar=True,
                                            help="The --server's API key.")]


def engine(opts: ModelOptions, out):
    """The model loaded here (without `--server`)."""
    from ..runtime.model import load_engine

    with out.status(f"Loading {opts.model} ({opts.quant})…"):
        return load_engine(opts)


def connect_first(opts: ModelOptions, server: str | None, api_key: str | None, out):
    """(`--server`'s engine or None, the page size); the server is connected first: it says what size pages are."""
    if not server:
        return None, render_side(opts)
    from ..remote.client import RemoteEngine

    with out.status(f"Connecting to {server}…"):
        remote = RemoteEngine(server, api_key, opts.max_new_tokens)
    if opts.model not in (DEFAULT_MODEL, remote.options.model):
        out.warn(f"--model {opts.model} is not used: the server at {remote.url} serves {remote.options.model}")
    return remote, remote.render_side


OFFLINE_ENV = "HF_HUB_OFFLINE"  # the Hugging Face hub's own switch, read here and nowhere else


def env_offline() -> bool:
    """Whether the environment asks for offline mode, read as huggingface_hub reads it: `--offline`'s default."""
    return os.environ.get(OFFLINE_ENV, "").upper() in ("1", "ON", "YES", "TRUE")


def model_options(model: str, revision: str | None, quant: Quant, dtype: Dtype, device: str, offline: bool,
                  split: bool, max_new_tokens: int) -> ModelOptions:
    """The options as one `ModelOptions` (`UsageError` for a `--device` that is no device)."""
    check_device(device, "--device")
    return ModelOptions(model=model or DEFAULT_MODEL, revision=revision, quant=quant.value, dtype=dtype.value,
                        device=device, offline=offline or env_offline(), split=split, max_new_tokens=max_new_tokens)


def _with_params(command, params, call):
    """`call(**kwargs)` in place of `command`, shown to Typer with these parameters."""
    wrapper = functools.wraps(command)(call)
    wrapper.__signature__ = inspect.signature(command, eval_str=True).replace(parameters=params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


def model_params(max_new_tokens: int | None = ANSWER_TOKENS, only: tuple[str, ...] | None = None,
                 fixed: dict | None = None):
    """Decorator: the command's `opts` parameter becomes the model options (all, or `only` these), handed to it as
    one `ModelOptions` (`fixed` values for those not shown; `max_new_tokens` None: None when not given)."""
    declared = {"model": (ModelOpt, DEFAULT_MODEL), "revision": (Revision, None), "quant": (QuantOpt, Quant.auto),
                "dtype": (DtypeOpt, Dtype.auto), "device": (Device, "auto"), "offline": (Offline, False),
                "split": (Split, True), "max_new_tokens": (MaxNewTokens, max_new_tokens)}
    shown = [name for name in declared if only is None or name in only]
    values = {name: default for name, (_, default) in declared.items()} | (fixed or {})

    def decorate(command):
        params = []
        for param in inspect.signature(command, eval_str=True).parameters.values():
            if param.name != "opts":
                params.append(param)
            else:
                params += [inspect.Parameter(name, param.kind, annotation=declared[name][0],
                                             default=declared[name][1]) for name in shown]

        def with_options(**kwargs):
            given = {name: kwargs.pop(name) for name in shown}
            try:
                opts = model_options(**(values | given))
            except UsageError as err:  # one line and exit 2, before the command starts
                from ..output import Output

                Output().error(err)
                raise typer.Exit(int(err.exit_status)) from None
            return command(opts=opts, **kwargs)

        return _with_params(command, params, with_options)

    return decorate


def runs(command):
    """Decorator: the command's first parameter is the `Output` it prints with. The process is opted in
    (process.py), the body runs through `output.run` (errors as one line) and the command exits with its status."""

    def run(**kwargs) -> NoReturn:
        from ..output import Output, run
        from ..process import tune_process

        out = Output()
        tune_process()
        raise typer.Exit(run(lambda: command(out, **kwargs), out))

    return _with_params(command, list(inspect.signature(command, eval_str=True).parameters.values())[1:], run)
