"""Images through Pillow: one page per image (every frame of a multi-page format), RGB, never resized.

Contract: EXIF orientation applied, transparency onto white, deep gray scaled by its real range (12-bit TIFF by
4095), 1-px sides padded to 2 px (the processor cannot split them); a PNG cut after its pixel data is read.
Over MAX_IMAGE_PIXELS is `image_too_large` before decoding; an animation gives its first frame (`first_frame_only`).
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

from idefics_cli.documents import damage
from idefics_cli.documents.base import MAX_IMAGE_PIXELS, Document, why
from idefics_cli.documents.sniff import NAMES
from idefics_cli.documents.variants import unsupported_variant
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
        if kind == "png" and not data.endswith(damage.IEND):
            data = damage.complete_png(data) or data  # cut after its pixel data: read what is all there
        if kind == "png" and (fixed := damage.drop_bad_ancillary(data)) is not None:
            data = fixed  # an optional chunk with a bad checksum: dropped, as browsers do
            self.doc_warnings.append("repaired")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
                self._im = PILImage.open(io.BytesIO(data), formats=[_PIL_FORMATS[kind]])
        except PILImage.DecompressionBombError as e:
            raise self._error("image_too_large", f"the image is too large ({e})", "downscale it first") from e
        except Exception as e:
            raise self._unreadable(e, "not a readable {} image") from e
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
            raise self._unreadable(e, "not a readable {} image") from e

    def _unsupported(self, variant: str) -> IdeficsError:
        return self._error("unsupported_format", f"{variant} is not supported", "convert it to PNG first")

    def _unreadable(self, e: BaseException, message: str) -> IdeficsError:
        """`unsupported_format` naming the variant for a well-formed file the decoder cannot read, else `corrupt`."""
        reason = str(e)
        variant = unsupported_variant(self.kind, self._data, reason)
        if variant:
            return self._unsupported(variant)
        detail = "" if reason.startswith("cannot identify image file") else f" ({why(e)})"
        return self._error("corrupt", message.format(NAMES[self.kind]) + detail)

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
            variant = unsupported_variant(self.kind, self._data, str(e))
            if variant:
                raise self._unsupported(variant) from e
            raise  # damaged bytes: `corrupt` (Document.render)
        bits = _bits_per_sample(im)
        try:
            out = ImageOps.exif_transpose(im)
        except Exception:  # a broken EXIF block must not lose the page
            out = im.copy()
        return _at_least_two_pixels(_to_rgb(out, bits))

    def close(self) -> None:
        self._im.close()


def _at_least_two_pixels(im: Image) -> Image:
    """Pad a 1-pixel-wide or -high image with white: the processor cannot split it into crops otherwise."""
    from PIL import Image as PILImage

    if im.width >= 2 and im.height >= 2:
        return im
    out = PILImage.new("RGB", (max(im.width, 2), max(im.height, 2)), (255, 255, 255))
    out.paste(im, (0, 0))
    return out


def _bits_per_sample(im: Image) -> int | None:
    """The bits per sample a TIFF declares (12-bit scans arrive in 16-bit containers), else None."""
    tags = getattr(im, "tag_v2", None)
    value = tags.get(258) if tags is not None else None
    if isinstance(value, (tuple, list)):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) and 1 <= value <= 32 else None


def _to_rgb(im: Image, bits: int | None = None) -> Image:
    """Any mode -> RGB: deep gray scaled by its real range (`bits`, default 16), transparency onto white."""
    from PIL import Image as PILImage

    if im.mode.startswith("I"):  # I, I;16, I;16B, ...: 12-, 16- or 32-bit samples (PNG, TIFF)
        top = (1 << (bits if bits and bits > 8 else 16)) - 1
        im = im.convert("I").point(lambda v: v * (255 / top), "L")
    elif im.mode == "F":  # 32-bit float samples: scientific TIFFs hold 0..1
        low, high = im.getextrema()
        im = im.point(lambda v: v * 255, "L") if 0 <= low and high <= 1 else im.convert("L")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or im.has_transparency_data:
        rgba = im.convert("RGBA")
        out = PILImage.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im if im.mode == "RGB" else im.convert("RGB")


