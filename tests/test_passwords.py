"""pdf.py's passwords: SASLprep (RFC 4013) as the PDF standard prescribes for AES-256 passwords."""

import pytest

from idefics_cli.documents.pdf import candidates, saslprep


@pytest.mark.parametrize("given, prepared", [
    ("I\u00adX", "IX"),  # soft hyphen is mapped to nothing (RFC 4013 section 3, example 1)
    ("user", "user"),  # no transformation (example 2)
    ("USER", "USER"),  # case preserved (example 3)
    ("\u00aa", "a"),  # NFKC (example 4)
    ("\u2168", "IX"),  # NFKC (example 5)
    ("pass\u00a0word", "pass word"),  # a non-ASCII space becomes a space
    ("pa\u0308sswo\u0308rd", "pässwörd"),  # decomposed input composes
    ("\u0627\u0628", "\u0627\u0628"),  # right-to-left only: allowed
])
def test_rfc4013_mappings_and_examples(given, prepared):
    assert saslprep(given) == prepared


@pytest.mark.parametrize("given", ["\u0007", "a\ue000", "\u0627" + "1", "\u0627b\u0627"])
def test_prohibited_output_and_bidi_are_refused(given):
    # a control character (example 6), private use, RTL text not ending RTL, RTL mixed with LTR letters
    assert saslprep(given) is None


def test_candidates_try_the_password_as_typed_first():
    assert candidates("plain") == ["plain"]
    assert candidates("pa\u0308ss") == ["pa\u0308ss", "päss"]
    assert candidates("\u0007") == ["\u0007"]
