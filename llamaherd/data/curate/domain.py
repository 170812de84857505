"""`domain`: a text classifier's domain label for every document (``meta.domain`` and
``meta.domain_score``, its probability). With ``keep``, documents of other domains are removed as
``other_domain``; by default every document stays, tagged, for ``mix`` to balance.

The classifier is a directory written by ``herd data train-classifier`` from labels an LLM gave
(``herd data annotate --prompt domain``: code, math, prose, other_language).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from llamaherd.data.curate.base import Record
from llamaherd.data.curate.classifier import TextClassifier
from llamaherd.data.curate.quality import check_classifier


@dataclass
class Domain:
    name: ClassVar[str] = "domain"
    model: str = ""  # a directory written by herd data train-classifier (a classification of domains)
    keep: list[str] | None = None  # domains to keep (None: all)

    def __post_init__(self):
        check_classifier(self.name, self.model, "classification")
        self._clf = None

    def __getstate__(self):
        return {**self.__dict__, "_clf": None}

    def batch(self, records: list[Record]) -> list[str | None]:
        if self._clf is None:
            self._clf = TextClassifier(self.model)
        labels, probs = self._clf.labels([r.text for r in records]) if records else ([], [])
        out = []
        for record, label, p in zip(records, labels, probs):
            record.meta["domain"], record.meta["domain_score"] = label, round(float(p), 4)
            out.append("other_domain" if self.keep is not None and label not in self.keep else None)
        return out

    def __call__(self, record: Record) -> str | None:
        return self.batch([record])[0]
