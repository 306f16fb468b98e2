"""transcription.py: a transcribe run as a library object (`TranscribeRequest`, `Transcription`, `Model.transcribe`).

The runs use the session's tiny engine (float32 on the CPU); the CLI runs beside them use the same model options,
so they share the resume key.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace

import pytest
from conftest import make_image, make_pdf, run_idefics
from PIL import Image

import idefics_cli
from idefics_cli import Model
from idefics_cli.errors import UsageError
from idefics_cli.runtime.model import ModelOptions
from idefics_cli.tasks.records import PageRecord, settings_hash
from idefics_cli.tasks.transcription import TranscribeRequest


def same_options(tiny_model) -> list[str]:
    """The CLI flags of the `engine` fixture's model options."""
    return ["--model", tiny_model, "--quant", "none", "--device", "cpu", "--max-new-tokens", "8"]


@pytest.fixture
def scans(tmp_path, monkeypatch):
    """tmp_path/scans with a PDF of two pages, an image and a file that is not a document; cwd is tmp_path."""
    folder = tmp_path / "scans"
    folder.mkdir()
    make_pdf(folder / "invoice.pdf", 2)
    make_image(seed=8).save(folder / "page-1.png")
    (folder / "notes.txt").write_text("not a document: skipped\n")
    monkeypatch.chdir(tmp_path)
    return folder


def essence(record: dict) -> tuple:
    return (record["path"], record["page"], record["status"], record["text"], record["settings"], record["sha256"],
            json.dumps(record["usage"]), record["warnings"])


def test_the_readme_line_gives_the_clis_records_files_and_resume(engine, tiny_model, scans, cli, capsys):
    transcription = Model(engine).transcribe(["scans/"], out="transcripts/")
    for record in transcription:
        print(record.path, record.page, record.status)
    printed = capsys.readouterr().out.splitlines()
    assert sorted(printed) == ["scans/invoice.pdf 1 ok", "scans/invoice.pdf 2 ok", "scans/page-1.png 1 ok"]
    assert transcription.exit_status == 0 and list(transcription) == []  # iterating again: nothing new
    summary = transcription.summary
    assert (summary.ok, summary.skipped, summary.failed, summary.total, summary.not_documents) == (3, 0, 0, 3, 1)
    with open("transcripts/records.jsonl") as f:
        written = [json.loads(line) for line in f]
    assert sorted(os.listdir("transcripts")) == ["invoice.md", "page-1.md", "records.jsonl"]
    # the CLI with the same model options: the same resume key, so nothing is left to do (and no model loads)
    res = cli("transcribe", "scans/", "--out", "transcripts/", *same_options(tiny_model))
    assert res.exit_code == 0 and "nothing left to do" in res.stderr, res.stderr
    assert "0 pages transcribed, 3 already done, 0 failed, 1 files skipped (not documents)" in res.stderr
    # and what the CLI writes for these pages is what the library wrote
    res = cli("transcribe", "scans/", "--out", "cli.jsonl", *same_options(tiny_model))
    assert res.exit_code == 0, res.stderr
    with open("cli.jsonl") as f:
        assert sorted(map(essence, map(json.loads, f))) == sorted(map(essence, written))
    assert [PageRecord.from_dict(r).to_dict() for r in written] == written


def test_without_out_nothing_is_written_and_records_are_yielded(engine, scans, capsys):
    before = sorted(os.listdir("."))
    records = list(Model(engine).transcribe("scans/invoice.pdf", pages="2"))
    assert [(r.path, r.page, r.pages, r.status) for r in records] == [("scans/invoice.pdf", 2, 2, "ok")]
    assert sorted(os.listdir(".")) == before
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""  # a library run prints nothing


def test_a_run_left_early_is_closed_and_the_next_one_resumes(engine, scans):
    transcription = Model(engine).transcribe(["scans/"], out="pages.jsonl", batch_size=1)
    first = next(iter(transcription))
    assert os.path.exists("pages.jsonl.lock")
    transcription.close()  # the output is closed and unlocked now
    assert not os.path.exists("pages.jsonl.lock")
    with Model(engine).transcribe(["scans/"], out="pages.jsonl", batch_size=1) as rest:
        later = list(rest)
    assert rest.summary.skipped >= 1 and rest.exit_status == 0
    done = [(r.path, r.page) for r in [first, *later]]
    assert sorted(done) == [("scans/invoice.pdf", 1), ("scans/invoice.pdf", 2), ("scans/page-1.png", 1)]


