"""writers.py: the records log (append, repair, read back), atomic files and the output lock."""

from __future__ import annotations

import json
import os

import pytest

from idefics_cli.errors import IdeficsError, UsageError
from idefics_cli.tasks.writers import JsonlSink, OutputLock, atomic_write, safe_join


def test_record_log_appends_one_line_per_record_and_reads_them_back(tmp_path):
    path = str(tmp_path / "r.jsonl")
    log = JsonlSink(path)
    assert log.existing == []
    records = [{"page": 1, "text": "é文件 \"quoted\"\nnew line"}, {"page": 2, "text": None}]
    for r in records:
        log.write(r)
    log.close()
    data = open(path, "rb").read()
    assert data.count(b"\n") == 2 and data.endswith(b"\n")
    assert "é文件".encode() in data  # UTF-8, not \u escapes
    again = JsonlSink(path)
    assert again.existing == records
    again.write({"page": 3})
    again.close()
    with JsonlSink(path) as last:
        assert last.existing == [*records, {"page": 3}]


def test_record_log_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"page": 1}\n{"page": 2}\n{"page": 3, "te')
    log = JsonlSink(str(path))
    assert log.existing == [{"page": 1}, {"page": 2}]
    assert path.read_bytes() == b'{"page": 1}\n{"page": 2}\n'  # repaired on disk before appending
    log.write({"page": 3})
    log.close()
    assert path.read_bytes() == b'{"page": 1}\n{"page": 2}\n{"page": 3}\n'


def test_record_log_keeps_a_whole_last_record_that_only_lacks_its_newline(tmp_path):
    """A records file saved by an editor that drops the final newline: its last record, whole, was cut off the file
    as if torn by a crash (and its page done again). It is kept, and the newline added before appending."""
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"page": 1}\n{"page": 2}')
    with JsonlSink(str(path)) as log:
        assert log.existing == [{"page": 1}, {"page": 2}]
        log.write({"page": 3})
    assert path.read_bytes() == b'{"page": 1}\n{"page": 2}\n{"page": 3}\n'


