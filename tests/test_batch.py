"""batch.py: walking inputs, shards, resume keys."""

from __future__ import annotations

import hashlib
import os

import pytest

from idefics_cli.errors import IdeficsError, UsageError
from idefics_cli.tasks import batch


def touch(root, *names) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def rels(docs) -> list[str]:
    return [d.rel for d in docs]


def test_walk_recurses_sorted_and_skips_hidden(tmp_path):
    root = tmp_path / "in"
    touch(root, "b.pdf", "a.png", "sub/deeper/c.tiff", "sub/z.jpg", ".hidden.pdf", ".git/config", "sub/.cache/x.pdf")
    docs, missing = batch.walk([str(root)])
    assert not missing
    assert rels(docs) == ["a.png", "b.pdf", "sub/deeper/c.tiff", "sub/z.jpg"]
    assert [d.path for d in docs] == [os.path.join(str(root), r) for r in rels(docs)]


def test_walk_order_does_not_depend_on_creation_order(tmp_path):
    names = ["m.pdf", "a/b.pdf", "Z.pdf", "a.pdf", "é.pdf", "a b.pdf", "10.pdf", "9.pdf"]
    touch(tmp_path / "one", *names)
    touch(tmp_path / "two", *reversed(names))
    one, _ = batch.walk([str(tmp_path / "one")])
    two, _ = batch.walk([str(tmp_path / "two")])
    assert rels(one) == rels(two) == sorted(names)
    assert batch.walk([str(tmp_path / "one")]) == (one, [])


def test_walk_survives_a_symlink_loop_and_lists_files_once(tmp_path):
    root = tmp_path / "in"
    touch(root, "a.pdf", "sub/b.pdf")
    os.symlink("..", root / "sub" / "loop")  # sub/loop -> in
    os.symlink(root / "a.pdf", root / "alias.pdf")  # the same file under another name
    docs, missing = batch.walk([str(root)])
    assert not missing
    real = [os.path.realpath(d.path) for d in docs]
    assert len(real) == len(set(real)) == 2
    assert sorted(real) == sorted(os.path.realpath(root / n) for n in ("a.pdf", "sub/b.pdf"))


def test_walk_follows_a_symlinked_folder_once(tmp_path):
    touch(tmp_path / "elsewhere", "x.pdf")
    root = tmp_path / "in"
    root.mkdir()
    os.symlink(tmp_path / "elsewhere", root / "linked")
    docs, _ = batch.walk([str(root)])
    assert rels(docs) == ["linked/x.pdf"]


def test_walk_globs(tmp_path):
    root = tmp_path / "in"
    touch(root, "a.pdf", "b.png", "sub/c.pdf", "sub/deep/d.pdf", "sub/e.png")
    docs, missing = batch.walk([str(root / "**" / "*.pdf")])
    assert not missing
    assert rels(docs) == ["a.pdf", "sub/c.pdf", "sub/deep/d.pdf"]  # relative to the fixed part of the pattern
    docs, _ = batch.walk([str(root / "sub" / "*.png")])
    assert rels(docs) == ["e.png"]
    docs, _ = batch.walk([str(root / "?.p[dn]*")])
    assert rels(docs) == ["a.pdf", "b.png"]


def test_walk_mixed_inputs_are_deduplicated(tmp_path):
    root = tmp_path / "in"
    touch(root, "a.pdf", "sub/b.pdf")
    docs, missing = batch.walk([str(root), str(root / "a.pdf"), str(root / "**" / "*.pdf")])
    assert not missing
    assert sorted(os.path.realpath(d.path) for d in docs) == sorted(
        os.path.realpath(root / n) for n in ("a.pdf", "sub/b.pdf"))


def test_a_folder_holding_a_file_and_a_link_to_it_gives_the_file_once(tmp_path):
    touch(tmp_path, "three.pdf")
    os.symlink("three.pdf", tmp_path / "link.pdf")  # sorts first, but names the same document
    docs, missing = batch.walk([str(tmp_path)])
    assert rels(docs) == ["three.pdf"] and not missing


def test_walk_reports_missing_paths_and_empty_globs(tmp_path):
    touch(tmp_path, "real.pdf")
    docs, missing = batch.walk([str(tmp_path / "real.pdf"), str(tmp_path / "nope.pdf"), str(tmp_path / "*.xyz")])
    assert rels(docs) == ["real.pdf"]
    assert [(e.code, e.path) for e in missing] == [("not_found", str(tmp_path / "nope.pdf")),
                                                   ("not_found", str(tmp_path / "*.xyz"))]
    assert all(isinstance(e, IdeficsError) and e.message for e in missing)


def test_walk_a_file_whose_name_has_glob_characters(tmp_path):
    touch(tmp_path, "report [draft].pdf")
    docs, missing = batch.walk([str(tmp_path / "report [draft].pdf")])
    assert not missing and rels(docs) == ["report [draft].pdf"]