@pytest.mark.parametrize("out", ["pages.jsonl", "folder/"])
def test_a_resumed_run_records_every_copy_of_the_same_bytes(engine, tmp_path, monkeypatch, out):
    """Copies of one file: a resumed run skips their pages (same sha256) but still records each copy under its own
    path, as a run that was never interrupted does."""
    monkeypatch.chdir(tmp_path)
    os.mkdir("many")
    make_image(seed=3).save("many/r1.png")
    with Model(engine).transcribe(["many/"], out=out) as run:
        (first,) = list(run)
    for k in (2, 3, 4):
        shutil.copy("many/r1.png", f"many/r{k}.png")
    with Model(engine).transcribe(["many/"], out=out) as rest:
        assert list(rest) == [] and rest.summary.skipped == 4 and rest.exit_status == 0
    records = read_records(out)
    assert [r["path"] for r in records] == [f"many/r{k}.png" for k in (1, 2, 3, 4)]
    assert [essence({**r, "path": ""}) for r in records] == [essence({**first.to_dict(), "path": ""})] * 4
    if out.endswith("/"):  # each copy's Markdown holds the text
        texts = {open(f"folder/r{k}.md").read() for k in (1, 2, 3, 4)}
        assert len(texts) == 1 and first.text.strip() in texts.pop()
    with Model(engine).transcribe(["many/"], out=out) as again:  # once recorded, never again
        assert list(again) == [] and again.summary.skipped == 4
    assert len(read_records(out)) == 4


def read_records(out: str) -> list[dict]:
    with open(os.path.join(out, "records.jsonl") if out.endswith("/") else out) as f:
        return [json.loads(line) for line in f]


def test_missing_inputs_and_bad_documents_set_the_exit_status(engine, scans):
    (scans / "broken.pdf").write_bytes(b"%PDF-1.7\ngarbage")
    transcription = Model(engine).transcribe(["scans/broken.pdf", "nowhere.pdf", "scans/*.xyz"])
    records = list(transcription)
    # an input that matched nothing has its error record as well (page 0), first
    assert [(r.path, r.page, r.status, r.error["code"]) for r in records] == [
        ("nowhere.pdf", 0, "error", "not_found"), ("scans/*.xyz", 0, "error", "not_found"),
        ("scans/broken.pdf", 0, "error", "corrupt")]
    assert [e.code for e in transcription.errors] == ["not_found"] * 2 and transcription.exit_status == 4
    assert transcription.summary.failed == 3
    transcription = Model(engine).transcribe(["nowhere.pdf"], out="missing.jsonl")
    assert [r.error["code"] for r in transcription] == ["not_found"] and transcription.exit_status == 4
    assert [json.loads(line)["path"] for line in open("missing.jsonl")] == ["nowhere.pdf"]
    # with a page done, the missing input makes the run partial, and the records say why
    transcription = Model(engine).transcribe(["scans/page-1.png", "nowhere.pdf"])
    assert [r.status for r in transcription] == ["error", "ok"] and transcription.exit_status == 3


@pytest.mark.parametrize("fields,message", [
    ({"batch_size": "0"}, "bad --batch-size"), ({"batch_size": 0}, "bad --batch-size"),
    ({"batch_size": "many"}, "bad --batch-size"), ({"engine": "spark"}, "unknown --engine"),
    ({"pages": "3-1"}, "runs backwards"), ({"shard": "3/3"}, "bad --shard"),
])
def test_a_bad_request_is_a_usage_error_when_it_is_made(fields, message):
    with pytest.raises(UsageError, match=message):
        TranscribeRequest(("scans/",), **fields)


