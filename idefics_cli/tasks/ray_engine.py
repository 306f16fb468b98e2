"""`transcribe --engine ray`: the same pipeline on Ray Data, for many GPUs or nodes.

Contract: `run_on_ray(job)` renders each document's chosen pages in one Ray CPU task, answers them in `map_batches`
actors that load the model (one per GPU, else CPU actors; the processor runs there too) and streams back exactly
the records the local engine writes, through the same sinks and resume keys. Every stage catches errors per row
(Ray's block-level error tolerance would drop whole blocks). Works with Ray 2.40-2.60.
"""
from __future__ import annotations

import inspect
import json
import os
import time
from collections.abc import Iterator

from ..errors import IdeficsError, UsageError, classify
from .batch import Batch, DocumentDone, Failure, Input, PageTask, read_document
from .pipeline import TranscribeJob, answer_batch
from .records import PageRecord, blank_record, error_record, task_error


class RayPages:
    """Document -> one row per chosen page, yielded one by one so that Ray Data streams a long document on: its
    record where no model is needed (a failure, a blank page), else its raw RGB bytes; done pages `skip`."""

    def __init__(self, open_doc, select_pages, done: set, request):
        self.open_doc, self.select_pages, self.done, self.request = open_doc, select_pages, done, request

    def is_done(self, sha256: str, page: int) -> bool:
        return (sha256, page, self.request.settings_hash) in self.done

    def __call__(self, row: dict):
        item, chosen, request = Input(row["path"], row["rel"]), "[]", self.request
        for found in read_document(item, self.open_doc, self.select_pages, self.is_done):
            if isinstance(found, DocumentDone):
                chosen = json.dumps(found.pages)
                continue
            task, image = found if isinstance(found, tuple) else (found, None)  # a Failure has the page's fields
            out = {"path": item.path, "rel": item.rel, "sha256": task.sha256, "page": task.page, "pages": task.pages,
                   "chosen": chosen, "image": b"", "width": 0, "height": 0, "warnings": "[]"}
            record = None
            if isinstance(found, Failure):
                record = error_record(item.path, found.error, request.settings_hash, task.page, task.pages,
                                      task.sha256)
            elif image is not None and "blank_page" in task.warnings:  # nothing to read: no model
                record = blank_record(task, request.settings_hash, request.schema)
            elif image is not None:
                out.update(image=image.tobytes(), width=image.width, height=image.height,
                           warnings=json.dumps(task.warnings))
            out.update(skip=image is None and record is None, record=json.dumps(record.to_dict()) if record else "")
            found = image = None
            yield out


class Transcriber:
    """The model actor: loads the engine once, answers the rows of a batch that carry a page image."""

    def __init__(self, request):
        from ..runtime.model import load_engine

        self.engine = load_engine(request.options)
        self.request = request

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["path"]))]
        records = [str(r["record"]) for r in rows]
        todo = [i for i, r in enumerate(rows) if int(r["width"])]
        if todo:
            tasks = [PageTask(Input(str(r["path"]), str(r["rel"])), str(r["sha256"]), int(r["page"]), int(r["pages"]),
                              json.loads(r["warnings"])) for r in (rows[i] for i in todo)]
            images = [Image.frombytes("RGB", (int(rows[i]["width"]), int(rows[i]["height"])), rows[i]["image"])
                      for i in todo]
            t0 = time.perf_counter()
            try:
                inputs = self.engine.prepare([([im], self.request.model_prompt) for im in images], collect=True)
                answered = answer_batch(self.engine, Batch(tasks, images, inputs, time.perf_counter() - t0),
                                        self.request)
            except Exception as exc:  # noqa: BLE001 - recorded per row
                err = classify(exc, tasks[0].input.path)
                answered = [task_error(t, err, self.request.settings_hash) for t in tasks]
            for i, record in zip(todo, answered):
                records[i] = json.dumps(record.to_dict())
        return {"record": records, "page": [int(r["page"]) for r in rows], "skip": [bool(r["skip"]) for r in rows],
                **{k: [str(r[k]) for r in rows] for k in ("path", "rel", "sha256", "chosen")}}


def _map_batches_args(ray, n_actors: int, num_gpus: int) -> dict:
    """Actor-pool arguments for Ray 2.40-2.60 (the argument moved between `compute=` and `concurrency=`)."""
    params = inspect.signature(ray.data.Dataset.map_batches).parameters
    args = {"num_gpus": num_gpus, "num_cpus": 1 if not num_gpus else None, "max_restarts": -1,
            "max_task_retries": -1}
    if "compute" in params and hasattr(ray.data, "ActorPoolStrategy"):
        args["compute"] = ray.data.ActorPoolStrategy(size=n_actors)
    else:
        args["concurrency"] = n_actors
    return {k: v for k, v in args.items() if v is not None}


def init(address: str | None) -> object:
    try:
        import ray
    except ImportError:
        raise UsageError("--engine ray needs Ray", "pip install 'idefics-cli[ray]'") from None
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False,
                     logging_level="ERROR")
        except Exception as exc:  # noqa: BLE001
            raise IdeficsError("model_error", f"cannot start or reach Ray ({address or 'local'}): {exc}"[:300]) \
                from None
    return ray


def _quiet_ray() -> None:
    """Ray Data's console chatter (execution plans, deprecations) off; its log files stay."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", module="ray")
    warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
    for name in ("ray", "ray.data"):
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)


def run_on_ray(job: TranscribeJob, address: str | None = None) -> Iterator[PageRecord]:
    """The job's records on Ray (its request's batch size resolved), each yielded once written."""
    if any(d.path == "-" for d in job.docs):
        raise UsageError("--engine ray cannot read stdin (-)", "save the document to a file first")
    ray = init(address)
    ctx = ray.data.DataContext.get_current()
    _quiet_ray()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    job.begin()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    ds = ray.data.from_items([{"path": d.path, "rel": d.rel} for d in job.docs],
                             override_num_blocks=max(1, len(job.docs)))
    ds = ds.flat_map(RayPages(job.open_doc, job.select_pages, job.done, job.request))
    ds = ds.map_batches(Transcriber, batch_size=job.request.batch_size, batch_format="numpy",
                        fn_constructor_kwargs={"request": job.request},
                        **_map_batches_args(ray, max(gpus, 1), 1 if gpus else 0))
    remaining: dict[tuple[str, str], set[int]] = {}
    for row in ds.iter_rows():
        key = (row["path"], row["sha256"])
        chosen = json.loads(row["chosen"])
        if key not in remaining:
            remaining[key] = set(chosen)
            job.pages(max(len(chosen), 1), 0)
        if row["record"]:
            yield job.emit(PageRecord.from_dict(json.loads(row["record"])))
        else:
            job.pages(0, 1)
        remaining[key].discard(int(row["page"]))
        if row["sha256"] and chosen and not remaining[key]:
            job.sink.document_done(DocumentDone(Input(row["path"], row["rel"]), row["sha256"], chosen, 0))
    job.tick()
