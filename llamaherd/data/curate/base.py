"""What every curation stage is: a small dataclass whose fields are its parameters, called on records.

    @dataclass
    class GopherQuality:                   # one module per stage, named as the stage
        name: ClassVar[str] = "gopher_quality"
        min_doc_words: int | None = 50     # parameters: datatrove's names and defaults where it has them
        ...
        def __call__(self, record: Record) -> str | None:
            return "gopher_short_doc" if ... else None   # why the record is removed, or None to keep it

A *document stage* sees one record at a time and may change its ``text`` (``normalize``, ``pii``) or
add to its ``meta`` (``language``: language and score); it returns the reason to remove the record,
or None to keep it. A stage that is faster on many records at once (a classifier) may also define
``batch(records) -> [reason or None, ...]``, which the pipeline then calls with a whole shard.
Stages run shard by shard in worker processes, so a stage object must pickle (a dataclass of plain
values does; build anything heavy lazily, where it is used). A recipe sets parameters by field name
(``gopher_quality.min_doc_words=100``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Record:
    """One document as the curation pipeline carries and writes it (a line of ``kept/*.jsonl``)."""

    id: str
    text: str
    source: str
    meta: dict = field(default_factory=dict)  # what stages annotate: language and score, quality, domain, ...

    def to_dict(self) -> dict:
        return {"id": self.id, "text": self.text, "source": self.source, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> "Record":
        return cls(id=d["id"], text=d["text"], source=d["source"], meta=dict(d.get("meta") or {}))
