"""`quality`: a text classifier's quality score for every document (``meta.quality``); documents scored
below ``threshold`` are removed as ``low_quality``.

The classifier is a directory written by ``herd data train-classifier`` from labels an LLM gave
(``herd data annotate --prompt edu_quality``): a regression on the 0-5 educational scale, where
FineWeb-Edu kept documents scored 3 or more.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from llamaherd.data.curate.base import Record
from llamaherd.data.curate.classifier import INFO, MODEL, TextClassifier
from llamaherd.errors import HerdError


def check_classifier(stage: str, model: str, kind: str) -> None:
    """A one-line error, before any work, unless ``model`` is a classifier directory of ``kind``."""
    if not model:
        raise HerdError(f"{stage}.model: set it to a directory written by herd data train-classifier")
    path = Path(model)
    if not (path / MODEL).is_file() or not (path / INFO).is_file():
        raise HerdError(f"{stage}.model: {model} is not a classifier directory (expected {MODEL} and {INFO})")
    found = json.loads((path / INFO).read_text()).get("kind")
    if found != kind:
        raise HerdError(f"{stage}.model: {model} is a {found} model; the {stage} stage needs a {kind} model")


@dataclass
class Quality:
    name: ClassVar[str] = "quality"
    model: str = ""  # a directory written by herd data train-classifier (a regression on quality scores)
    threshold: float = 3.0  # documents scored below this are removed

    def __post_init__(self):
        check_classifier(self.name, self.model, "regression")
        self._clf = None

    def __getstate__(self):  # the classifier is loaded where it is used, not sent to every worker
        return {**self.__dict__, "_clf": None}

    def batch(self, records: list[Record]) -> list[str | None]:
        if self._clf is None:
            self._clf = TextClassifier(self.model)
        scores = self._clf.scores([r.text for r in records]) if records else []
        out = []
        for record, score in zip(records, scores):
            record.meta["quality"] = round(float(score), 4)
            out.append("low_quality" if score < self.threshold else None)
        return out

    def __call__(self, record: Record) -> str | None:
        return self.batch([record])[0]
