"""Passwords: SASLprep (RFC 4013), the normalisation PDF 2.0 prescribes for AES-256 (revision 5 and 6) passwords.

Contract: `saslprep(text)`: the prepared string (RFC 4013 mapping, NFKC, prohibited-output and bidi rules;
unassigned code points allowed), or None when RFC 4013 prohibits it. `candidates(password)`: the password as
given, then its SASLprep form when that differs, the order PDFs are tried in.
"""

from __future__ import annotations

import stringprep
import unicodedata

# RFC 4013 2.3: non-ASCII space, control, private use, non-character, surrogate, and tables C.6 to C.9
_PROHIBITED = (stringprep.in_table_c12, stringprep.in_table_c21_c22, stringprep.in_table_c3, stringprep.in_table_c4,
               stringprep.in_table_c5, stringprep.in_table_c6, stringprep.in_table_c7, stringprep.in_table_c8,
               stringprep.in_table_c9)


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
