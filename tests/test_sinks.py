"""writers.py sinks: which sink an `--out` gets, and that a sink's lock lives exactly as long as the sink."""

from __future__ import annotations

import json
import os

import pytest

from idefics_cli.errors import UsageError
from idefics_cli.tasks.batch import DocumentDone, Input
from idefics_cli.tasks.writers import FolderSink, JsonlSink, NullSink, open_sink


def test_open_sink_picks_by_name(tmp_path):
    docs = [Input(str(tmp_path / "a.pdf"), "a.pdf")]
    with open_sink(str(tmp_path / "r.jsonl"), docs, "s") as sink:
        assert type(sink) is JsonlSink
    with open_sink(str(tmp_path / "out.v2") + "/", docs, "s") as sink:
        assert type(sink) is FolderSink
    with open_sink(str(tmp_path / "plain"), docs, "s") as sink:
        assert type(sink) is FolderSink
    with pytest.raises(UsageError, match="neither a .jsonl file nor a folder"):
        open_sink(str(tmp_path / "notes.md"), docs, "s")
    assert sorted(os.listdir(tmp_path)) == ["out.v2", "plain", "r.jsonl"]  # and no lock file is left


def test_a_sink_holds_its_lock_until_closed_and_a_second_one_is_refused(tmp_path):
    path = str(tmp_path / "r.jsonl")
    with JsonlSink(path) as sink:
        sink.write({"status": "ok", "page": 1})
        with pytest.raises(UsageError, match="another idefics process is writing to"):
            JsonlSink(path)
        assert os.path.exists(path + ".lock")
    assert not os.path.exists(path + ".lock")
    with JsonlSink(path) as again:  # free again, and it reads back what was written
        assert again.existing == [{"status": "ok", "page": 1}]


def test_a_link_to_a_locked_records_file_is_refused_too(tmp_path):
    """The lock sat beside the name given, so `--out link.jsonl` and `--out pages.jsonl` (its target) both ran."""
    path, link = str(tmp_path / "pages.jsonl"), str(tmp_path / "link.jsonl")
    os.symlink(path, link)
    with JsonlSink(link):
        with pytest.raises(UsageError, match="another idefics process is writing to"):
            JsonlSink(path)
    assert os.path.islink(link) and sorted(os.listdir(tmp_path)) == ["link.jsonl", "pages.jsonl"]


def test_folder_sink_writes_markdown_from_this_run_and_earlier_records(tmp_path):
    doc = Input(str(tmp_path / "in" / "a.pdf"), "sub/a.pdf")
    record = {"path": doc.path, "page": 1, "status": "ok", "text": "one", "sha256": "h", "settings": "s"}
    with FolderSink(str(tmp_path / "out"), [doc], "s") as sink:
        sink.write(record)
    with FolderSink(str(tmp_path / "out"), [doc], "s") as sink:  # a rerun: page 1 from the file, page 2 new
        sink.write({**record, "page": 2, "text": "two"})
        sink.document_done(DocumentDone(doc, "h", [1, 2, 3], 3))
    md = (tmp_path / "out" / "sub" / "a.md").read_text()
    assert md == ("<!-- page 1 -->\n\none\n\n<!-- page 2 -->\n\ntwo\n\n"
                  "<!-- page 3: error [missing] not transcribed -->\n")
    lines = (tmp_path / "out" / "records.jsonl").read_text().splitlines()
    assert [json.loads(line)["page"] for line in lines] == [1, 2]


def test_folder_sink_writes_a_markdown_symlink_s_target(tmp_path):
    """A `.md` under `--out` that is a symlink keeps the link; its target gets the Markdown."""
    doc = Input(str(tmp_path / "a.pdf"), "a.pdf")
    (tmp_path / "out").mkdir()
    (tmp_path / "kept.md").write_text("old")
    os.symlink(tmp_path / "kept.md", tmp_path / "out" / "a.md")
    with FolderSink(str(tmp_path / "out"), [doc], "s") as sink:
        sink.write({"path": doc.path, "page": 1, "status": "ok", "text": "one", "sha256": "h", "settings": "s"})
        sink.document_done(DocumentDone(doc, "h", [1], 1))
    assert os.path.islink(tmp_path / "out" / "a.md") and "one" in (tmp_path / "kept.md").read_text()


def test_a_document_done_in_page_chunks_keeps_every_page_in_its_markdown(tmp_path):
    """`--pages 1-2`, then `--pages 3`: the .md holds pages 1 to 3, in page order, not only the last run's."""
    doc = Input(str(tmp_path / "a.pdf"), "a.pdf")
    record = {"path": doc.path, "status": "ok", "sha256": "h", "settings": "s"}
    for chosen in ([2, 1], [3]):
        with FolderSink(str(tmp_path / "out"), [doc], "s") as sink:
            for page in chosen:
                sink.write({**record, "page": page, "text": f"text {page}"})
            sink.document_done(DocumentDone(doc, "h", chosen, 3))
        md = (tmp_path / "out" / "a.md").read_text()
        if chosen == [2, 1]:  # one run: its own order
            assert md.index("text 2") < md.index("text 1") and "text 3" not in md
    assert md.index("text 1") < md.index("text 2") < md.index("text 3"), md


def test_one_relative_path_under_two_folders_gets_two_markdown_files(tmp_path):
    """`transcribe ca cb` with ca/x/doc.pdf and cb/x/doc.pdf: the second document's .md is "x/doc (2).md", not
    written over the first's."""
    docs = [Input(str(tmp_path / "ca" / "x" / "doc.pdf"), "x/doc.pdf"), Input(str(tmp_path / "cb" / "x" / "doc.pdf"),
                                                                            "x/doc.pdf")]
    with FolderSink(str(tmp_path / "out"), docs, "s") as sink:
        for k, (doc, text) in enumerate(zip(docs, ("first", "second"))):
            sink.write({"path": doc.path, "page": 1, "status": "ok", "text": text, "sha256": f"h{k}", "settings": "s"})
            sink.document_done(DocumentDone(doc, f"h{k}", [1], 1))
    out = tmp_path / "out" / "x"
    assert sorted(os.listdir(out)) == ["doc (2).md", "doc.md"]
    assert "first" in (out / "doc.md").read_text() and "second" in (out / "doc (2).md").read_text()


def test_null_sink_keeps_nothing():
    with NullSink() as sink:
        sink.write({"status": "ok"})
        assert sink.existing == [] and sink.records_name is None


def test_two_names_that_write_the_same_markdown_name_get_two_files(tmp_path):
    """`a\\nb.bmp` and `a_b.png` are told apart on disk, but the .md names they turn into (a newline is written as
    `_`) are one: the second gets "a_b (2).md" rather than writing over the first's."""
    docs = [Input(str(tmp_path / "in" / "a\nb.bmp"), "a\nb.bmp"), Input(str(tmp_path / "in" / "a_b.png"), "a_b.png")]
    with FolderSink(str(tmp_path / "out"), docs, "s") as sink:
        for k, (doc, text) in enumerate(zip(docs, ("first", "second"))):
            sink.write({"path": doc.path, "page": 1, "status": "ok", "text": text, "sha256": f"h{k}", "settings": "s"})
            sink.document_done(DocumentDone(doc, f"h{k}", [1], 1))
    out = tmp_path / "out"
    assert sorted(n for n in os.listdir(out) if n.endswith(".md")) == ["a_b (2).md", "a_b.md"]
    assert "first" in (out / "a_b.md").read_text() and "second" in (out / "a_b (2).md").read_text()