def test_record_log_whole_file_torn(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"page": 1, "st')
    log = JsonlSink(str(path))
    assert log.existing == [] and path.read_bytes() == b""
    log.close()


def test_record_log_skips_bad_lines_but_keeps_them(tmp_path):
    path = tmp_path / "r.jsonl"
    content = b'{"page": 1}\nnot json\n[1, 2]\n\n"a string"\n{"page": 2}\n'
    path.write_bytes(content)
    log = JsonlSink(str(path))
    assert log.existing == [{"page": 1}, {"page": 2}]
    log.close()
    assert path.read_bytes() == content  # only a torn tail is ever removed


def test_record_log_escapes_non_utf8_names(tmp_path):
    path = str(tmp_path / "r.jsonl")
    name = os.fsdecode(b"scan\xff.pdf")  # a file name that is not UTF-8 (surrogateescape)
    log = JsonlSink(path)
    log.write({"path": name, "text": "é"})
    log.close()
    data = open(path, "rb").read()
    data.decode("utf-8")  # the file stays valid UTF-8
    with JsonlSink(path) as again:
        assert again.existing == [{"path": name, "text": "é"}]  # and round-trips the real name


def test_record_log_in_an_unmakeable_folder_is_an_output_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(IdeficsError) as exc:
        JsonlSink(str(tmp_path / "file" / "r.jsonl"))
    assert exc.value.code == "output_error" and exc.value.path.endswith("r.jsonl")


def test_atomic_write_replaces_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "doc.md"
    atomic_write(str(path), "first\n")
    atomic_write(str(path), "second é\n")
    assert path.read_text(encoding="utf-8") == "second é\n"
    assert os.listdir(tmp_path / "sub") == ["doc.md"]


def test_atomic_write_failure_leaves_no_temp_and_keeps_old_content(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()  # a folder where the file should go: the rename fails
    (target / "inside").write_text("x")
    with pytest.raises(IdeficsError) as exc:
        atomic_write(str(target), "text")
    assert exc.value.code == "output_error"
    assert sorted(os.listdir(tmp_path)) == ["taken"] and os.listdir(target) == ["inside"]


def test_atomic_write_through_a_symlink_keeps_the_link_and_replaces_its_target(tmp_path):
    """As `>` does: the link stays and its target gets the text, renamed onto it (a new inode), the temporary file
    beside the target; a dangling link makes its target; a loop of links is one output_error."""
    (tmp_path / "data").mkdir()
    target, link = tmp_path / "data" / "chat.json", tmp_path / "link.json"
    target.write_text("old")
    link.symlink_to(os.path.join("data", "chat.json"))
    inode = target.stat().st_ino
    atomic_write(str(link), "new")
    assert link.is_symlink() and os.readlink(link) == os.path.join("data", "chat.json")
    assert target.read_text() == "new" and target.stat().st_ino != inode
    assert sorted(os.listdir(tmp_path)) == ["data", "link.json"] and os.listdir(tmp_path / "data") == ["chat.json"]

    dangling = tmp_path / "dangling.md"
    dangling.symlink_to(tmp_path / "data" / "made.md")
    atomic_write(str(dangling), "made")
    assert dangling.is_symlink() and (tmp_path / "data" / "made.md").read_text() == "made"

    loop = tmp_path / "loop.md"
    loop.symlink_to(loop)
    with pytest.raises(IdeficsError) as exc:
        atomic_write(str(loop), "x")
    assert exc.value.code == "output_error" and "symbolic links" in exc.value.message and loop.is_symlink()


def test_atomic_write_to_a_fifo_or_device_writes_into_it_and_never_replaces_it(tmp_path):
    """`/save /dev/null` as root must not put a regular file where the device was: a FIFO or device is written into,
    as `>` does (a FIFO with its reader here, so nothing blocks)."""
    import stat

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        atomic_write(str(fifo), "through the pipe\n")
        assert stat.S_ISFIFO(os.stat(fifo).st_mode)
        assert os.read(reader, 100) == b"through the pipe\n"
    finally:
        os.close(reader)
    assert os.listdir(tmp_path) == ["pipe"]  # no temporary file left beside it


def test_output_lock_refuses_a_second_holder(tmp_path):
    lock_path = str(tmp_path / "out" / "records.jsonl.lock")
    with OutputLock(lock_path):
        with pytest.raises(UsageError) as exc:
            OutputLock(lock_path).acquire()
        err = exc.value
        assert err.code == "usage" and err.exit_status == 2
        assert str(tmp_path / "out" / "records.jsonl") in err.message and "\n" not in err.one_line()
    with OutputLock(lock_path):  # released: free again
        pass


def test_output_lock_held_by_another_process(tmp_path):
    import subprocess
    import sys

    lock_path = str(tmp_path / "records.jsonl.lock")
    code = ("import sys, time; from idefics_cli.tasks.writers import OutputLock\n"
            "with OutputLock(sys.argv[1]):\n    print('held', flush=True); sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, lock_path], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"held\n"
        with pytest.raises(IdeficsError, match="another idefics process"):
            OutputLock(lock_path).__enter__()
    finally:
        proc.communicate(b"", timeout=30)
    with OutputLock(lock_path):
        pass


def test_record_lines_are_json(tmp_path):
    path = str(tmp_path / "r.jsonl")
    log = JsonlSink(path, fsync_every=0)
    for k in range(50):
        log.write({"page": k, "text": "x" * k})
    log.close()
    lines = open(path, encoding="utf-8").read().splitlines()
    assert [json.loads(line)["page"] for line in lines] == list(range(50))


def test_output_lock_file_is_removed_when_released(tmp_path):
    lock_path = tmp_path / "records.jsonl.lock"
    with OutputLock(str(lock_path)):
        assert lock_path.exists()
    assert not lock_path.exists()
    with OutputLock(str(lock_path)):  # and it can be taken again
        with pytest.raises(IdeficsError, match="another idefics process"):
            OutputLock(str(lock_path)).__enter__()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_outputs_follow_the_umask(tmp_path, mask):
    from idefics_cli.tasks.writers import follow_umask, umask

    previous = os.umask(mask)
    try:
        assert umask() == mask
        atomic_write(str(tmp_path / "doc.md"), "text")
        JsonlSink(str(tmp_path / "records.jsonl")).close()
        (tmp_path / "weights").mkdir()
        fd = os.open(tmp_path / "weights" / "model.safetensors", os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
        follow_umask(str(tmp_path / "weights"))
    finally:
        os.umask(previous)
    expected = 0o666 & ~mask
    for name in ("doc.md", "records.jsonl", "weights/model.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


@pytest.mark.parametrize("rel", [
    "../../x", "../../../etc/passwd", "/etc/passwd", "a/../../b.md", "..", ".", "", "./../.hidden",
    "with space/my file.md", "é文件.pdf.md", "dir\\..\\..\\win.md", "nul\x00byte\n.md",
    os.fsdecode(b"bad\xff\xfename.md"), "x" * 300 + ".md",
])
def test_safe_join_stays_inside_the_root(tmp_path, rel):
    root = tmp_path / "out"
    root.mkdir()
    path = safe_join(str(root), rel)
    real_root = os.path.realpath(root)
    assert os.path.commonpath([real_root, os.path.realpath(path)]) == real_root and path != str(root)
    path.encode("utf-8")  # no lone surrogates left: the name is a valid UTF-8 file name
    atomic_write(path, "content")
    written = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files]
    assert written == [path]


def test_safe_join_keeps_ordinary_names(tmp_path):
    root = str(tmp_path)
    assert safe_join(root, "sub/my file.md") == os.path.join(root, "sub", "my file.md")
    assert safe_join(root, "é文件.md") == os.path.join(root, "é文件.md")
    assert safe_join(root, os.fsdecode(b"bad\xff.md")) == os.path.join(root, "bad\ufffd.md")


def _folder_run(out, docs, texts):
    from idefics_cli.tasks.batch import DocumentDone
    from idefics_cli.tasks.writers import FolderSink

    with FolderSink(str(out), docs, "s") as sink:
        for k, (doc, text) in enumerate(zip(docs, texts)):
            sink.write({"path": doc.path, "page": 1, "status": "ok", "text": text, "sha256": f"h{k}", "settings": "s"})
            sink.document_done(DocumentDone(doc, f"h{k}", [1], 1))
    return {n: (out / n).read_text() for n in os.listdir(out) if n != "records.jsonl"}


def test_a_document_named_like_a_numbered_copy_keeps_its_own_markdown(tmp_path):
    """`transcribe n1 n2` with n1/a.pdf, n2/a.pdf and n1/"a (2).pdf": the second a.pdf's "a (2).md" was written over
    by the third document's (or it over the second's): three documents, three .md files."""
    from idefics_cli.tasks.batch import Input

    docs = [Input("n1/a.pdf", "a.pdf"), Input("n2/a.pdf", "a.pdf"), Input("n1/a (2).pdf", "a (2).pdf")]
    written = _folder_run(tmp_path / "out", docs, ("first", "second", "third"))
    assert len(written) == 3 and sorted(written.values()) == sorted(f"<!-- page 1 -->\n\n{t}\n" for t in
                                                                    ("first", "second", "third"))


def test_long_names_give_markdown_names_within_name_max(tmp_path):
    """A name near NAME_MAX (255 bytes): `é`*125 + .jpg and + .png (one stem, so NAME.jpg.md: 257 bytes) ended the run
    with output_error; a 251-character stem lost its `.md` (cut at 200 characters). Each gets its own `.md`."""
    from idefics_cli.tasks.batch import Input

    names = ["é" * 125 + ".jpg", "é" * 125 + ".png", "L" * 251 + ".jpg", os.fsdecode(b"\xff" * 250 + b".jpg"),
             os.fsdecode(b"\xff" * 250 + b".png")]
    texts = [f"text {k}" for k in range(len(names))]
    written = _folder_run(tmp_path / "out", [Input(name, name) for name in names], texts)
    assert len(written) == len(names) and all(n.endswith(".md") and len(n.encode()) <= 255 for n in written)
    assert sorted(written.values()) == sorted(f"<!-- page 1 -->\n\n{t}\n" for t in texts)


def test_a_folder_named_like_a_document_s_markdown_does_not_end_the_run(tmp_path):
    """`a.jpg` beside a folder `a.md/` holding `z.jpg`: a.jpg's `a.md` took the name the folder needs (or the folder
    the name a.jpg's .md needs), an output_error that ended the run. The .md gets another name."""
    from idefics_cli.tasks.batch import DocumentDone, Input
    from idefics_cli.tasks.writers import FolderSink

    out = tmp_path / "out"
    docs = [Input("c/a.jpg", "a.jpg"), Input("c/a.md/z.jpg", "a.md/z.jpg")]
    with FolderSink(str(out), docs, "s") as sink:
        for k, doc in enumerate(docs):
            sink.write({"path": doc.path, "page": 1, "status": "ok", "text": f"text {k}", "sha256": f"h{k}",
                        "settings": "s"})
            sink.document_done(DocumentDone(doc, f"h{k}", [1], 1))
    written = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, files in os.walk(out) for f in files)
    assert written == ["a (2).md", "a.md/z.md", "records.jsonl"]
    assert "text 0" in (out / "a (2).md").read_text() and "text 1" in (out / "a.md" / "z.md").read_text()


def test_a_folder_named_records_jsonl_in_the_input_does_not_end_the_run(tmp_path):
    """`in/records.jsonl/r.jpg`: its .md went into out/records.jsonl/, the records file itself: an output_error that
    ended the run. It goes into `_records.jsonl/`."""
    from idefics_cli.tasks.batch import DocumentDone, Input
    from idefics_cli.tasks.writers import FolderSink

    out = tmp_path / "out"
    docs = [Input("in/records.jsonl/r.jpg", "records.jsonl/r.jpg"), Input("in/records.jsonl.lock/l.jpg",
                                                                            "records.jsonl.lock/l.jpg"),
            Input("in/records.jsonl/sub/s.jpg", "records.jsonl/sub/s.jpg")]
    with FolderSink(str(out), docs, "s") as sink:
        for k, doc in enumerate(docs):
            sink.write({"path": doc.path, "page": 1, "status": "ok", "text": f"text {k}", "sha256": f"h{k}",
                        "settings": "s"})
            sink.document_done(DocumentDone(doc, f"h{k}", [1], 1))
    assert "text 0" in (out / "_records.jsonl" / "r.md").read_text()
    assert "text 1" in (out / "_records.jsonl.lock" / "l.md").read_text()
    assert "text 2" in (out / "_records.jsonl" / "sub" / "s.md").read_text()
    assert len((out / "records.jsonl").read_text().splitlines()) == 3


def test_record_log_skips_a_line_nested_past_the_parser_s_depth(tmp_path):
    """A garbage line of 100,000 `[` (json.loads raises RecursionError, not ValueError) ended the run as internal."""
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"[" * 100_000 + b"\n" + b'{"page": 1}\n' + b"[" * 100_000)
    with JsonlSink(str(path)) as log:
        assert log.existing == [{"page": 1}]
    assert path.read_bytes() == b"[" * 100_000 + b'\n{"page": 1}\n'  # the torn tail dropped