def test_the_settings_hash_is_the_resume_key_of_earlier_versions_and_only_what_changes_text_changes_it():
    options = ModelOptions(model="m", quant="4bit", split=True, max_new_tokens=1024)
    request = TranscribeRequest(["a.pdf"], options=options)
    # the formula records written by earlier versions carry: they must still resume
    assert request.settings_hash == settings_hash(model="m", revision=None, quant="4bit", split=True, render=1960,
                                                  render_unit="longest_side", prompt=request.prompt,
                                                  max_new_tokens=1024)
    assert request.inputs == ("a.pdf",) and request.batch_size is None
    for same in ({"batch_size": 4}, {"force": True}, {"out": "x.jsonl"}, {"pages": "2"}, {"shard": "0/2"},
                 {"password": "pw"}, {"engine": "ray"}):
        assert replace(request, **same).settings_hash == request.settings_hash, same
    changed = [replace(request, prompt="Read it."), replace(request, dpi=150),
               replace(request, options=replace(options, split=False)),
               replace(request, options=replace(options, max_new_tokens=8)),
               replace(request, options=replace(options, quant="none"))]
    assert len({r.settings_hash for r in changed} | {request.settings_hash}) == len(changed) + 1


def test_a_loaded_model_takes_no_engine_keyword(engine):
    """A loaded model transcribes locally: `engine=` is not among transcribe()'s keywords (docs/python.md)."""
    with pytest.raises(UsageError, match="takes no engine") as caught:
        Model(engine).transcribe(["scans/"], engine="ray")
    assert "batch_size" in caught.value.hint


def test_the_first_batch_is_prepared_while_the_weights_load(engine, tiny_model, scans, monkeypatch):
    """Loaded by the run itself (CPU: batch size 8 known beforehand), its first batch is rendered and prepared by
    the processor alone before the load finishes; the records equal a run on an already loaded engine."""
    import threading

    from idefics_cli.runtime import engine as engine_mod
    from idefics_cli.runtime import model as model_mod

    prepared, seen = threading.Event(), []
    real_prepare, real_finish = engine_mod.Preparer.prepare, model_mod.Loading.finish

    def prepare(self, batch, *args, **kwargs):
        out = real_prepare(self, batch, *args, **kwargs)
        seen.append((type(self).__name__, len(batch)))
        prepared.set()
        return out

    def finish(self):
        assert prepared.wait(60), "no batch was prepared while the weights loaded"
        return real_finish(self)

    monkeypatch.setattr(engine_mod.Preparer, "prepare", prepare)
    monkeypatch.setattr(model_mod.Loading, "finish", finish)
    options = replace(engine.options, max_new_tokens=8)
    request = TranscribeRequest(inputs=["scans/"], options=options)
    from idefics_cli.tasks.transcription import Transcription

    early = [r.to_dict() for r in Transcription(request)]
    assert seen[0] == ("Preparer", 3)  # the whole first batch (3 pages here), by the processor alone
    monkeypatch.setattr(model_mod.Loading, "finish", real_finish)
    loaded = [r.to_dict() for r in Transcription(request, engine=engine)]
    assert [essence(r) for r in early] == [essence(r) for r in loaded] and len(early) == 3
    assert all(r["status"] == "ok" for r in early)


def test_a_failed_load_stops_the_prefetch_it_overlapped(tiny_model, scans, tmp_path):
    import shutil
    import threading

    from idefics_cli.errors import IdeficsError
    from idefics_cli.tasks.transcription import Transcription

    folder = tmp_path / "broken-model"
    shutil.copytree(tiny_model, folder)
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    options = ModelOptions(model=str(folder), device="cpu", quant="none", max_new_tokens=8)
    with pytest.raises(IdeficsError) as info:
        list(Transcription(TranscribeRequest(inputs=["scans/"], options=options)))
    assert info.value.code == "model_error"
    assert not [t for t in threading.enumerate() if t.name == "idefics-prefetch"]


def test_rows_of_mixed_lengths_keep_page_order_and_resume(engine, tmp_path, monkeypatch):
    """Continuous batching: pages ending at different lengths (2 and 9 new tokens, alternating) come back in page
    order with the texts of a run one page at a time, and a run stopped early resumes where it was."""
    from idefics_cli.runtime.engine import LocalEngine

    real = LocalEngine.rows
    made = []

    def rows(self, inputs, max_new_tokens=None, logits_processor=None, schema=None):
        out = real(self, inputs, max_new_tokens, logits_processor, schema)
        for row in out:  # the k-th page of the run (pages are prepared in order): short, long, short, ...
            row.max_tokens = 2 if len(made) % 2 == 0 else 9
            made.append(row)
        return out

    monkeypatch.setattr(LocalEngine, "rows", rows)
    pdf = make_pdf(tmp_path / "mixed.pdf", 7)
    model = Model(engine)
    alone = [(r.page, r.text) for r in model.transcribe(pdf, batch_size=1)]
    made.clear()
    together = [(r.page, r.text) for r in model.transcribe(pdf, batch_size=3)]
    assert together == alone and [page for page, _ in together] == list(range(1, 8))
    assert {len(t) for _, t in alone} != {len(alone[0][1])}  # the lengths really differ
    out = tmp_path / "pages.jsonl"
    made.clear()
    with model.transcribe(pdf, out=str(out), batch_size=3) as first:
        for record in first:
            if record.page == 3:
                break  # stopped early: pages 1-3 written
    made.clear()
    rest = list(model.transcribe(pdf, out=str(out), batch_size=3))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.page for r in rest] == [4, 5, 6, 7] and [r["page"] for r in lines] == list(range(1, 8))


