"""batch.py Prefetcher: what the background thread hands the model, in what order, grouped how, and when it builds."""

from __future__ import annotations

from idefics_cli.tasks import batch
from idefics_cli.tasks.batch import Prefetcher


def test_prefetch_batches_failures_and_document_order(tmp_path):
    from conftest import make_image, make_pdf

    from idefics_cli.documents import open_document

    make_pdf(tmp_path / "a.pdf", 3)
    (tmp_path / "b.txt").write_text("not a document")
    make_image(64, 48).save(tmp_path / "c.png")
    make_pdf(tmp_path / "d.pdf", 2)
    docs = [batch.Input(str(tmp_path / n), n) for n in ("a.pdf", "b.txt", "missing.pdf", "c.png", "d.pdf")]
    with open_document(str(tmp_path / "d.pdf")) as d:
        d_sha = d.sha256
    counts = []
    items = list(Prefetcher(docs, lambda path: open_document(path, dpi=36),
                            lambda doc: list(range(1, doc.page_count + 1)),
                            lambda sha, page: sha == d_sha and page == 1,  # d.pdf page 1 is already done
                            lambda images: [im.size for im in images], batch_size=2,
                            on_pages=lambda total, skipped: counts.append((total, skipped))))
    handed = []
    order = []
    for item in items:
        if isinstance(item, batch.Batch):
            assert 1 <= len(item.tasks) <= 2 and item.inputs == [im.size for im in item.images]
            handed += [(t.input.rel, t.page) for t in item.tasks]
        elif isinstance(item, batch.DocumentDone):
            todo = [p for p in item.pages if not (item.input.rel == "d.pdf" and p == 1)]
            assert all((item.input.rel, p) in handed for p in todo)  # its pages came first
            order.append(item.input.rel)
        else:
            order.append((item.input.rel, item.error.code))
    # batches of one page size first: a.pdf page 3 waits for d.pdf page 2 (same size), not for c.png
    assert handed == [("a.pdf", 1), ("a.pdf", 2), ("a.pdf", 3), ("d.pdf", 2), ("c.png", 1)]
    # a document that fails to open is reported at once; a finished one after the batch holding its last page
    assert order == [("b.txt", "unsupported_format"), ("missing.pdf", "not_found"), "a.pdf", "c.png", "d.pdf"]
    assert counts == [(3, 0), (1, 0), (2, 1)]


def test_prefetch_groups_pages_by_size_within_a_bounded_window(tmp_path):
    """Alternating portrait and landscape pages: every batch holds one page size, none waits long."""
    import pymupdf

    from idefics_cli.documents import open_document

    pdf = pymupdf.open()
    for k in range(11):
        page = pdf.new_page(width=200, height=300) if k % 2 == 0 else pdf.new_page(width=300, height=200)
        page.insert_text((20, 40), f"Page {k + 1}", fontsize=14)  # not blank: blank pages never reach a batch
    pdf.save(str(tmp_path / "mixed.pdf"))
    built, waiting = [], []

    def build(images):
        built.append([im.size for im in images])
        return None

    items = list(Prefetcher([batch.Input(str(tmp_path / "mixed.pdf"), "mixed.pdf")],
                            lambda path: open_document(path, dpi=36), lambda doc: list(range(1, 12)),
                            lambda sha, page: False, build, batch_size=2))
    batches = [i for i in items if isinstance(i, batch.Batch)]
    assert isinstance(items[-1], batch.DocumentDone) and len(items) == len(batches) + 1
    pages = sorted(t.page for b in batches for t in b.tasks)
    assert pages == list(range(1, 12))  # each page exactly once
    assert all(len(b.tasks) == 2 for b in batches[:-1])  # full batches
    assert all(len(set(sizes)) == 1 for sizes in built)  # one size a batch (the last one holds one page)
    for b in batches:  # a page is batched at most a window (two batches) after the pages before it
        waiting.append(max(t.page for t in b.tasks) - min(t.page for t in b.tasks))
    assert max(waiting) <= 2 * 2