def test_walk_stdin():
    docs, missing = batch.walk(["-"])
    assert docs == [batch.Input("-", "stdin")] and not missing


@pytest.mark.parametrize("spec, expected", [(None, None), ("0/1", (0, 1)), ("0/3", (0, 3)),
                                            ("2/3", (2, 3)), (" 1 / 4 ", (1, 4))])
def test_parse_shard(spec, expected):
    assert batch.parse_shard(spec) == expected


@pytest.mark.parametrize("spec", ["", "  ", "3/3", "-1/3", "1/0", "0/0", "a/b", "1", "1/2/3", "1.5/3", "/3", "1/",
                                  "\u0661/\u0662", "+0/+2", "0_0/2_0", "1/" + "9" * 5000, 5, (0, 2), b"0/2"])
def test_parse_shard_errors(spec):
    with pytest.raises(UsageError) as exc:  # ASCII digits only, as --pages; never a TypeError from a non-string
        batch.parse_shard(spec)
    assert exc.value.code == "usage" and exc.value.exit_status == 2 and "I/N" in exc.value.hint
    assert len(exc.value.message) < 60  # a huge spec is not echoed whole


def test_in_shard_partitions():
    names = [f"dir/{k}.pdf" for k in range(100)]
    for n in (1, 2, 5):
        owners = [[i for i in range(n) if batch.in_shard(name, i, n)] for name in names]
        assert all(len(o) == 1 for o in owners)
    assert batch.in_shard(os.fsdecode(b"odd\xff.pdf"), 0, 1)  # non-UTF-8 names hash too


def test_walk_keeps_the_order_of_explicit_inputs_and_sorts_only_expansions(tmp_path):
    touch(tmp_path, "report.pdf", "receipt.jpg", "scans/b.png", "scans/a.png", "more/z.pdf", "more/y.pdf")
    docs, missing = batch.walk([str(tmp_path / "report.pdf"), str(tmp_path / "scans"), str(tmp_path / "receipt.jpg"),
                                str(tmp_path / "more" / "*.pdf"), "-"])
    assert not missing
    assert [d.path for d in docs] == [str(tmp_path / "report.pdf"), str(tmp_path / "scans" / "a.png"),
                                      str(tmp_path / "scans" / "b.png"), str(tmp_path / "receipt.jpg"),
                                      str(tmp_path / "more" / "y.pdf"), str(tmp_path / "more" / "z.pdf"), "-"]
    docs, _ = batch.walk([str(tmp_path / "receipt.jpg"), str(tmp_path / "report.pdf")])
    assert rels(docs) == ["receipt.jpg", "report.pdf"]


def test_walk_skips_what_an_expansion_meets_that_is_not_a_document(tmp_path):
    """By extension, then magic bytes; a file named explicitly is kept, whatever it is."""
    touch(tmp_path / "in", "a.pdf", "README.md", "make_samples.py", "notes.txt")
    (tmp_path / "in" / "scan-without-extension").write_bytes(b"%PDF-1.7\n...")
    (tmp_path / "in" / "photo.data").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 16)
    skipped: list[str] = []
    docs, missing = batch.walk([str(tmp_path / "in")], skipped)
    assert not missing
    assert rels(docs) == ["a.pdf", "photo.data", "scan-without-extension"]
    assert sorted(os.path.basename(p) for p in skipped) == ["README.md", "make_samples.py", "notes.txt"]
    skipped.clear()
    docs, _ = batch.walk([str(tmp_path / "in" / "*")], skipped)
    assert rels(docs) == ["a.pdf", "photo.data", "scan-without-extension"] and len(skipped) == 3
    skipped.clear()
    docs, _ = batch.walk([str(tmp_path / "in" / "README.md")], skipped)
    assert rels(docs) == ["README.md"] and skipped == []


def test_needs_model_stops_at_the_first_document_with_work_left(tmp_path):
    from conftest import make_pdf

    from idefics_cli.documents import open_document

    a, b = make_pdf(tmp_path / "a.pdf", 2), make_pdf(tmp_path / "b.pdf", 1, size=(200, 100))
    (tmp_path / "bad.pdf").write_bytes(b"not a pdf")
    docs, _ = batch.walk([a, str(tmp_path / "bad.pdf"), b])
    sha = {d.path: open_document(d.path).sha256 for d in docs if d.path != str(tmp_path / "bad.pdf")}
    opened = []

    def open_doc(path):
        opened.append(os.path.basename(path))
        return open_document(path)

    def select(doc):
        return list(range(1, doc.page_count + 1))

    done = {(sha[a], 1), (sha[a], 2), (sha[b], 1)}
    assert batch.needs_model(docs, open_doc, select, lambda s, p: (s, p) in done) is False
    assert opened == ["a.pdf", "bad.pdf", "b.pdf"]
    opened.clear()
    assert batch.needs_model(docs, open_doc, select, lambda s, p: (s, p) in done - {(sha[a], 2)}) is True
    assert opened == ["a.pdf"]
    assert batch.needs_model([batch.Input("-", "stdin")], open_doc, select, lambda s, p: True) is True


