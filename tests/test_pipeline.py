"""pipeline.py: out-of-memory fallbacks (fault injection around the real engine), the build/generate schedule,
and remote code never run."""

from __future__ import annotations

import json
import os
import shutil

from conftest import make_image

from idefics_cli.runtime.model import ModelOptions
from idefics_cli.tasks.batch import Batch, Input, PageTask
from idefics_cli.tasks.pipeline import TranscribeJob, transcribe
from idefics_cli.tasks.transcription import TranscribeRequest
from idefics_cli.tasks.writers import Sink

SETTINGS = TranscribeRequest((), options=ModelOptions(max_new_tokens=4), prompt="Transcribe.", batch_size=2)


def run_job(engine, pdf, batch_size: int, sink) -> TranscribeJob:
    """The local engine over every page of one PDF, to the end; returns the job (its summary filled in)."""
    from idefics_cli.documents import open_document

    request = TranscribeRequest((str(pdf),), options=ModelOptions(max_new_tokens=2), prompt="Transcribe.",
                                batch_size=batch_size)
    job = TranscribeJob(request, [Input(str(pdf), "doc.pdf")], sink, open_document,
              lambda doc: list(range(1, doc.page_count + 1)))
    for _ in transcribe(engine, job):
        pass
    return job


class OomInjector:
    """The real engine, except that decode-loop prefills matching `fails(rows, crops)` raise CUDA's out-of-memory
    error (`crops`: images a row). A CPU cannot run out of GPU memory, so the fault is injected."""

    def __init__(self, monkeypatch, engine, fails):
        import torch

        from idefics_cli.runtime import decode

        self.calls = []
        real, per_image = decode.prefill, engine.processor.image_seq_len

        def prefill(eng, rows):
            crops = max(0 if r.features is None else r.features.shape[0] // per_image for r in rows)
            self.calls.append((len(rows), crops))
            if fails(len(rows), crops):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real(eng, rows)

        monkeypatch.setattr(decode, "prefill", prefill)


def answer_batch(engine, batch: Batch, request: TranscribeRequest) -> list:
    """The records of one batch's pages, in page order (written nowhere)."""
    return list(transcribe(engine, TranscribeJob(request, [], Sink(), None, None), [batch]))


def _batch(engine):
    images = [make_image(320, 240, 1), make_image(240, 320, 2)]
    tasks = [PageTask(Input(f"p{i}.png", f"p{i}.png"), f"sha{i}", 1, 1) for i in range(2)]
    return Batch(tasks, images, engine.prepare([([im], SETTINGS.prompt) for im in images], collect=True))


def _single_texts(engine, split):
    batch = _batch(engine)
    return [engine.generate_batch(engine.prepare([([im], SETTINGS.prompt)], split=split), 4)[0].text
            for im in batch.images]


def test_oom_batch_is_retried_page_by_page(engine, monkeypatch):
    injector = OomInjector(monkeypatch, engine, lambda rows, images: rows > 1)
    records = answer_batch(engine, _batch(engine), SETTINGS)
    calls = list(injector.calls)  # the reference answers below go through the loop too
    assert [r.status for r in records] == ["ok", "ok"]
    assert [r.text for r in records] == _single_texts(engine, None)
    assert calls == [(2, 5), (1, 5), (1, 5)]


def test_oom_single_page_is_retried_without_split(engine, monkeypatch):
    injector = OomInjector(monkeypatch, engine, lambda rows, images: images == 5)  # every split input: no memory
    records = answer_batch(engine, _batch(engine), SETTINGS)
    calls = list(injector.calls)  # the reference answers below go through the loop too
    assert [r.status for r in records] == ["ok", "ok"]
    assert [r.text for r in records] == _single_texts(engine, False)
    assert [r.usage["image_tokens"] for r in records] == [64, 64]
    assert calls == [(2, 5), (1, 5), (1, 1), (1, 5), (1, 1)]


def test_oom_everywhere_records_out_of_memory_and_goes_on(engine, monkeypatch):
    OomInjector(monkeypatch, engine, lambda rows, images: True)
    records = answer_batch(engine, _batch(engine), SETTINGS)
    assert [(r.status, r.error["code"]) for r in records] == [("error", "out_of_memory")] * 2
    assert all(r.text is None for r in records)


def test_remote_code_in_a_model_folder_is_never_imported(cli, tiny_model, tmp_path):
    """A folder whose config points at custom code: we load the built-in Idefics2 and never import it."""
    evil = tmp_path / "evil-model"
    shutil.copytree(tiny_model, evil)
    marker = tmp_path / "pwned"
    (evil / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (evil / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForImageTextToText": "modeling_evil.EvilModel"}
    (evil / "config.json").write_text(json.dumps(config))
    make_image().save(tmp_path / "p.png")
    result = cli("ask", tmp_path / "p.png", "q", "--model", evil, "--quant", "none", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.stderr
    assert not marker.exists() and not os.path.exists(evil / "__pycache__")


class ListSink(Sink):
    """Keeps the records it is given."""

    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)


class FailingBuilds:
    """The real engine, except that its first `fails` preprocessing calls raise."""

    def __init__(self, engine, fails: int):
        self.engine, self.fails, self.calls = engine, fails, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def prepare(self, batch, split=None, collect=False):
        self.calls += 1
        if self.calls <= self.fails:
            raise ValueError("preprocessing failed")
        return self.engine.prepare(batch, split, collect)


def test_failed_preprocessing_gives_back_its_turn_and_the_run_goes_on(engine, tmp_path):
    """More failed builds than turns ahead: each failure returns its turn, so the run cannot stall."""
    import threading

    from conftest import make_pdf

    pdf = make_pdf(tmp_path / "doc.pdf", 6)
    sink = ListSink()
    result = {}
    run = threading.Thread(target=lambda: result.setdefault("summary", run_job(
        FailingBuilds(engine, fails=4), pdf, 1, sink).summary), daemon=True)
    run.start()
    run.join(timeout=120)
    assert not run.is_alive(), "the run stalled"
    assert [r["status"] for r in sorted(sink.records, key=lambda r: r["page"])] == ["error"] * 4 + ["ok"] * 2
    assert result["summary"].failed == 4 and result["summary"].ok == 2


class Schedule:
    """The real engine, watched: logs each build's start and end and each answer, in order."""

    def __init__(self, engine):
        import threading

        self.engine, self.log, self.lock = engine, [], threading.Lock()
        self.second_build = threading.Event()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def _logged(self, what, call):
        with self.lock:
            self.log.append(what + " start")
        try:
            return call()
        finally:
            with self.lock:
                self.log.append(what + " end")

    def prepare(self, batch, split=None, collect=False):
        with self.lock:
            if self.log.count("build start") == 1:
                self.second_build.set()
        return self._logged("build", lambda: self.engine.prepare(batch, split, collect))

    def generate_rows(self, items, max_new_tokens=None, schema=None, width=None):
        first = True
        for tag, result in self.engine.generate_rows(items, max_new_tokens, schema, width):
            if first:  # the first answer ends only once the next build has started (or never will)
                self.second_build.wait(60)
                first = False
            with self.lock:
                self.log.append("answer")
            yield tag, result


def test_one_batch_is_built_ahead_while_the_model_works_on_the_previous_one(engine, tmp_path):
    from conftest import make_pdf

    pdf = make_pdf(tmp_path / "doc.pdf", 8)
    watch, sink = Schedule(engine), ListSink()
    assert run_job(watch, pdf, 2, sink).summary.ok == 8
    builds = answered = 0
    for event in watch.log:
        builds += event == "build start"
        answered += event == "answer"
        # a batch (2 pages) is built only once the loop needs its rows, one batch ahead at most: so at most two
        # batches' pixels exist at a time ...
        assert builds <= answered // 2 + 2, watch.log
    assert builds == 4 and answered == 8
    # ... and it is: the second build ran while the model worked on the first batch
    assert watch.log.index("build start", 1) < watch.log.index("answer"), watch.log
    expected = [engine.generate_batch(engine.prepare([([im], "Transcribe.")]), 2)[0].text
                for im in _pdf_images(pdf)]
    assert [r["text"] for r in sorted(sink.records, key=lambda r: r["page"])] == expected


def _pdf_images(pdf):
    from idefics_cli.documents import open_document

    with open_document(str(pdf)) as doc:
        return [doc.render(page) for page in range(1, doc.page_count + 1)]


def test_each_page_gets_its_share_of_the_batch_time(engine):
    batch = _batch(engine)
    gens = {}

    class Timed:
        def __getattr__(self, name):
            return getattr(engine, name)

        def generate_rows(self, items, max_new_tokens=None, schema=None, width=None):
            for tag, gen in engine.generate_rows(items, max_new_tokens, schema, width):
                gens[tag.row] = gen
                yield tag, gen

    records = answer_batch(Timed(), batch, SETTINGS)
    assert [r.timing["batch_size"] for r in records] == [2, 2]  # the two pages decoded together
    assert all(r.timing["generate_s"] == round(gens[k].total_s / 2, 4) for k, r in enumerate(records))


def test_the_jobs_done_pages_are_its_sinks_ok_records():
    sink = Sink()
    sink.existing = [
        {"path": "a.pdf", "sha256": "a", "page": 1, "settings": "s", "status": "ok", "text": "one"},
        {"path": "a.pdf", "sha256": "a", "page": 2, "settings": "s", "status": "error"},
        {"path": "a.pdf", "sha256": "a", "page": 3, "settings": "t", "status": "ok", "text": "three"},
        {"path": "b.pdf", "sha256": "b", "page": 1, "settings": "s", "status": "ok", "text": ""},
        {"path": "c.pdf", "sha256": "b", "page": 1, "settings": "s", "status": "ok", "text": "copy"},
        {"page": 9},  # a record missing fields is tolerated and never done
        {"path": "d.pdf", "sha256": "d", "page": 1, "settings": "s", "status": "ok"},  # no text: not trusted, redone
    ]
    job = TranscribeJob(SETTINGS, [], sink, None, None)
    assert job.done == {("a", 1, "s"), ("a", 3, "t"), ("b", 1, "s")}
    assert job.recorded == {("a.pdf", 1), ("a.pdf", 3), ("b.pdf", 1), ("c.pdf", 1)}
    assert TranscribeJob(SETTINGS, [], Sink(), None, None).done == set()
    forced = TranscribeJob(TranscribeRequest((), force=True), [], sink, None, None)
    assert forced.done == set() and forced.recorded == set()


def test_a_ctrl_c_while_the_prefetcher_stops_after_an_error_is_raised_not_ignored(engine, tmp_path, monkeypatch):
    """A run ending on an error (here a record that cannot be written) stops its prefetcher there and then, in the
    run's own flow: a Ctrl-C landing meanwhile (sent by the prefetcher's thread, rendering the next batch, once told
    to stop: the stop's join waits for it) ends the run as Ctrl-C does, and is not left to a garbage-collected
    generator, which printed "Exception ignored in ... Prefetcher.__iter__" and lost the Ctrl-C."""
    import signal
    import sys
    import threading

    import pytest
    from conftest import make_pdf

    from idefics_cli.documents import open_document
    from idefics_cli.tasks.batch import Prefetcher
    from idefics_cli.tasks.pipeline import page_builder

    ignored, builds, building, sent = [], [], threading.Event(), threading.Event()
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    request = TranscribeRequest((), options=ModelOptions(max_new_tokens=2), prompt="Transcribe.", batch_size=1)
    real = page_builder(engine, request)

    def build(images):
        builds.append(len(images))
        if len(builds) == 2:  # the second batch, built while the model answers the first
            building.set()
            for _ in range(3000):  # until the run stops this thread (30 s at most)
                if prefetcher._work.stopped:
                    sent.set()
                    os.kill(os.getpid(), signal.SIGINT)
                    break
                threading.Event().wait(0.01)
        return real(images)

    class Full(Sink):
        def write(self, record):
            building.wait(30)
            raise OSError(28, "No space left on device")

    prefetcher = Prefetcher([Input(make_pdf(tmp_path / "a.pdf", 3), "a.pdf")], lambda path: open_document(path, dpi=36),
                            lambda doc: [1, 2, 3], lambda sha, page: False, build, batch_size=1)
    with pytest.raises(KeyboardInterrupt):
        list(transcribe(engine, TranscribeJob(request, [], Full(), None, None), prefetcher))
    assert sent.is_set() and ignored == []
