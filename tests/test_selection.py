"""selection.py: pages opened, chosen and decoded before any model loads (no model in these tests)."""

from __future__ import annotations

import pytest
from conftest import make_image, make_pdf

from idefics_cli import open_pages
from idefics_cli.errors import IdeficsError, UsageError
from idefics_cli.tasks import selection


def test_pages_are_chosen_per_document_and_sources_merge(tmp_path):
    pdf = make_pdf(tmp_path / "r.pdf", n_pages=4)
    image = tmp_path / "s.png"
    make_image(seed=3).save(image)
    chosen = open_pages([pdf, image, pdf], "1-2")  # clipped to each document: the image has page 1 only
    assert [(p.doc.path, p.page) for p in chosen.pages] == [(pdf, 1), (pdf, 2), (str(image), 1), (pdf, 1), (pdf, 2)]
    assert [(s.path, s.pages) for s in chosen.sources()] == [(pdf, [1, 2]), (str(image), [1]), (pdf, [1, 2])]
    singles = chosen.each_page()
    assert [len(s) for s in singles] == [1] * 5 and {s.started for s in singles} == {chosen.started}
    assert all(s.render_s == 0 for s in singles) and chosen.render_s > 0  # decoding is counted once
    chosen.close()


def test_images_past_the_budget_are_dropped_and_rendered_again_identical(tmp_path, monkeypatch):
    pdf = make_pdf(tmp_path / "r.pdf", n_pages=3)
    first = open_pages(pdf, dpi=72)
    one_page = first.pages[0].image.width * first.pages[0].image.height * 3
    monkeypatch.setattr(selection, "KEEP_BYTES", one_page)
    chosen = open_pages(pdf, dpi=72)
    assert [p.image is not None for p in chosen.pages] == [True, False, False]
    images = chosen.images()
    assert not callable(images[0]) and all(callable(im) for im in images[1:])
    assert [im if not callable(im) else im() for im in images][1].tobytes() == first.pages[1].image.tobytes()


def test_input_errors_come_before_any_model(tmp_path):
    pdf = make_pdf(tmp_path / "r.pdf", n_pages=2)
    with pytest.raises(UsageError, match="stdin"):
        open_pages(["-", "-"])
    with pytest.raises(IdeficsError) as info:
        open_pages([pdf], "5")
    assert info.value.code == "page_out_of_range"
    with pytest.raises(UsageError):
        open_pages([])


def test_a_path_given_as_bytes_is_one_document_not_a_list_of_numbers(tmp_path):
    """`os.fsencode(path)` is a path as `os.PathLike` is (a non-UTF-8 name on Linux): one document, not its bytes
    iterated as paths (a TypeError traceback)."""
    import os

    pdf = make_pdf(tmp_path / "r.pdf", n_pages=2)
    chosen = open_pages(os.fsencode(pdf), "2")
    assert [(p.doc.path, p.page) for p in chosen.pages] == [(str(pdf), 2)]
    chosen.close()
    both = open_pages([os.fsencode(pdf), pdf], "1")
    assert [p.doc.path for p in both.pages] == [str(pdf), str(pdf)]
    both.close()
