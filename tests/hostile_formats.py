"""Hostile cases for the formats that archives and phones hold: JPEG 2000, netpbm, AVIF, HEIC, PSD and MuPDF's
XPS, EPUB, MOBI, FB2, CBZ and SVG (truncated, over the pixel budget, animated, zip bombs), well-formed variants the
decoders cannot read, damaged signatures. `build_formats(root, add)` adds them through hostile.build's `add`.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib

from hostile import _image_bytes, _multi_tiff, _png_header


def _pil_bytes(img, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def _striped(mode="RGB", size=(64, 48)):
    from PIL import Image

    img = Image.new(mode, size, (40, 90, 200) if mode == "RGB" else 128)
    img.paste((250, 250, 250) if mode == "RGB" else 255, (0, 0, size[0] // 2, size[1] // 4))
    return img


def _pgm16(maxval: int = 1023, width: int = 64, height: int = 8) -> bytes:
    """A 16-bit PGM whose ramp reaches its maxval (1023: a 10-bit sensor), which must come out as full white."""
    values = [(i * maxval) // (width - 1) for i in range(width)] * height
    return b"P5\n%d %d\n%d\n" % (width, height, maxval) + b"".join(v.to_bytes(2, "big") for v in values)


def _psd(width=40, height=30, channels=3) -> bytes:
    """A minimal Photoshop file: no layers, the composite image raw and planar (red on the left, blue right)."""
    planes = []
    for c in range(channels):
        row = bytes(([255, 0, 0][c],) * (width // 2) + ([0, 0, 255][c],) * (width - width // 2))
        planes.append(row * height)
    return (b"8BPS" + struct.pack(">H6xHIIHH", 1, channels, height, width, 8, 3) + struct.pack(">III", 0, 0, 0)
            + struct.pack(">H", 0) + b"".join(planes))


def _zeroed_pixels(png: bytes) -> bytes:
    """A PNG whose header is whole and whose compressed pixels are zeros (the CRCs left as they were)."""
    at = png.index(b"IDAT") + 4
    return png[:at] + bytes(len(png) - at - 12) + png[-12:]


def _zip(entries: list[tuple[str, bytes]], stored_first=False) -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for i, (name, data) in enumerate(entries):
            archive.writestr(name, data, zipfile.ZIP_STORED if stored_first and i == 0 else zipfile.ZIP_DEFLATED)
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def _zeros_deflated() -> tuple[bytes, int]:
    """256 MiB of zeros as a raw deflate stream (about 250 KB) and their CRC-32."""
    zeros = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(16 << 20)
    crc, stream = 0, [zeros.compress(chunk) for _ in range(16)]
    for _ in range(16):
        crc = zlib.crc32(chunk, crc)
    return b"".join(stream) + zeros.flush(), crc


def _zip_with_bomb(entries: list[tuple[str, bytes]], stored_first=False, suffix=".html") -> bytes:
    """A ZIP of `entries` plus five entries of zeros that expand to 256 MiB each (1.25 GiB) from about 1 MB: built
    by hand, so the one deflate stream is computed once."""
    bomb, crc = _zeros_deflated()
    items = [(name, data, zlib.crc32(data), len(data), stored_first and i == 0) for i, (name, data) in
             enumerate(entries)]
    items += [(f"bomb{i}{suffix}", bomb, crc, 256 << 20, False) for i in range(5)]
    out, central = bytearray(), bytearray()
    for name, data, checksum, size, stored in items:
        body = data if stored or data is bomb else zlib.compress(data, 9)[2:-4]
        method = 0 if stored else 8
        header = struct.pack("<HHHHHIIIHH", 20, 0, method, 0, 0x21, checksum, len(body), size, len(name), 0)
        central += b"PK\x01\x02" + struct.pack("<H", 20) + header + struct.pack("<HHHII", 0, 0, 0, 0, len(out))
        central += name.encode()
        out += b"PK\x03\x04" + header + name.encode() + body
    eocd = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, len(items), len(items), len(central), len(out), 0)
    return bytes(out + central + eocd)


_XHTML = (b'<?xml version="1.0" encoding="utf-8"?><html xmlns="http://www.w3.org/1999/xhtml"><head><title>t</title>'
          b'</head><body><h1>Chapter one</h1><p>It was a dark and stormy night.</p></body></html>')


def _epub_entries() -> list[tuple[str, bytes]]:
    container = (b'<?xml version="1.0"?><container version="1.0" xmlns="urn:oasis:names:tc:opendocument:xmlns:'
                 b'container"><rootfiles><rootfile full-path="content.opf" media-type="application/oebps-package+xml"'
                 b'/></rootfiles></container>')
    opf = (b'<?xml version="1.0"?><package xmlns="http://www.idpf.org/2007/opf" version="3.0" unique-identifier="id">'
           b'<metadata xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:identifier id="id">x</dc:identifier>'
           b'<dc:title>Hostile</dc:title><dc:language>en</dc:language></metadata><manifest><item id="c1" '
           b'href="c1.xhtml" media-type="application/xhtml+xml"/></manifest><spine><itemref idref="c1"/></spine>'
           b'</package>')
    return [("mimetype", b"application/epub+zip"), ("META-INF/container.xml", container), ("content.opf", opf),
            ("c1.xhtml", _XHTML)]


def _xps() -> bytes:
    page = (b'<FixedPage xmlns="http://schemas.microsoft.com/xps/2005/06" Width="400" Height="300" xml:lang="en">'
            b'<Path Data="M 20,20 L 200,20 200,80 20,80 Z" Fill="#FF0000FF"/></FixedPage>')
    return _zip([
        ("[Content_Types].xml", b'<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/'
         b'content-types"><Default Extension="fdseq" ContentType="application/vnd.ms-package.xps-fixeddocumentsequence'
         b'+xml"/><Default Extension="fdoc" ContentType="application/vnd.ms-package.xps-fixeddocument+xml"/><Default '
         b'Extension="fpage" ContentType="application/vnd.ms-package.xps-fixedpage+xml"/><Default Extension="rels" '
         b'ContentType="application/vnd.openxmlformats-package.relationships+xml"/></Types>'),
        ("_rels/.rels", b'<?xml version="1.0"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/'
         b'relationships"><Relationship Type="http://schemas.microsoft.com/xps/2005/06/fixedrepresentation" '
         b'Target="/FixedDocumentSequence.fdseq" Id="R0"/></Relationships>'),
        ("FixedDocumentSequence.fdseq", b'<FixedDocumentSequence xmlns="http://schemas.microsoft.com/xps/2005/06">'
         b'<DocumentReference Source="/Documents/1/FixedDocument.fdoc"/></FixedDocumentSequence>'),
        ("Documents/1/FixedDocument.fdoc", b'<FixedDocument xmlns="http://schemas.microsoft.com/xps/2005/06">'
         b'<PageContent Source="/Documents/1/Pages/1.fpage"/></FixedDocument>'),
        ("Documents/1/Pages/1.fpage", page)])


def _mobi() -> bytes:
    """A minimal MOBI (a PalmDB `BOOKMOBI` database): record 0 the headers, record 1 the uncompressed HTML."""
    text = b"<html><body><h1>Mobi book</h1><p>A page of text.</p></body></html>"
    record0 = struct.pack(">HHIHHHH", 1, 0, len(text), 1, 4096, 0, 0)
    record0 += b"MOBI" + struct.pack(">III", 24, 2, 65001) + bytes(12)
    offset = 78 + 2 * 8 + 2
    head = b"hostile".ljust(32, b"\x00") + struct.pack(">HHIIIIII", 0, 0, 0, 0, 0, 0, 0, 0) + b"BOOKMOBI"
    head += struct.pack(">IIH", 0, 0, 2)
    head += struct.pack(">II", offset, 0) + struct.pack(">II", offset + len(record0), 1) + b"\x00\x00"
    return head + record0 + text


def _fb2() -> bytes:
    return (b'<?xml version="1.0" encoding="utf-8"?><FictionBook xmlns="http://www.gribuser.ru/xml/fictionbook/2.0">'
            b'<description><title-info><book-title>Hostile</book-title></title-info></description><body><section>'
            b'<title><p>Chapter</p></title><p>A fictional book page.</p></section></body></FictionBook>')


def _svg(width="200", height="100") -> bytes:
    return (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="%s" height="%s">'
            b'<rect x="10" y="10" width="80" height="40" fill="blue"/></svg>' % (width.encode(), height.encode()))


def _jpeg_variant(marker: int, precision: int = 8) -> bytes:
    """A baseline JPEG whose frame header is rewritten to another process (SOFn) or sample precision."""
    data = _image_bytes(fmt="JPEG", size=(32, 24))
    i = data.index(b"\xff\xc0")
    return data[:i] + bytes([0xFF, marker]) + data[i + 2:i + 4] + bytes([precision]) + data[i + 5:]


def _tiff_tags(tags, payload: bytes) -> bytes:
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
        for tag, kind, value in tags) + b"\x00\x00\x00\x00"
    return b"II*\x00" + struct.pack("<I", 8 + len(payload)) + payload + ifd


def _tiff_variant(bits: int, compression: int = 1, photometric: int = 1, sample_format: int = 1, spp: int = 1,
                  payload: bytes | None = None, width: int = 4, height: int = 4) -> bytes:
    payload = payload if payload is not None else bytes(width * height * max(bits // 8, 1) * spp)
    tags = [(256, 3, width), (257, 3, height), (258, 3, bits), (259, 3, compression), (262, 3, photometric),
            (273, 4, 8), (277, 3, spp), (278, 3, height), (279, 4, len(payload)), (339, 3, sample_format)]
    return _tiff_tags(tags, payload)


def _bmp(header: bytes, body: bytes) -> bytes:
    return b"BM" + struct.pack("<IHHI", 14 + len(header) + len(body), 0, 0, 14 + len(header)) + header + body


def _png_bad_ancillary_crc() -> bytes:
    data = _image_bytes(size=(64, 48))
    text = b"Comment\x00scanned by a phone"
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text + b"\x00\x00\x00\x00"  # wrong checksum
    return data[:33] + chunk + data[33:]  # before IDAT, where Pillow checks it


def _animated_avif() -> bytes:
    frames = [_striped(size=(32, 24)), _striped(size=(32, 24)).rotate(180)]
    return _pil_bytes(frames[0], "AVIF", save_all=True, append_images=frames[1:], duration=100)


def _heif(n_images=1) -> bytes:
    import pillow_heif

    frames = [_striped(size=(64, 48)) for _ in range(n_images)]
    heif = pillow_heif.from_pillow(frames[0])
    for frame in frames[1:]:
        heif.add_from_pillow(frame)
    buf = io.BytesIO()
    heif.save(buf, quality=90)
    return buf.getvalue()


def _ispe_bomb(data: bytes) -> bytes:
    """An AVIF or HEIF whose image-size property (`ispe`) declares 50000 x 50000 pixels."""
    i = data.index(b"ispe") + 8
    return data[:i] + struct.pack(">II", 50000, 50000) + data[i + 8:]


def _j2k_bomb() -> bytes:
    """A JPEG 2000 codestream whose SIZ marker declares 50000 x 50000 pixels."""
    data = _pil_bytes(_striped(), "JPEG2000", no_jp2=True)
    return data[:8] + struct.pack(">II", 50000, 50000) + data[16:]


def build_formats(root: str, add) -> None:
    rgb = _striped()
    jp2 = _pil_bytes(rgb, "JPEG2000")
    add("jpeg2000.jp2", jp2, "ok")
    add("jpeg2000.jpx", jp2, "ok")
    add("codestream.j2k", _pil_bytes(rgb, "JPEG2000", no_jp2=True), "ok")
    add("jpeg2000-truncated.jp2", jp2[:len(jp2) // 2], "corrupt")
    add("jpeg2000-bomb.j2k", _j2k_bomb(), "image_too_large")
    add("sixteen-bit.pgm", _pgm16(), "ok", check=lambda image: image.getextrema()[0] == (0, 255))
    add("netpbm.ppm", _pil_bytes(rgb, "PPM"), "ok")
    add("netpbm.pbm", _pil_bytes(rgb.convert("1"), "PPM"), "ok")
    add("netpbm-truncated.ppm", _pil_bytes(rgb, "PPM")[:200], "corrupt")
    add("netpbm-bomb.pgm", b"P5\n50000 50000\n255\n" + bytes(100), "image_too_large")
    avif = _pil_bytes(rgb, "AVIF")
    add("photo.avif", avif, "ok")
    add("animated.avif", _animated_avif(), "ok", warnings=["first_frame_only"])
    add("avif-truncated.avif", avif[:len(avif) // 2], "corrupt")
    add("avif-bomb.avif", _ispe_bomb(avif), {"image_too_large", "corrupt"})
    heic = _heif()
    add("photo.heic", heic, "ok")
    add("burst.heic", _heif(2), "ok")
    add("heic-truncated.heic", heic[:len(heic) // 2], "corrupt")
    add("heic-bomb.heic", _ispe_bomb(heic), {"image_too_large", "corrupt"})
    add("layers.psd", _psd(), "ok", check=lambda image: image.getpixel((0, 0)) == (255, 0, 0)
        and image.getpixel((39, 29)) == (0, 0, 255))
    add("psd-truncated.psd", _psd()[:200], "corrupt")
    add("psd-bomb.psd", _psd()[:14] + struct.pack(">II", 50000, 50000) + _psd()[22:], "image_too_large")
    add("large-document.psb", _psd().replace(b"8BPS\x00\x01", b"8BPS\x00\x02", 1), "unsupported_format")
    add("psb-named.psd", _psd().replace(b"8BPS\x00\x01", b"8BPS\x00\x02", 1), "unsupported_format")  # not corrupt
    epub = _zip(_epub_entries(), stored_first=True)
    add("book.epub", epub, "ok")
    add("epub-truncated.epub", epub[:len(epub) // 2], "corrupt")
    add("epub-missing-chapter.epub", _zip(_epub_entries()[:3], stored_first=True), "corrupt")  # not MuPDF's error text
    add("epub-zip-bomb.epub", _zip_with_bomb(_epub_entries(), stored_first=True), "image_too_large")
    pages = [_pil_bytes(_striped(size=(60, 80)), "PNG"), _pil_bytes(_striped(size=(60, 80)).rotate(180), "JPEG")]
    add("comic.cbz", _zip([("001.png", pages[0]), ("002.jpg", pages[1])]), "ok")
    add("webp-pages.cbz", _zip([("001.webp", _pil_bytes(_striped(), "WEBP"))]), "unsupported_format")  # MuPDF skips
    add("mac-zipped.cbz", _zip([("001.png", pages[0]), ("__MACOSX/._001.png", b"\x00\x05\x16\x07" + bytes(80))]),
        "ok")  # AppleDouble metadata is not a page
    add("damaged-page.cbz", _zip([("001.png", _zeroed_pixels(pages[0]))]), "corrupt")  # MuPDF drew it blank
    add("cbz-zip-bomb.cbz", _zip_with_bomb([("001.png", pages[0])], suffix=".png"), "image_too_large")
    add("cbz-image-bomb.cbz", _zip([("001.png", _png_header(50000, 50000))]), "image_too_large")
    add("paper.xps", _xps(), "ok")
    add("paper.oxps", _xps(), "ok")
    add("book.mobi", _mobi(), "ok")
    add("book.fb2", _fb2(), "ok")
    add("drawing.svg", _svg(), "ok")
    add("utf16.svg", _svg().decode().replace('version="1.0"', 'version="1.0" encoding="UTF-16"').encode("utf-16"),
        "ok")  # as Windows tools save it, with its byte order mark
    add("illustrator.svg", b'<?xml version="1.0"?>\n<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "svg11.dtd" [\n'
        b'<!ENTITY ns_ai "http://ns.adobe.com/AdobeIllustrator/10.0/">\n]>\n' + _svg()[21:], "ok")  # DOCTYPE entities
    add("drawing-huge.svg", _svg("1000000", "1000000"), "ok", warnings=["downscaled"], extra=["--dpi", "72"])
    # valid files the decoders cannot read: unsupported_format naming the variant, not corrupt
    add("twelve-bit.jpg", _jpeg_variant(0xC1, 12), "unsupported_format")
    add("lossless.jpg", _jpeg_variant(0xC3), "unsupported_format")
    add("float64.tif", _tiff_variant(64, sample_format=3, payload=struct.pack("<16d", *[0.5] * 16)),
        "unsupported_format")
    add("logluv.tif", _tiff_variant(16, compression=34676, photometric=32845, spp=3), "unsupported_format")
    add("thunderscan.tif", _tiff_variant(4, compression=32809, payload=bytes([0xCF, 0xC8, 0xC0, 0xCF]) * 4), "ok")
    add("thunderscan-8bit.tif", _tiff_variant(8, compression=32809, payload=bytes([0xCF] * 16)),
        "unsupported_format")
    add("os2-rle24.bmp", _bmp(struct.pack("<IiiHHII", 64, 4, 4, 1, 24, 4, 0) + bytes(40), b"\x04\x10\x20\x30"),
        "unsupported_format")
    add("bitfields.bmp", _bmp(struct.pack("<IiiHHIIiiII", 40, 4, 4, 1, 16, 3, 32, 0, 0, 0, 0)
                              + struct.pack("<III", 0x3800, 0x07C0, 0x003E), bytes(32)), "unsupported_format")
    add("samples-per-pixel.tif", _tiff_variant(8, spp=65535), "corrupt")
    # damaged signatures of files named as images: corrupt, not "not a supported document"
    png = _image_bytes()
    add("flipped-bit.png", bytes([png[0] ^ 0x80]) + png[1:], "corrupt")
    add("text-mode-crlf.png", png.replace(b"\n", b"\r\n"), "corrupt")
    add("text-mode-lf.png", png.replace(b"\r\n", b"\n"), "corrupt")
    jpeg = _image_bytes(fmt="JPEG")
    add("flipped-bit.jpg", b"\xff\xd9" + jpeg[2:], "corrupt")
    tif = _multi_tiff(1)
    add("flipped-bit.tif", b"IH" + tif[2:], "corrupt")
    # a well-formed ZIP that is no container MuPDF reads, named as one: decided by the bytes
    add("docx-named.epub", _zip([("[Content_Types].xml", b"<Types/>"), ("word/document.xml", b"<w:document/>")]),
        "unsupported_format")
    # readable files refused before
    add("bad-ancillary-crc.png", _png_bad_ancillary_crc(), "ok", warnings=["repaired"])
