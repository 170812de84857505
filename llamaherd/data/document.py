"""The unit of raw text every data stage passes along: one document, its id and where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Document:
    id: str  # unique within its source: a file path, path:line, or the record's own id
    text: str
    source: str  # the file (or stdlib:code / stdlib:prose) it came from
    # the record's other fields (e.g. "url"), when the reader is asked to keep them
    meta: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
