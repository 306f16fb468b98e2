"""`transcribe --engine ray`: the same pipeline on Ray Data, for many GPUs or nodes.

Contract: `run_on_ray(job)` reads each document in one Ray CPU task (batch.read_document: pages rendered there),
runs the local pipeline (pipeline.transcribe) in `map_batches` actors that load the model (one per GPU, else CPU
actors) and streams back exactly the records the local engine writes, through the same sinks and resume keys.
Errors are caught per page, as the local pipeline does. Works with Ray 2.40-2.60.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import socket
import threading
import warnings
from collections.abc import Iterator

from ..errors import IdeficsError, UsageError
from .batch import DocumentDone, Failure, Input, build_batch, read_document
from .pipeline import TranscribeJob, page_builder, transcribe
from .records import PageRecord
from .writers import Sink

REACH_S = 10  # how long a Ray address may take to accept a connection


class RayPages:
    """Document -> its pipeline items (batch.read_document), pickled one a row so that Ray Data streams a long
    document on; its `DocumentDone` comes first (the driver counts its pages) and again last (its pages are in)."""

    def __init__(self, open_doc, select_pages, done: set, settings: str):
        self.open_doc, self.select_pages, self.done, self.settings = open_doc, select_pages, done, settings

    def is_done(self, sha256: str, page: int) -> bool:
        return (sha256, page, self.settings) in self.done

    def __call__(self, row: dict) -> Iterator[dict]:
        head = None
        for found in read_document(Input(row["path"], row["rel"]), self.open_doc, self.select_pages, self.is_done):
            if isinstance(found, Failure):  # an IdeficsError does not unpickle: its dict does
                found = dataclasses.replace(found, error=found.error.to_dict())
            head = head or (found if isinstance(found, DocumentDone) else None)
            yield {"item": pickle.dumps(found)}
            found = None
        if head is not None:
            yield {"item": pickle.dumps(head)}


class Events(Sink):
    """What the local pipeline wrote in an actor, pickled in order: record dicts and `DocumentDone`s."""

    def __init__(self):
        self.events: list[bytes] = []

    def write(self, record: dict) -> None:
        self.events.append(pickle.dumps(record))

    def document_done(self, done) -> None:
        self.events.append(pickle.dumps(done))


class Transcriber:
    """The model actor: loads the engine once and runs the local pipeline over the items of each batch."""

    def __init__(self, request):
        from ..runtime.model import load_engine

        self.engine, self.request = load_engine(request.options), request

    def __call__(self, batch: dict) -> dict:
        items = [pickle.loads(item) for item in batch["item"]]
        at = [k for k, found in enumerate(items) if isinstance(found, tuple)]
        if at:  # the rendered pages become one batch, in the place of the first
            built = build_batch([items[k] for k in at], page_builder(self.engine, self.request))
            items = [*items[:at[0]], *built, *(found for found in items[at[0]:] if not isinstance(found, tuple))]
        sink = Events()
        for _ in transcribe(self.engine, TranscribeJob(self.request, [], sink, None, None), items):
            pass
        return {"event": sink.events}


def init(address: str | None) -> object:
    try:
        import ray
    except ImportError:
        raise UsageError("--engine ray needs Ray", "pip install 'idefics-cli[ray]'") from None
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        _reachable(address)
        handler = signal.getsignal(signal.SIGTERM)  # Ray's own would exit 15, not 130 after the flush
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False,
                     logging_level="ERROR")
        except Exception as exc:  # noqa: BLE001
            raise IdeficsError("model_error", f"cannot start or reach Ray ({address or 'local'}): {exc}"[:300]) \
                from None
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, handler)
    return ray


def _reachable(address: str | None) -> None:
    """A `host:port` address that refuses or ignores a connection is a `model_error` within REACH_S, where Ray
    would retry for minutes; "auto", "local" and ray:// addresses are left to Ray."""
    host, _, port = (address or "").rpartition(":")
    if not port.isdigit() or "://" in host:
        return
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=REACH_S).close()
    except OSError as exc:
        raise IdeficsError("model_error", f"cannot reach Ray at {address}: {exc.strerror or exc}",
                           "start it with `ray start --head`, or check --ray-address and RAY_ADDRESS") from None


def _quiet_ray() -> None:
    """Ray Data's console chatter (execution plans, deprecations) off; its log files stay."""
    warnings.filterwarnings("ignore", module="ray")
    warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR if os.environ.get("IDEFICS_DEBUG") else logging.CRITICAL)


def _actors_errors(rows: Iterator) -> Iterator:
    """`rows`; a model actor that could not start (Ray keeps only its error's text) is a `model_error` naming it."""
    try:
        yield from rows
    except Exception as exc:
        if type(exc).__name__ != "ActorDiedError":
            raise
        text = str(exc).replace("\x1b", "")
        why = next((line.split("IdeficsError: ", 1)[1] for line in reversed(text.splitlines())
                    if "IdeficsError: " in line), text.splitlines()[-1] if text else "it died")
        raise IdeficsError("model_error", f"a Ray model actor could not load the model: {why}"[:300],
                           "--engine local shows the same error") from None


def run_on_ray(job: TranscribeJob, address: str | None = None) -> Iterator[PageRecord]:
    """The job's records on Ray (its request's batch size resolved), each yielded once written."""
    if any(d.path == "-" for d in job.docs):
        raise UsageError("--engine ray cannot read stdin (-)", "save the document to a file first")
    ray = init(address)
    ctx = ray.data.DataContext.get_current()
    _quiet_ray()
    ctx.execution_options.preserve_order = True
    ctx.target_max_block_size = 1  # a block a row: each page's record comes back once done, not a document's
    ctx.enable_progress_bars = ctx.print_on_execution_start = False
    job.begin()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    ds = ray.data.from_items([{"path": d.path, "rel": d.rel} for d in job.docs],
                             override_num_blocks=max(1, len(job.docs)))
    ds = ds.flat_map(RayPages(job.open_doc, job.select_pages, job.done, job.request.settings_hash))
    ds = ds.map_batches(Transcriber, batch_size=job.request.batch_size, batch_format="numpy",
                        fn_constructor_kwargs={"request": job.request}, num_gpus=1 if gpus else 0,
                        compute=ray.data.ActorPoolStrategy(size=max(gpus, 1)),  # one model actor a GPU
                        max_restarts=-1, max_task_retries=-1, **({} if gpus else {"num_cpus": 1}))
    begun = set()
    for row in _actors_errors(ds.iter_rows()):
        event = pickle.loads(row["event"])
        if not isinstance(event, DocumentDone):
            yield job.emit(PageRecord.from_dict(event))
        elif (event.input, event.sha256) not in begun:
            begun.add((event.input, event.sha256))
            job.pages(len(event.pages), sum(job.is_done(event.sha256, page) for page in event.pages))
        else:
            job.document_done(event)
    job.tick()