def _touch_tree(root, names) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_shards_cover_everything_once_and_are_stable_when_files_are_added(tmp_path):
    root = tmp_path / "corpus"
    _touch_tree(root, [f"doc{k:02d}.pdf" for k in range(20)] + [f"sub/dir/scan {k}.png" for k in range(10)]
                + ["é文件.pdf", "sub/ünï.tiff"])
    docs, missing = batch.walk([str(root)])
    assert not missing and len(docs) == 32
    rels = {d.rel for d in docs}
    shards = [{d.rel for d in docs if batch.in_shard(d.rel, i, 3)} for i in range(3)]
    assert set().union(*shards) == rels
    assert sum(len(s) for s in shards) == len(rels)  # disjoint
    assert all(shards), "32 documents over 3 shards: none should be empty"

    _touch_tree(root, ["doc99.pdf", "sub/new one.png", "aaa.pdf"])
    docs2, _ = batch.walk([str(root)])
    assert len(docs2) == 35
    rel_of = {d.path: d.rel for d in docs2}
    for d in docs:
        assert rel_of[d.path] == d.rel
        assert [i for i in range(3) if batch.in_shard(rel_of[d.path], i, 3)] == \
               [i for i in range(3) if batch.in_shard(d.rel, i, 3)]
    # the rule is the documented one: sha1(relative path) % N
    for d in docs2:
        assert batch.in_shard(d.rel, int(hashlib.sha1(d.rel.encode()).hexdigest(), 16) % 3, 3)


def test_walk_keeps_a_cbz_or_xps_without_its_extension_whatever_its_size(tmp_path):
    """A ZIP container is judged by the names in its directory, at the end of the file: a comic saved as .zip is
    a document however large, and a ZIP of other files is skipped."""
    import io
    import zipfile

    def zipped(path, entries):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as archive:
            for name, data in entries:
                archive.writestr(name, data)
        path.write_bytes(buf.getvalue())

    (tmp_path / "in").mkdir()
    zipped(tmp_path / "in" / "comic.zip", [(f"{i:03}.png", os.urandom(600)) for i in range(4)])
    zipped(tmp_path / "in" / "source.zip", [("main.py", os.urandom(2000))])
    assert os.path.getsize(tmp_path / "in" / "comic.zip") > 2048
    skipped: list[str] = []
    docs, _ = batch.walk([str(tmp_path / "in")], skipped)
    assert rels(docs) == ["comic.zip"] and [os.path.basename(p) for p in skipped] == ["source.zip"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_walk_skips_a_named_pipe_a_folder_holds_instead_of_waiting_on_it(tmp_path):
    """A FIFO (or socket, device) met in a folder is not a document: skipped and counted, never opened (reading
    it would wait forever); one named explicitly is read, as `<(cat doc.pdf)` is."""
    touch(tmp_path / "in", "a.pdf")
    os.mkfifo(tmp_path / "in" / "pipe.pdf")
    skipped: list[str] = []
    docs, _ = batch.walk([str(tmp_path / "in")], skipped)
    assert rels(docs) == ["a.pdf"] and [os.path.basename(p) for p in skipped] == ["pipe.pdf"]
    docs, _ = batch.walk([str(tmp_path / "in" / "pipe.pdf")])
    assert rels(docs) == ["pipe.pdf"]


def test_walk_reports_a_folder_it_cannot_read_instead_of_leaving_it_out(tmp_path):
    """os.walk passes over a folder it cannot list (unreadable, or a path past PATH_MAX as here, where root reads
    anything): its documents were left out of the run without a word, and the run exited 0. The folder now gets an
    error (an error record, page 0), as an input that matches nothing does."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    fd = os.open(folder, os.O_RDONLY)
    for _ in range(21):  # 21 names of 200 bytes: past PATH_MAX (4096)
        os.mkdir("d" * 200, dir_fd=fd)
        fd, old = os.open("d" * 200, os.O_RDONLY, dir_fd=fd), fd
        os.close(old)
    os.close(os.open("deep.png", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    os.close(fd)
    docs, errors = batch.walk([str(folder)])
    assert [d.rel for d in docs] == ["a.png"]
    assert len(errors) == 1 and errors[0].code == "not_found" and errors[0].path.endswith("d" * 200)
    assert "cannot read the folder" in errors[0].message
