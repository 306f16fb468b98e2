"""DocTags, the answer of the document models (SmolDocling, granite-docling), as Markdown through docling-core.

Contract: `available()` says whether docling-core (the `[docling]` extra) can be imported; `to_markdown(doctags)`
is one page's Markdown (None without docling-core; DocTags it cannot read give what it could, possibly "").
`HINT` says how to get Markdown. docling-core is imported inside functions only.
"""

from __future__ import annotations

HINT = ("the model answers in DocTags; pip install 'idefics-cli[docling]' (docling-core) to add \"markdown\" to "
        "each record and write Markdown to the .md files, which hold the DocTags meanwhile")


def available() -> bool:
    from ..extras import _importable

    return _importable("docling_core")


def to_markdown(doctags: str) -> str | None:
    if not available():  # first: with the extra hidden (sys.modules) its submodules may still import
        return None
    try:
        from docling_core.types.doc.document import DoclingDocument, DocTagsDocument
    except ImportError:
        return None
    pages = DocTagsDocument.from_doctags_and_image_pairs([doctags], [None])
    return DoclingDocument.load_from_doctags(pages, document_name="page").export_to_markdown()
