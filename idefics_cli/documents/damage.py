"""Damage: evidence, in a file's bytes or an opened PDF's objects, of what is really wrong with it.

Contract: pure inspection (an opened PyMuPDF document is passed in). `complete_png(data)`: a PNG cut after its
pixel data, ending cleanly; `drop_bad_ancillary(data)`: a PNG without its ancillary chunks of bad checksum (else
None for both); `empty_page_tree(doc)`: a 0-page PDF is really empty, not damaged; `encryption_damage(doc)`:
why no password can open a PDF, or None when its encryption dictionary is sound.
"""

from __future__ import annotations

import zlib

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_CHUNK = 1 << 20


def complete_png(data: bytes) -> bytes | None:
    if not data.startswith(PNG_MAGIC):
        return None
    pos, idat = len(PNG_MAGIC), []
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        end = pos + 12 + length
        if kind == b"IEND" or end > len(data):
            break
        if kind == b"IDAT":
            idat.append(data[pos + 8:end - 4])
        pos = end
    if pos + 8 <= len(data) and data[pos + 4:pos + 8] == b"IEND" or not idat:
        return None  # nothing is cut, or there is no pixel data to keep
    stream = zlib.decompressobj()
    try:
        for part in idat:
            while part and not stream.eof:  # bounded output: only whether the stream ends matters
                stream.decompress(part, _CHUNK)
                part = stream.unconsumed_tail
    except zlib.error:
        return None
    return data[:pos] + IEND if stream.eof else None


def drop_bad_ancillary(data: bytes) -> bytes | None:
    if not data.startswith(PNG_MAGIC):
        return None
    pos, keep, dropped = len(PNG_MAGIC), [], False
    while pos + 12 <= len(data):
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        end = pos + 12 + length
        if end > len(data):
            break
        crc = int.from_bytes(data[end - 4:end], "big")
        if kind[0] & 0x20 and zlib.crc32(data[pos + 4:end - 4]) != crc:
            dropped = True  # an ancillary chunk (lower-case first letter) whose bytes are damaged
        else:
            keep.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            break
    return PNG_MAGIC + b"".join(keep) + data[pos:] if dropped else None


def page_objects(doc) -> int:
    """How many objects in the file say /Type /Page."""
    return sum(1 for xref in range(1, doc.xref_length()) if doc.xref_get_key(xref, "Type") == ("name", "/Page"))


def empty_page_tree(doc) -> bool:
    catalog = doc.pdf_catalog()
    if catalog <= 0:
        return False
    kids = doc.xref_get_key(catalog, "Pages/Kids")
    return kids[0] == "array" and kids[1].strip("[] \n\r\t") == "" and page_objects(doc) == 0


# key lengths in bytes: revision -> (minimum length of /O and /U, exact length of /OE and /UE or None)
_KEY_LENGTHS = {2: (32, None), 3: (32, None), 4: (32, None), 5: (48, 32), 6: (48, 32)}
_METHODS = ("/None", "/V2", "/AESV2", "/AESV3", "/Identity", "null")


def encryption_damage(doc) -> str | None:
    def key(name: str) -> tuple[str, str]:
        return doc.xref_get_key(-1, f"Encrypt/{name}")

    kind, filter_ = key("Filter")
    if kind == "null":
        return None
    if filter_ != "/Standard":
        return f"it is encrypted with the {filter_.lstrip('/')} security handler, which only its vendor's tools open"
    kind, revision = key("R")
    if kind != "int" or int(revision) not in _KEY_LENGTHS:
        return f"its encryption dictionary names an unknown revision ({revision})"
    at_least, exactly = _KEY_LENGTHS[int(revision)]
    for name in ("O", "U"):
        kind, value = key(name)
        if kind != "string" or len(value) < at_least:
            size = f"{len(value)} bytes" if kind == "string" else "missing"
            return f"its encryption dictionary is damaged: /{name} is {size}, revision {revision} needs {at_least}"
    for name in ("OE", "UE") if exactly else ():
        kind, value = key(name)
        if kind != "string" or len(value) != exactly:
            size = f"{len(value)} bytes" if kind == "string" else "missing"
            return f"its encryption dictionary is damaged: /{name} is {size}, revision {revision} needs {exactly}"
    for name in ("StmF", "StrF"):
        kind, value = key(name)
        if kind == "name" and value not in ("/Identity",):
            method = key(f"CF/{value.lstrip('/')}/CFM")[1]
            if method not in _METHODS:
                return f"its encryption dictionary names an unknown method ({method.lstrip('/')})"
    return None
