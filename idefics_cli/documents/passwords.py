"""Passwords: SASLprep (RFC 4013), the normalisation PDF 2.0 prescribes for AES-256 (revision 5 and 6) passwords.

Contract: `saslprep(text)` maps non-ASCII spaces to U+0020, drops characters "commonly mapped to nothing"
(soft hyphen, zero-width joiners...), applies NFKC and checks the prohibited-output and bidirectional rules of
RFC 4013 (unassigned code points are allowed, as for a query). It returns the prepared string, or None when
the text contains a prohibited character or breaks the bidi rule. `candidates(password)` is the password as
given, then its SASLprep form when that differs: what `documents` tries, in that order. Standard library only.
"""

from __future__ import annotations

import stringprep
import unicodedata

_PROHIBITED = (
    stringprep.in_table_c12,  # non-ASCII space (after mapping, none are left; kept for the letter of the RFC)
    stringprep.in_table_c21_c22,  # control characters
    stringprep.in_table_c3,  # private use
    stringprep.in_table_c4,  # non-character code points
    stringprep.in_table_c5,  # surrogate codes
    stringprep.in_table_c6,  # inappropriate for plain text
    stringprep.in_table_c7,  # inappropriate for canonical representation
    stringprep.in_table_c8,  # change display properties or deprecated
    stringprep.in_table_c9,  # tagging characters
)


def saslprep(text: str) -> str | None:
    """The SASLprep form of `text`, or None when RFC 4013 prohibits it."""
    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c))
    prepared = unicodedata.normalize("NFKC", mapped)
    if any(check(c) for c in prepared for check in _PROHIBITED):
        return None
    if any(stringprep.in_table_d1(c) for c in prepared):  # right-to-left text: RFC 3454 section 6
        if any(stringprep.in_table_d2(c) for c in prepared):
            return None
        if not (stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])):
            return None
    return prepared


def candidates(password: str) -> list[str]:
    """The password as typed, then its SASLprep form when that is different and allowed."""
    prepared = saslprep(password)
    return [password] if prepared in (None, password) else [password, prepared]
