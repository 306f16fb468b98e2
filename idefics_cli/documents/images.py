"""Images through Pillow: one page per image (every frame of a multi-page format), RGB, never resized.

Contract: EXIF orientation applied, transparency onto white, deep gray scaled by its real range (12-bit TIFF by
4095), 1-px sides padded to 2 px (the processor cannot split them); a PNG cut after its pixel data is read, one
with damaged optional chunks `repaired`. Over MAX_IMAGE_PIXELS is `image_too_large` before decoding; an animation
gives its first frame (`first_frame_only`); a well-formed variant Pillow cannot read is `unsupported_format`.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from typing import TYPE_CHECKING

from idefics_cli.documents.pages import MAX_IMAGE_PIXELS, NAMES, Document, why
from idefics_cli.errors import IdeficsError

if TYPE_CHECKING:
    from PIL.Image import Image

_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP", "tiff": "TIFF",
                "jp2": "JPEG2000", "pnm": "PPM", "avif": "AVIF", "heif": "HEIF", "psd": "PSD"}
PAGED = ("tiff", "heif")  # every frame (TIFF page, HEIF top-level image) is a page
_LAYERED = ("psd",)  # frames are layers: the composite image is the page


class ImageDocument(Document):
    def __init__(self, path: str, kind: str, data: bytes):
        super().__init__(path, kind, data)
        from PIL import Image as PILImage

        if kind == "heif":
            import pillow_heif

            pillow_heif.register_heif_opener(thumbnails=False)
        self._data = data
        if kind == "png" and not data.endswith(IEND):
            data = complete_png(data) or data  # cut after its pixel data: read what is all there
        if kind == "png" and (fixed := drop_bad_ancillary(data)) is not None:
            data = fixed  # an optional chunk with a bad checksum: dropped, as browsers do
            self.doc_warnings.append("repaired")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
                self._im = PILImage.open(io.BytesIO(data), formats=[_PIL_FORMATS[kind]])
        except PILImage.DecompressionBombError as e:
            raise self._error("image_too_large", f"the image is too large ({e})", "downscale it first") from e
        except Exception as e:
            raise self._unreadable(e) from e
        try:
            self._check_size()
            frames = getattr(self._im, "n_frames", 1)
            self.page_count = frames if kind in PAGED else 1
            if kind not in PAGED and kind not in _LAYERED and frames > 1:
                self.doc_warnings.append("first_frame_only")
        except BaseException as e:
            self._im.close()
            if isinstance(e, (IdeficsError, KeyboardInterrupt, MemoryError)):
                raise
            raise self._unreadable(e) from e

    def _unreadable(self, e: BaseException) -> IdeficsError:
        """`unsupported_format` naming the variant for a well-formed file the decoder cannot read, else `corrupt`."""
        reason = str(e)
        if variant := unsupported_variant(self.kind, self._data, reason):
            return self._error("unsupported_format", f"{variant} is not supported", "convert it to PNG first")
        detail = "" if reason.startswith("cannot identify image file") else f" ({why(e)})"
        return self._error("corrupt", f"not a readable {NAMES[self.kind]} image{detail}")

    def _check_size(self) -> None:
        w, h = self._im.size
        if w * h > MAX_IMAGE_PIXELS:
            raise self._error("image_too_large", f"the image is {w}x{h} pixels, over the limit of "
                              f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels", "downscale it first")

    def _render(self, page: int) -> Image:
        from PIL import Image as PILImage
        from PIL import ImageOps

        im = self._im
        if self.kind in PAGED:
            im.seek(page - 1)
            self._check_size()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
                im.load()  # decode fully here, so truncated data fails now, as `corrupt`
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as e:
            if "Security limit exceeded" in str(e):  # libheif's own bound on the size of an image
                raise self._error("image_too_large", f"the image is too large ({why(e)})", "downscale it first") from e
            if unsupported_variant(self.kind, self._data, str(e)):
                raise self._unreadable(e) from e
            raise  # damaged bytes: `corrupt` (Document.render)
        bits = _bits_per_sample(im)
        try:
            out = ImageOps.exif_transpose(im)
        except Exception:  # a broken EXIF block must not lose the page
            out = im.copy()
        return _to_rgb(out, bits)

    def close(self) -> None:
        self._im.close()


def _bits_per_sample(im: Image) -> int | None:
    """The bits per sample a TIFF declares (12-bit scans arrive in 16-bit containers), else None."""
    value = getattr(im, "tag_v2", {}).get(258)
    if isinstance(value, (tuple, list)):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) and 1 <= value <= 32 else None


def _to_rgb(im: Image, bits: int | None) -> Image:
    """Any mode -> RGB: deep gray scaled by its real range (`bits`, default 16), transparency onto white, a 1-px side
    padded to 2 px with white (the processor cannot split it into crops otherwise)."""
    from PIL import Image as PILImage

    if im.mode.startswith("I"):  # I, I;16, I;16B, ...: 12-, 16- or 32-bit samples (PNG, TIFF)
        bits = bits if bits and bits > 8 else 16
        if bits > 16 and im.getextrema()[1] < 1 << 16:  # 16-bit values in a 32-bit container
            bits = 16
        top = (1 << bits) - 1
        im = im.convert("I").point(lambda v: v * (255 / top), "L")
    elif im.mode == "F":  # 32-bit float samples: scientific TIFFs hold 0..1
        low, high = im.getextrema()
        im = im.point(lambda v: v * 255, "L") if 0 <= low and high <= 1 else im.convert("L")
    size = (max(im.width, 2), max(im.height, 2))
    transparent = im.has_transparency_data  # alpha modes too
    if not transparent and size == im.size:
        return im if im.mode == "RGB" else im.convert("RGB")
    im = im.convert("RGBA" if transparent else "RGB")
    out = PILImage.new("RGB", size, (255, 255, 255))
    out.paste(im, (0, 0), im.getchannel("A") if transparent else None)
    return out


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_CHUNK = 1 << 20


def complete_png(data: bytes) -> bytes | None:
    """A PNG cut after its pixel data, ended cleanly; None when nothing is cut or the pixels are cut too."""
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
    """The PNG without its ancillary chunks of bad checksum; None when none is bad."""
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


_SOF_NAMES = {0xC3: "lossless JPEG (SOF3)", 0xC5: "hierarchical JPEG", 0xC6: "hierarchical JPEG",
              0xC7: "hierarchical lossless JPEG", 0xCB: "lossless arithmetic-coded JPEG",
              0xCD: "hierarchical JPEG", 0xCE: "hierarchical JPEG", 0xCF: "hierarchical lossless JPEG"}
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# TIFF compressions Pillow reads (TiffImagePlugin.COMPRESSION_INFO, LogLuv's apart)
_TIFF_COMPRESSIONS = {1, 2, 3, 4, 5, 6, 7, 8, 32771, 32773, 32809, 32946, 34925, 50000, 50001}


def unsupported_variant(kind: str, data: bytes, reason: str = "") -> str | None:
    """The variant a header declares that the decoder cannot read ("12-bit JPEG"; `reason`: the decoder's message),
    else None (damaged bytes)."""
    read = {"jpeg": _jpeg, "tiff": _tiff, "bmp": _bmp}.get(kind)
    try:
        return read(data, reason) if read else None
    except (struct.error, IndexError, ValueError):
        return None


def _jpeg(data: bytes, _reason: str) -> str | None:
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


def _tiff(data: bytes, _reason: str) -> str | None:
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
