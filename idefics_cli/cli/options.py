"""Options shared by the commands (see README.md), each declared once as a Typer annotation.

Contract: `@model_params(max_new_tokens)` gives a command the model options (--model --revision --quant --dtype
--device --offline --split/--no-split --max-new-tokens, or the `only` ones, the rest `fixed`) in place of its
`opts` parameter, and calls it with them as one `ModelOptions`. `--offline` defaults to the user's HF hub offline
variable (`env_offline()`, the one place it is read). `engine(opts, server, api_key, out)` loads the model, or
connects to a running `idefics serve` (`--server`, client.py). Every command ends with `run_and_exit(body, out)`,
which first opts the process in to the commands' settings (process.py). `Command` is every command's class:
usage lines name the arguments as written (`idefics ask [OPTIONS] DOC... QUESTION`, `[MODEL]` when optional) and
a value option shows a name, never a Python type (`--pages PAGES`); choices are listed. No heavy imports.
"""

from __future__ import annotations

import enum
import functools
import inspect
import os
from typing import Annotated, NoReturn

import typer
from typer.core import TyperCommand

from ..runtime.model import DEFAULT_MODEL, ModelOptions

ANSWER_TOKENS = ModelOptions.max_new_tokens  # ask, chat: the library's default answer length
MODEL_PANEL = "Model"
DOC_PANEL = "Document"


class Quant(str, enum.Enum):
    auto = "auto"
    bit4 = "4bit"
    bit8 = "8bit"
    none = "none"


class Dtype(str, enum.Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class Command(TyperCommand):
    """Help that reads like the README: arguments by their metavar, option values by a name, not a type."""

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


def _is_choice(param) -> bool:
    """Whether an option's values are a list of choices (typer 0.27+ says so; before it, its type has `choices`:
    the typer that docling-core, the `[docling]` extra, caps below 0.27)."""
    described = getattr(param, "type_descriptor", None)
    return described.is_choice if described is not None else bool(getattr(param.type, "choices", None))


def _argument_name(param) -> str:
    name = param.metavar or param.name.upper()
    return name if param.required else f"[{name}]"


ModelOpt = Annotated[str, typer.Option("--model", "-m", metavar="ID_OR_DIR", envvar="IDEFICS_MODEL",
                                    rich_help_panel=MODEL_PANEL, help="Hub id or local folder of the model.")]
Revision = Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).",
                                              rich_help_panel=MODEL_PANEL)]
QuantOpt = Annotated[Quant, typer.Option("--quant", help="auto: 4bit from 4B parameters, else none; 4bit = "
                                         "bitsandbytes nf4 + double quant.",
                                         rich_help_panel=MODEL_PANEL)]
DtypeOpt = Annotated[Dtype, typer.Option("--dtype", help="auto: bfloat16/float16 on a GPU, float32 on the CPU.",
                                         rich_help_panel=MODEL_PANEL)]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.", rich_help_panel=MODEL_PANEL)]
Offline = Annotated[bool, typer.Option("--offline", help="Never touch the network; use the local cache only.",
                                       rich_help_panel=MODEL_PANEL)]
Split = Annotated[bool, typer.Option("--split/--no-split",
                                     help="Image splitting: 4 crops + the original (5 x 64 visual tokens).",
                                     rich_help_panel=MODEL_PANEL)]
PagesOpt = Annotated[str | None, typer.Option("--pages", "-p", metavar="SPEC", rich_help_panel=DOC_PANEL,
                                           help="1-based pages per document: 3, 1-4, 1,3,7-, -2.")]
Dpi = Annotated[int | None, typer.Option(min=10, max=1200, rich_help_panel=DOC_PANEL,
                                         help="Render PDFs at this DPI (default: longest side 1960 px, or the "
                                              "model's own image size).")]
Password = Annotated[str | None, typer.Option(help="Password for encrypted PDFs.", rich_help_panel=DOC_PANEL)]
SchemaOpt = Annotated[str | None, typer.Option("--schema", metavar="SCHEMA",
                                               help="Answer as JSON valid against this JSON Schema: a file, inline "
                                                    "JSON, or fields 'vendor, total float, paid bool' (types str, "
                                                    "int, float, bool).")]


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
        from ..runtime.model import load_engine

        with out.status(f"Loading {opts.model} ({opts.quant})…"):
            return load_engine(opts)
    from ..remote.client import RemoteEngine

    with out.status(f"Connecting to {server}…"):
        remote = RemoteEngine(server, api_key, opts.max_new_tokens)
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


def model_params(max_new_tokens: int = ANSWER_TOKENS, only: tuple[str, ...] | None = None, fixed: dict | None = None):
    """Decorator: the command's `opts` parameter becomes the model options, shown in its place in this order (all,
    or `only` these), and the command gets them as one `ModelOptions` (`fixed` values for those not shown)."""
    declared = {"model": (ModelOpt, DEFAULT_MODEL), "revision": (Revision, None), "quant": (QuantOpt, Quant.auto),
                "dtype": (DtypeOpt, Dtype.auto), "device": (Device, "auto"), "offline": (Offline, False),
                "split": (Split, True), "max_new_tokens": (max_new_tokens_option(max_new_tokens), max_new_tokens)}
    shown = [name for name in declared if only is None or name in only]
    values = {name: default for name, (_, default) in declared.items()} | (fixed or {})

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        params = []
        for param in signature.parameters.values():
            if param.name != "opts":
                params.append(param)
                continue
            params += [inspect.Parameter(name, param.kind, annotation=declared[name][0], default=declared[name][1])
                       for name in shown]

        @functools.wraps(command)
        def with_options(**kwargs):
            given = {name: kwargs.pop(name) for name in shown}
            return command(opts=model_options(**(values | given)), **kwargs)

        with_options.__signature__ = signature.replace(parameters=params)
        with_options.__annotations__ = {p.name: p.annotation for p in params}
        return with_options

    return decorate


def run_and_exit(body, out=None) -> NoReturn:
    """A command's last line: opt the process in (process.py), run its body through `output.run` (errors as one
    line) and exit with the status."""
    from ..output import run
    from ..process import tune_process

    tune_process()

    raise typer.Exit(run(body, out))
