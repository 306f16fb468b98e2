"""Sniffing: a file's format from its first bytes, never from its name.

Contract: `sniff(head)` returns one of FORMATS or None; 1024 bytes are enough.
"""

from __future__ import annotations

FORMATS = ("pdf", "png", "jpeg", "webp", "gif", "bmp", "tiff")
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
)
_BMP_HEADER_SIZES = (12, 16, 40, 52, 56, 64, 108, 124)

def sniff(head: bytes) -> str | None:
    """The format of a file from its first bytes (1024 are enough): one of FORMATS, or None."""
    head = bytes(head[:1024])
    if head.startswith(b"%PDF-"):
        return "pdf"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return "bmp"
    if b"%PDF-" in head:  # PDF readers accept junk before the header
        return "pdf"
    return None