@pytest.mark.parametrize("batch_size", [None, 2])
def test_records_follow_the_read_order_whatever_the_batches(engine, tmp_path, monkeypatch, batch_size):
    """A blank page and a file that cannot be read are settled at once, and the prefetcher groups pages by size
    into batches; the records still come out in the order the files and pages were read (batching.md)."""
    monkeypatch.chdir(tmp_path)
    os.mkdir("d")
    make_image(200, 300, seed=1).save("d/a.png")
    Image.new("RGB", (200, 100), "white").save("d/b.png")  # blank: no model
    make_image(300, 200, seed=2).save("d/c.png")  # another size than a's: c and e make a batch of 2 first
    open("d/d.pdf", "wb").close()  # empty: an error record
    make_image(300, 200, seed=3).save("d/e.png")
    make_image(200, 300, seed=4).save("d/f.png")
    with Model(engine).transcribe(["d/"], out="out.jsonl", batch_size=batch_size) as run:
        yielded = [(r.path, r.status) for r in run]
    assert yielded == [("d/a.png", "ok"), ("d/b.png", "ok"), ("d/c.png", "ok"), ("d/d.pdf", "error"),
                       ("d/e.png", "ok"), ("d/f.png", "ok")]
    assert [(r["path"], r["status"]) for r in read_records("out.jsonl")] == yielded


def test_a_prompt_over_the_context_is_refused_before_any_page(engine, tiny_model, scans, cli, monkeypatch):
    """As `ask` does (and a server does for each page): the prompt and its schema must fit the model's context, with
    one page and --max-new-tokens; over it, one usage line (exit 2) once the model is loaded, and no record."""
    with monkeypatch.context() as patch, pytest.raises(UsageError, match="more than the model's context of 200"):
        patch.setattr(engine, "context_size", 200)
        list(Model(engine).transcribe(["scans/page-1.png"], out="over.jsonl", schema="vendor, total float"))
    assert not os.path.exists("over.jsonl") or open("over.jsonl").read() == ""
    result = cli("transcribe", "scans/page-1.png", *same_options(tiny_model), "--prompt", "Read it. " * 12000)
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error [usage]: ") and "--prompt" in lines[0], lines


def test_a_loaded_model_transcribes_as_the_command_does_and_resumes_its_records(tiny_model, tmp_path, monkeypatch):
    """`load()` without max_new_tokens: transcribe answers up to the command's 1024 new tokens a page (ask keeps
    512), so a library run resumes the records of a plain `idefics transcribe`; one given applies to both."""
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (600, 800), "white").save("blank.png")  # a blank page: recorded without generating
    res = run_idefics("transcribe", "blank.png", "--out", "pages.jsonl", "--model", tiny_model, "--quant", "none",
                      "--device", "cpu")
    assert res.returncode == 0 and len(read_records("pages.jsonl")) == 1, res.stderr
    model = idefics_cli.load(tiny_model, quant="none", device="cpu")
    assert model.options.max_new_tokens == 512  # ask's and chat's
    with model.transcribe(["blank.png"], out="pages.jsonl") as run:
        assert run.request.options.max_new_tokens == 1024
        assert list(run) == [] and run.summary.skipped == 1  # the command's record, resumed
    given = idefics_cli.load(tiny_model, quant="none", device="cpu", max_new_tokens=8)
    assert given.options.max_new_tokens == 8 and given.transcribe(["blank.png"]).request.options.max_new_tokens == 8

