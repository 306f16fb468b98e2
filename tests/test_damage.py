"""images.py and pdf.py: evidence of what is wrong with a file (cut PNG tails, page trees, encryption dictionaries)."""

import io

import pymupdf
from hostile import (
    _count_zero_pdf,
    _damaged_encryption_pdf,
    _empty_pdf,
    _encrypted_pdf,
    _image_bytes,
    _png_cut_after_pixels,
)
from PIL import Image

from idefics_cli.documents import images, pdf


def test_png_cut_after_its_pixels_ends_cleanly_and_decodes_pixel_identical():
    cut, pixels = _png_cut_after_pixels()
    fixed = images.complete_png(cut)
    assert fixed is not None and fixed.endswith(images.IEND)
    image = Image.open(io.BytesIO(fixed))
    image.load()
    assert image.tobytes() == pixels


def test_png_cut_inside_its_pixels_or_not_cut_is_left_alone():
    whole = _image_bytes(size=(120, 90))
    assert images.complete_png(whole) is None  # nothing is cut
    assert images.complete_png(whole + b"trailing junk") is None  # junk after IEND: nothing is cut either
    idat = whole.index(b"IDAT")
    assert images.complete_png(whole[:idat + 20]) is None  # the pixel data itself is cut
    assert images.complete_png(b"GIF89a") is None


def _open(data: bytes):
    return pymupdf.open(stream=data, filetype="pdf")


def test_an_empty_page_tree_is_told_from_an_unreachable_one():
    assert pdf.empty_page_tree(_open(_empty_pdf()))
    broken = _open(_count_zero_pdf())
    assert broken.page_count == 0 and not pdf.empty_page_tree(broken)
    assert pdf.page_objects(broken) == 2


def test_encryption_damage_names_the_broken_key_and_passes_a_sound_dictionary():
    assert pdf.encryption_damage(_open(_encrypted_pdf("user"))) is None
    assert pdf.encryption_damage(_open(_empty_pdf())) is None  # not encrypted at all
    why = pdf.encryption_damage(_open(_damaged_encryption_pdf()))
    assert why == "its encryption dictionary is damaged: /U is 28 bytes, revision 6 needs 48"
    rc4 = pymupdf.open()
    rc4.new_page()
    sound = _open(rc4.tobytes(encryption=pymupdf.PDF_ENCRYPT_RC4_128, user_pw="u", owner_pw="o"))
    assert pdf.encryption_damage(sound) is None
