"""`transcribe --engine ray`: the same pipeline on Ray Data, for many GPUs or nodes.

Contract: `run(...)` turns the documents into a manifest of (document, page) rows, rasterizes pages in
Ray CPU tasks, answers them in `map_batches` with a callable class that loads the model inside the actor
(one actor per GPU, `num_gpus=1`; on a machine without GPUs, CPU actors), and streams the rows back to
the driver, which writes exactly the records the local engine writes, through the same sinks, with the
same resume keys. Every stage catches errors per row into the row's error fields (Ray's block-level
error tolerance would drop whole blocks). Crashed tasks and actors are retried by Ray. The processor runs
in the actor, next to the model: its pixel tensors are ~10x larger than the page image they come from.
Works with Ray 2.40-2.60 (`compute=ActorPoolStrategy(...)`, else `concurrency=`).
"""

from __future__ import annotations

import inspect
import json
import os
import time
from dataclasses import asdict

from .batch import Batch, DocumentDone, Input, PageTask, done_keys
from .errors import IdeficsError, UsageError, classify
from .pipeline import Settings, Summary, answer_batch, blank_record
from .records import PageRecord


def _row(item: Input, sha256="", page=0, pages=0, chosen=(), skip=False, error: IdeficsError | None = None) -> dict:
    return {"path": item.path, "rel": item.rel, "sha256": sha256, "page": page, "pages": pages,
            "chosen": list(chosen), "skip": skip, "error_code": error.code if error else "",
            "error_message": error.message if error else "", "image": b"", "width": 0, "height": 0, "warnings": "[]"}


class Expand:
    """Document -> one row per chosen page (done pages marked `skip`), or one error row."""

    def __init__(self, open_doc, select_pages, done: set, settings: str):
        self.open_doc, self.select_pages, self.done, self.settings = open_doc, select_pages, done, settings

    def __call__(self, row: dict) -> list[dict]:
        item = Input(row["path"], row["rel"])
        try:
            with self.open_doc(item.path) as doc:
                chosen = self.select_pages(doc)
                return [_row(item, doc.sha256, p, doc.page_count, chosen,
                             skip=(doc.sha256, p, self.settings) in self.done) for p in chosen]
        except Exception as exc:  # noqa: BLE001 - recorded per row
            return [_row(item, error=classify(exc, item.path, "read"))]


class Render:
    """Rasterize one page in a CPU task; the image travels as raw RGB bytes."""

    def __init__(self, open_doc):
        self.open_doc = open_doc

    def __call__(self, row: dict) -> dict:
        if row["error_code"] or row["skip"]:
            return row
        try:
            with self.open_doc(row["path"]) as doc:
                image = doc.render(int(row["page"]))
            row.update(image=image.tobytes(), width=image.width, height=image.height,
                       warnings=_dumps(doc.warnings(int(row["page"]))))
        except Exception as exc:  # noqa: BLE001
            err = classify(exc, row["path"], "read")
            row.update(error_code=err.code, error_message=err.message)
        return row


class Transcriber:
    """The model actor: loads the engine once, answers batches of rows."""

    def __init__(self, model_options: dict, settings: dict):
        from .model import ModelOptions, load

        self.engine = load(ModelOptions(**model_options))
        self.settings = Settings(**settings)

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["path"]))]
        tasks_of = {i: PageTask(Input(r["path"], r["rel"]), r["sha256"], int(r["page"]), int(r["pages"]),
                                json.loads(r["warnings"] or "[]"))
                    for i, r in enumerate(rows) if not r["error_code"] and not r["skip"]}
        results: dict[int, PageRecord] = {i: blank_record(t, self.settings) for i, t in tasks_of.items()
                                          if "blank_page" in t.warnings}  # nothing to read: no model
        todo = [i for i in tasks_of if i not in results]
        if todo:
            tasks = [tasks_of[i] for i in todo]
            images = [Image.frombytes("RGB", (int(rows[i]["width"]), int(rows[i]["height"])), rows[i]["image"])
                      for i in todo]
            t0 = time.perf_counter()
            try:
                inputs = self.engine.prepare([([im], self.settings.prompt) for im in images], collect=True)
                records = answer_batch(self.engine, Batch(tasks, images, inputs, time.perf_counter() - t0),
                                       self.settings)
            except Exception as exc:  # noqa: BLE001 - recorded per row
                err = classify(exc, tasks[0].input.path)
                records = [PageRecord(t.input.path, t.page, t.pages, "error", t.sha256, self.settings.settings,
                                      error=err.to_dict()) for t in tasks]
            results.update(zip(todo, records))
        for i, row in enumerate(rows):
            if row["error_code"]:
                err = {"code": str(row["error_code"]), "message": str(row["error_message"])}
                results[i] = PageRecord(str(row["path"]), int(row["page"]), int(row["pages"]), "error",
                                        str(row["sha256"]), self.settings.settings, error=err)
        return {"record": [_dumps(results[i].to_dict()) if i in results else "" for i in range(len(rows))],
                "page": [int(r["page"]) for r in rows], "skip": [bool(r["skip"]) for r in rows],
                "path": [str(r["path"]) for r in rows], "rel": [str(r["rel"]) for r in rows],
                "sha256": [str(r["sha256"]) for r in rows],
                "chosen": [_dumps([int(p) for p in r["chosen"]]) for r in rows]}


def _dumps(obj) -> str:
    return json.dumps(obj)


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


def run(model_options, docs: list[Input], sink, settings: Settings, open_doc, select_pages, address=None,
        progress=None) -> Summary:
    if any(d.path == "-" for d in docs):
        raise UsageError("--engine ray cannot read stdin (-)", "save the document to a file first")
    ray = init(address)
    ctx = ray.data.DataContext.get_current()
    _quiet_ray()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    summary = Summary()
    start = time.perf_counter()
    done = set() if settings.force else done_keys(sink.existing)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    ds = ray.data.from_items([{"path": d.path, "rel": d.rel} for d in docs], override_num_blocks=max(1, len(docs)))
    ds = ds.flat_map(Expand(open_doc, select_pages, done, settings.settings)).map(Render(open_doc))
    ds = ds.map_batches(Transcriber, batch_size=settings.batch_size, batch_format="numpy",
                        fn_constructor_kwargs={"model_options": asdict(model_options), "settings": asdict(settings)},
                        **_map_batches_args(ray, max(gpus, 1), 1 if gpus else 0))
    remaining: dict[tuple[str, str], set[int]] = {}
    for row in ds.iter_rows():
        key = (row["path"], row["sha256"])
        chosen = json.loads(row["chosen"])
        if key not in remaining:
            remaining[key] = set(chosen)
            summary.total += max(len(chosen), 1)
        if row["record"]:
            record = json.loads(row["record"])
            sink.write(record)
            if record["status"] == "ok":
                summary.ok += 1
            else:
                summary.failed += 1
                summary.failures.append(f"{record['path']} page {record['page']}: {record['error']['code']}")
        else:
            summary.skipped += 1
        remaining[key].discard(int(row["page"]))
        if row["sha256"] and chosen and not remaining[key]:
            sink.document_done(DocumentDone(Input(row["path"], row["rel"]), row["sha256"], chosen, 0))
        summary.seconds = time.perf_counter() - start
        if progress:
            progress(summary)
    summary.seconds = time.perf_counter() - start
    return summary
