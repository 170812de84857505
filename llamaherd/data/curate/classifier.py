"""Fast n-gram linear text classifiers (scikit-learn) for the ``quality`` and ``domain`` stages.

    herd data train-classifier --labels labels.jsonl --out clf/

Unigrams and bigrams of words and symbols, hashed (no vocabulary to store), TF-IDF weighted, into a
linear model:
ridge regression when every label is a number (the 0-5 educational scores: the model predicts a
score), logistic regression (fitted by SGD) otherwise (the domains: the model predicts a label and its
probability).
A seeded held-out split measures it: for scores, the mean absolute error, the accuracy of the
rounded score and the AUC of telling documents at or above ``cut`` (FineWeb-Edu kept scores >= 3)
from the rest; for labels, the accuracy and the one-vs-rest macro AUC.

    clf/model.joblib       the fitted scikit-learn pipeline
    clf/classifier.json    kind, labels, cut, metrics, training size: what the stages and the report read
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from llamaherd.errors import HerdError

MODEL, INFO = "model.joblib", "classifier.json"


def _sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise HerdError("text classifiers need scikit-learn (pip install 'llamaherd[curate]')") from None


def _features():
    from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer
    from sklearn.pipeline import make_pipeline

    # words and single symbols: punctuation is much of what tells code, math and prose apart
    tokens = r"(?u)\b\w+\b|[^\w\s]"
    return make_pipeline(HashingVectorizer(ngram_range=(1, 2), n_features=2**20, alternate_sign=False,
                                           lowercase=True, token_pattern=tokens), TfidfTransformer(sublinear_tf=True))


def read_labels(path: str | os.PathLike, label_field: str = "label", text_field: str = "text") -> tuple[list, list]:
    """Texts and labels from a JSONL file (what ``herd data annotate`` writes)."""
    path = Path(path)
    if not path.is_file():
        raise HerdError(f"{path}: labels file not found")
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text, label = record[text_field], record[label_field]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise HerdError(f"{path}:{lineno}: expected a JSON object with {text_field!r} and {label_field!r}") \
                    from None
            texts.append(str(text))
            labels.append(str(label))
    if len(set(labels)) < 2:
        raise HerdError(f"{path}: {len(texts)} examples with {len(set(labels))} label(s); training needs at least two")
    return texts, labels


def _is_numeric(labels: list[str]) -> bool:
    try:
        [float(x) for x in labels]
    except ValueError:
        return False
    return True


def train_classifier(texts: list[str], labels: list[str], out_dir: str | os.PathLike, *, cut: float = 3.0,
                     test_fraction: float = 0.2, seed: int = 0) -> dict:
    """Fit on a seeded split of (texts, labels), measure on the held-out rest, refit on everything, save."""
    _sklearn()
    import joblib
    from sklearn.linear_model import Ridge, SGDClassifier
    from sklearn.metrics import accuracy_score, mean_absolute_error, roc_auc_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline

    numeric = _is_numeric(labels)
    y = np.array([float(x) for x in labels]) if numeric else np.array(labels)

    def model():
        # logistic regression fitted by SGD: as accurate here as lbfgs and 50x faster on hashed n-grams
        head = Ridge(alpha=1.0) if numeric else SGDClassifier(loss="log_loss", alpha=1e-5, random_state=seed)
        return make_pipeline(_features(), head)

    stratify = None if numeric or min(np.unique(y, return_counts=True)[1]) < 2 else y
    x_train, x_test, y_train, y_test = train_test_split(texts, y, test_size=test_fraction, random_state=seed,
                                                        stratify=stratify)
    fitted = model().fit(x_train, y_train)
    metrics: dict = {"train": len(x_train), "held_out": len(x_test)}
    if numeric:
        pred = fitted.predict(x_test)
        metrics["mae"] = float(mean_absolute_error(y_test, pred))
        metrics["accuracy_rounded"] = float(accuracy_score(np.rint(y_test), np.clip(np.rint(pred), y.min(), y.max())))
        positive = y_test >= cut
        metrics["auc"] = float(roc_auc_score(positive, pred)) if 0 < positive.sum() < len(positive) else None
    else:
        proba = fitted.predict_proba(x_test)
        metrics["accuracy"] = float(accuracy_score(y_test, fitted.classes_[proba.argmax(1)]))
        present = [c for c in fitted.classes_ if (y_test == c).any() and not (y_test == c).all()]
        aucs = [roc_auc_score(y_test == c, proba[:, list(fitted.classes_).index(c)]) for c in present]
        metrics["auc"] = float(np.mean(aucs)) if aucs else None
    final = model().fit(texts, y)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    joblib.dump(final, out / MODEL)
    info = {"kind": "regression" if numeric else "classification", "cut": cut if numeric else None,
            "labels": sorted(set(labels), key=lambda v: float(v) if numeric else v), "metrics": metrics,
            "examples": len(texts)}
    (out / INFO).write_text(json.dumps(info, indent=1) + "\n")
    return info


class TextClassifier:
    """A classifier written by ``train_classifier``: ``scores(texts)`` (regression) or ``labels(texts)``."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not (path / MODEL).is_file() or not (path / INFO).is_file():
            raise HerdError(f"{path}: not a classifier directory (expected {MODEL} and {INFO}, "
                            "written by herd data train-classifier)")
        _sklearn()
        import joblib

        self.path = path
        self.info = json.loads((path / INFO).read_text())
        self.model = joblib.load(path / MODEL)

    def scores(self, texts: list[str]) -> np.ndarray:
        if self.info["kind"] != "regression":
            raise HerdError(f"{self.path}: a {self.info['kind']} model gives labels, not scores")
        return self.model.predict(texts)

    def labels(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        """The most likely label of each text, and its probability."""
        if self.info["kind"] != "classification":
            raise HerdError(f"{self.path}: a {self.info['kind']} model gives scores, not labels")
        proba = self.model.predict_proba(texts)
        return [str(c) for c in self.model.classes_[proba.argmax(1)]], proba.max(1)