def test_a_page_of_another_size_is_passed_over_by_one_batch_at_most(tmp_path):
    """A photo, then a PDF of same-size pages: same-size batches fill at once, but the photo goes in the second
    batch (topped up), not at the end, so the records behind it are not held back for the whole run."""
    from conftest import make_image, make_pdf

    from idefics_cli.documents import open_document

    make_image(240, 180, seed=7).save(tmp_path / "a.png")
    make_pdf(tmp_path / "b.pdf", 6)
    docs = [batch.Input(str(tmp_path / "a.png"), "a.png"), batch.Input(str(tmp_path / "b.pdf"), "b.pdf")]
    items = list(Prefetcher(docs, open_document, lambda doc: list(range(1, doc.page_count + 1)),
                            lambda sha, page: False, lambda images: None, batch_size=2))
    batches = [[(t.input.rel, t.page) for t in i.tasks] for i in items if isinstance(i, batch.Batch)]
    assert batches[0] == [("b.pdf", 1), ("b.pdf", 2)] and ("a.png", 1) in batches[1], batches
    seqs = [t.seq for i in items if isinstance(i, batch.Batch) for t in i.tasks]
    assert sorted(seqs) == [0, *range(2, 8)]  # a.png's DocumentDone is 1, read after its page


def _pdf(tmp_path, pages: int) -> list:
    from conftest import make_pdf

    return [batch.Input(make_pdf(tmp_path / "doc.pdf", pages), "doc.pdf")]


def test_a_batch_is_built_only_once_the_model_has_taken_the_one_before(tmp_path):
    """The turn-taking: while the consumer holds batch k, batch k + 1 may be built, batch k + 2 may not."""
    import threading

    from idefics_cli.documents import open_document

    log, lock, second_built = [], threading.Lock(), threading.Event()

    def build(images):
        with lock:
            log.append("build")
            if log.count("build") == 2:
                second_built.set()
        return None

    prefetcher = Prefetcher(_pdf(tmp_path, 8), lambda path: open_document(path, dpi=36),
                            lambda doc: list(range(1, 9)), lambda sha, page: False, build, batch_size=2)
    for item in prefetcher:
        if isinstance(item, batch.Batch):
            with lock:
                log.append("take")
            if log.count("take") == 1:  # the model works on batch 1: batch 2 is built meanwhile (not after it)
                assert second_built.wait(60), log
                with lock:
                    assert log.count("build") == 2, log
    assert log.count("build") == log.count("take") == 4
    for k in range(len(log)):  # batch k + 2 is never built before batch k is taken: two batches' pixels at most
        assert log[: k + 1].count("build") <= log[: k + 1].count("take") + 2, log


def test_a_failed_build_gives_its_turn_back_and_pages_become_failures(tmp_path):
    from idefics_cli.documents import open_document

    calls = []

    def build(images):
        calls.append(len(images))
        if len(calls) <= 3:
            raise ValueError("preprocessing failed")
        return None

    items = list(Prefetcher(_pdf(tmp_path, 5), lambda path: open_document(path, dpi=36),
                            lambda doc: list(range(1, 6)), lambda sha, page: False, build, batch_size=1))
    assert [type(i).__name__ for i in items] == ["Failure"] * 3 + ["Batch"] * 2 + ["DocumentDone"]
    assert [i.page for i in items[:3]] == [1, 2, 3] and calls == [1] * 5


def test_an_error_in_the_thread_is_raised_in_the_consumer_and_leaving_stops_the_thread(tmp_path):
    import pytest

    from idefics_cli.documents import open_document

    def select(doc):
        raise KeyboardInterrupt  # not a per-document error: it ends the run

    with pytest.raises(KeyboardInterrupt):
        list(Prefetcher(_pdf(tmp_path, 2), open_document, select, lambda sha, page: False, lambda images: None, 1))
    prefetcher = Prefetcher(_pdf(tmp_path, 6), lambda path: open_document(path, dpi=36),
                            lambda doc: list(range(1, 7)), lambda sha, page: False, lambda images: None, 1)
    for _ in prefetcher:
        break  # the consumer leaves: the thread, waiting for its turn, ends
    prefetcher._work.join(60)
    assert not prefetcher._work.alive()
