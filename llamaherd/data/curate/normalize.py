"""`normalize`: Unicode NFC, control characters and whitespace, the same way for every document.

Indentation is left alone (much of a corpus may be code): spaces are changed only at the ends of
lines. A document with nothing but whitespace left is removed as ``empty``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import ClassVar

from llamaherd.data.curate.base import Record
from llamaherd.errors import HerdError

# C0/C1 control characters other than tab and newline (carriage returns are handled as newlines)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# spaces that are not ASCII (no-break, en/em and other typographic spaces, ideographic space)
_SPACES = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)


@dataclass
class Normalize:
    name: ClassVar[str] = "normalize"
    form: str = "NFC"  # Unicode normalization form: NFC, NFKC, NFD, NFKD, or "" for none
    newlines: bool = True  # "\r\n" and "\r" become "\n"
    control_chars: bool = True  # remove control characters other than tab and newline
    unicode_spaces: bool = True  # no-break and other typographic spaces become " "
    strip_trailing_spaces: bool = True  # at the end of every line
    max_blank_lines: int | None = 2  # longer runs of blank lines are cut to this many (None: keep them)
    strip: bool = True  # no blank lines at the start or the end

    def __post_init__(self):
        if self.form not in ("", "NFC", "NFKC", "NFD", "NFKD"):
            raise HerdError(f"normalize.form: {self.form!r} is not a Unicode normalization form "
                            "(expected NFC, NFKC, NFD, NFKD or \"\")")
        if self.max_blank_lines is not None and self.max_blank_lines < 0:
            raise HerdError(f"normalize.max_blank_lines: expected >= 0 or null, got {self.max_blank_lines}")

    def __call__(self, record: Record) -> str | None:
        text = record.text
        if self.form:
            text = unicodedata.normalize(self.form, text)
        if self.newlines and "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if self.control_chars:
            text = _CONTROL.sub("", text)
        if self.unicode_spaces:
            text = _SPACES.sub(" ", text)
        if self.strip_trailing_spaces:
            text = _TRAILING.sub("", text)
        if self.max_blank_lines is not None:
            text = re.sub(r"\n{%d,}" % (self.max_blank_lines + 2), "\n" * (self.max_blank_lines + 1), text)
        if self.strip:
            text = text.strip("\n")
        record.text = text
        return None if text.strip() else "empty"
