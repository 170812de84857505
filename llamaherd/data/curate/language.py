"""`language`: each document's language and its probability (``meta.language``, ``meta.language_score``),
by py3langid's naive Bayes model over byte n-grams (97 languages; the model ships inside the PyPI
package, nothing is downloaded). Parameters as datatrove's LanguageFilter: with ``languages``, a
document in another language is removed as ``language_not_kept``; one whose best language scores
below ``language_threshold`` is removed as ``language_low_score``; ``label_only`` removes nothing.
Code and tables get low, meaningless scores: label them, do not filter them (``label_only``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from llamaherd.data.curate.base import Record
from llamaherd.errors import HerdError

_IDENTIFIER = None  # one per process, loaded on first use (~20 MB)


def identify(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the language ``text`` is most likely in."""
    global _IDENTIFIER
    if _IDENTIFIER is None:
        try:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier
        except ImportError:
            raise HerdError("the language stage needs py3langid (pip install 'llamaherd[curate]')") from None
        _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    lang, prob = _IDENTIFIER.classify(text)
    return lang, float(prob)


@dataclass
class Language:
    name: ClassVar[str] = "language"
    languages: list[str] | None = None  # ISO 639-1 codes to keep, e.g. ["en"] (None: any language)
    language_threshold: float = 0.65  # documents whose best language scores lower are removed
    label_only: bool = False  # only record meta.language and meta.language_score; remove nothing

    def __post_init__(self):
        if not 0.0 <= self.language_threshold <= 1.0:
            raise HerdError(f"language.language_threshold: expected a probability, got {self.language_threshold}")
        try:
            import py3langid  # noqa: F401
        except ImportError:
            raise HerdError("the language stage needs py3langid (pip install 'llamaherd[curate]')") from None

    def __call__(self, record: Record) -> str | None:
        lang, score = identify(record.text)
        record.meta["language"], record.meta["language_score"] = lang, round(score, 4)
        if self.label_only:
            return None
        if self.languages is not None and lang not in self.languages:
            return "language_not_kept"
        return "language_low_score" if score < self.language_threshold else None
