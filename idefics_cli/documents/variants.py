"""Variants: well-formed files of a known format that its decoder cannot read, and archives too big to open.

Contract: pure inspection of bytes. `unsupported_variant(kind, data, reason)` names the variant a header declares
that the decoder cannot read ("12-bit JPEG"; `reason`: the decoder's message), else None (damaged bytes).
`zip_excess(data, limit)`: why a ZIP whose entries declare over `limit` bytes (a zip bomb) must not be opened.
"""

from __future__ import annotations

import io
import struct

_SOF_NAMES = {0xC3: "lossless JPEG (SOF3)", 0xC5: "hierarchical JPEG", 0xC6: "hierarchical JPEG",
              0xC7: "hierarchical lossless JPEG", 0xCB: "lossless arithmetic-coded JPEG",
              0xCD: "hierarchical JPEG", 0xCE: "hierarchical JPEG", 0xCF: "hierarchical lossless JPEG"}
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# TIFF compressions Pillow reads (TiffImagePlugin.COMPRESSION_INFO, LogLuv's apart)
_TIFF_COMPRESSIONS = {1, 2, 3, 4, 5, 6, 7, 8, 32771, 32773, 32809, 32946, 34925, 50000, 50001}


def unsupported_variant(kind: str, data: bytes, reason: str = "") -> str | None:
    try:
        if kind == "jpeg":
            return _jpeg(data)
        if kind == "tiff":
            return _tiff(data)
        if kind == "bmp":
            return _bmp(data, reason)
    except (struct.error, IndexError, ValueError):
        return None
    return None


def _jpeg(data: bytes) -> str | None:
    """The first frame header (SOFn) of a JPEG: its process and sample precision."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _SOF:
            precision = data[pos + 4]
            if marker in _SOF_NAMES:
                return _SOF_NAMES[marker]
            return f"{precision}-bit JPEG" if precision != 8 else None
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before
            return None
        pos += 2 + length
    return None


def _tiff(data: bytes) -> str | None:
    """The first image file directory of a classic TIFF: sample format, bits, compression, photometric."""
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None or struct.unpack(order + "H", data[2:4])[0] != 42:
        return None
    ifd = struct.unpack(order + "I", data[4:8])[0]
    (count,) = struct.unpack(order + "H", data[ifd:ifd + 2])
    tags = {}
    for i in range(min(count, 512)):
        tag, kind, n = struct.unpack(order + "HHI", data[ifd + 2 + 12 * i:ifd + 10 + 12 * i])
        raw = data[ifd + 10 + 12 * i:ifd + 14 + 12 * i]
        if kind == 3:
            tags[tag] = struct.unpack(order + "H", raw[:2])[0]
            if n > 2:  # several shorts stored elsewhere: the first is enough
                off = struct.unpack(order + "I", raw)[0]
                tags[tag] = struct.unpack(order + "H", data[off:off + 2])[0]
        elif kind == 4:
            tags[tag] = struct.unpack(order + "I", raw)[0]
    bits, fmt = tags.get(258, 1), tags.get(339, 1)
    compression, photometric = tags.get(259, 1), tags.get(262)
    if compression in (34676, 34677) or photometric in (32844, 32845):
        return "LogLuv TIFF"
    if fmt == 3 and bits != 32:
        return f"{bits}-bit float TIFF"
    if bits > 32:
        return f"{bits}-bit TIFF"
    if fmt == 6:
        return "complex floating-point TIFF"
    if compression == 32809 and (bits != 4 or tags.get(277, 1) != 1):
        return f"ThunderScan TIFF of {bits}-bit samples"
    if compression not in _TIFF_COMPRESSIONS:
        return f"TIFF compression {compression}"
    return None


def _bmp(data: bytes, reason: str) -> str | None:
    header = int.from_bytes(data[14:18], "little")
    compression = int.from_bytes(data[30:34], "little") if header >= 40 else 0
    bits = int.from_bytes(data[28:30], "little") if header >= 40 else 0
    if header == 64 and compression == 4 and bits == 24:
        return "OS/2 BMP with 24-bit RLE"
    if compression == 4 and header != 64:
        return "BMP with embedded JPEG"
    if compression == 5:
        return "BMP with embedded PNG"
    if "bitfields" in reason or compression in (3, 6) and "Unsupported BMP" in reason:
        return "BMP with unusual bit-field masks"
    if reason.startswith("Unsupported BMP"):
        return f"this BMP variant ({reason.rstrip('.')})"
    return None


def zip_excess(data: bytes, limit: int) -> str | None:
    import zipfile

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None  # MuPDF says what is wrong with it
    total = sum(info.file_size for info in infos)
    if total > limit:
        return (f"its {len(infos)} entries expand to {total / 2**20:,.0f} MiB, over the limit of "
                f"{limit / 2**20:,.0f} MiB (a zip bomb?)")
    return None
