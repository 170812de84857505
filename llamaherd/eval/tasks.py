"""Evaluation tasks: multiple-choice items from local files in published layouts, or built in.

    task = load_task("data/mmlu:mmlu")          # PATH:LAYOUT (a file, or a directory of split files)
    task = load_task("stdlib_docstring_mc")     # built in, from the embedded corpus
    context, continuations = task.requests(task.items[0], num_fewshot=5)

Layouts (the fields of the datasets as they are published):

    mmlu   question; four choices as ``choices`` or as columns A, B, C, D; ``answer`` an index (0-3) or a
           letter (A-D); ``subject`` optional (else, for a CSV, the file name's part before _dev/_test/_val).
           CSV files with a header, or headerless as the original release (question, A, B, C, D, answer);
           JSONL or Parquet as on the Hugging Face Hub (cais/mmlu).
    arc    question; ``choices`` {"text": [...], "label": [...]}; ``answerKey`` one of the labels
           (allenai/ai2_arc: JSONL or Parquet).
    perplexity  texts (.txt, .jsonl with "text", .parquet, or a directory of them), scored in bits per byte.

PATH may be one file (the items; few-shot examples are the first others of the same file, or of the file
named alike with "dev" / "train" for "test") or a directory: its files with "test" in the name are the items,
those with "dev" (mmlu) or "train" (arc) in the name the few-shot examples.

Prompts are lm-evaluation-harness's for the same tasks, so that numbers compare: mmlu "The following are
multiple choice questions (with answers) about SUBJECT.\\n\\n", then each example as "QUESTION\\nA. ...\\n
B. ...\\nC. ...\\nD. ...\\nAnswer:" followed (for a few-shot example) by " LETTER", examples separated by a
blank line, the answer choices " A" ... " D" (first_n few-shot examples of the same subject from the dev
split); arc "Question: QUESTION\\nAnswer:" and the choices' texts after a space.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass, field
from pathlib import Path

from llamaherd.errors import HerdError

LAYOUTS = ("mmlu", "arc", "perplexity")
BUILTIN = ("stdlib_docstring_mc", "stdlib_perplexity")
LETTERS = "ABCD"
SUFFIXES = (".csv", ".jsonl", ".jsonl.gz", ".json", ".parquet")


@dataclass
class MCItem:
    """One multiple-choice question: ``text`` the prompt for it, ``choices`` the continuations' texts (without
    the space before them), ``gold`` the right one's index; ``where`` names its file and line."""

    text: str
    choices: list[str]
    gold: int
    where: str
    subject: str = ""


@dataclass
class Task:
    """``items`` to score, ``fewshot`` the pool few-shot examples come from (the items themselves when
    empty, never an item for itself); ``description`` before the examples (``{subject}`` filled in)."""

    name: str
    items: list[MCItem]
    fewshot: list[MCItem] = field(default_factory=list)
    description: str = ""
    default_fewshot: int = 0
    kind: str = "multiple_choice"  # or "perplexity": ``texts`` scored as a whole, in bits per byte
    texts: list[str] = field(default_factory=list)

    def shots(self, item: MCItem, k: int) -> list[MCItem]:
        """The first ``k`` examples of the pool with ``item``'s subject, ``item`` itself left out."""
        pool = self.fewshot or self.items
        out = [x for x in pool if x.subject == item.subject and x is not item]
        if len(out) < k:
            raise HerdError(f"task {self.name}: {k}-shot needs {k} examples of subject {item.subject!r} besides the "
                            f"item, there are {len(out)}")
        return out[:k]

    def requests(self, item: MCItem, num_fewshot: int | None = None) -> tuple[str, list[str]]:
        """(context, continuations): the text the model reads, then each choice as the harness appends it."""
        k = self.default_fewshot if num_fewshot is None else num_fewshot
        subject = item.subject.replace("_", " ")
        head = self.description.format(subject=subject) if self.description else ""
        shots = "".join(f"{x.text} {x.choices[x.gold]}\n\n" for x in self.shots(item, k)) if k else ""
        return head + shots + item.text, [" " + c for c in item.choices]


def load_task(spec: str) -> Task:
    """A task from ``PATH:LAYOUT`` or a built-in name; a one-line error naming the file and line otherwise."""
    if spec == "stdlib_docstring_mc":
        return stdlib_docstring_mc()
    if spec == "stdlib_perplexity":
        return perplexity_task(spec, "stdlib:val")
    path, sep, layout = spec.rpartition(":")
    if not sep or not path:
        known = ", ".join(BUILTIN)
        raise HerdError(f"task {spec!r}: expected a built-in task ({known}) or PATH:LAYOUT with LAYOUT one of "
                        f"{', '.join(LAYOUTS)} (nothing is downloaded: give the local file)")
    if layout not in LAYOUTS:
        raise HerdError(f"task {spec!r}: unknown layout {layout!r} (expected one of {', '.join(LAYOUTS)})")
    root = Path(path)
    if not root.exists():
        raise HerdError(f"{root}: file not found")
    if layout == "perplexity":
        return perplexity_task(spec, root)
    shots_word = "dev" if layout == "mmlu" else "train"
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(SUFFIXES))
        tests = [p for p in files if "test" in p.name.lower()]
        shots = [p for p in files if shots_word in p.name.lower()]
        if not tests:
            raise HerdError(f"{root}: no file with 'test' in its name ({', '.join(SUFFIXES)})")
    else:
        tests, shots = [root], []
        if "test" in root.name:
            sibling = root.with_name(root.name.replace("test", shots_word))
            shots = [sibling] if sibling.is_file() else []
    read = _mmlu_items if layout == "mmlu" else _arc_items
    items = [x for p in tests for x in read(p)]
    if not items:
        raise HerdError(f"{root}: no items")
    if layout == "mmlu":
        return Task(spec, items, [x for p in shots for x in read(p)], description=(
            "The following are multiple choice questions (with answers) about {subject}.\n\n"), default_fewshot=5)
    return Task(spec, items, [x for p in shots for x in read(p)])


# ---- layouts ----


def _rows(path: Path):
    """(where, record) of a CSV (a dict per row with a header naming 'question', else a list) or records file."""
    if path.name.lower().endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if rows and "question" in [c.strip().lower() for c in rows[0]]:
            header = [c.strip() for c in rows[0]]
            yield from ((f"{path}:{i}", dict(zip(header, r, strict=False))) for i, r in enumerate(rows[1:], 2))
        else:
            yield from ((f"{path}:{i}", r) for i, r in enumerate(rows, 1) if r)
        return
    from llamaherd.data.records import read_records

    yield from read_records(path)


def _field(record: dict, name: str, where: str):
    if name not in record or record[name] is None:
        raise HerdError(f"{where}: no {name!r} field")
    return record[name]


def _subject_of(path: Path) -> str:
    stem = path.name.split(".")[0]
    for split in ("_test", "_dev", "_val", "_validation", "_train"):
        if stem.endswith(split):
            return stem[: -len(split)]
    return ""


def _mmlu_items(path: Path) -> list[MCItem]:
    out = []
    for where, r in _rows(path):
        if isinstance(r, list):  # the original release: question, A, B, C, D, answer
            if len(r) != 6:
                raise HerdError(f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(r)}")
            r = {"question": r[0], "A": r[1], "B": r[2], "C": r[3], "D": r[4], "answer": r[5]}
        question = str(_field(r, "question", where))
        if "choices" in r:
            choices = r["choices"]
            if not isinstance(choices, list) or len(choices) != 4:
                raise HerdError(f"{where}: 'choices' must be a list of 4, got {choices!r:.60}")
        elif all(k in r for k in LETTERS):
            choices = [r[k] for k in LETTERS]
        else:
            raise HerdError(f"{where}: no 'choices' field and no A, B, C, D columns")
        answer = _field(r, "answer", where)
        gold = _answer_index(answer, 4, where)
        subject = str(r.get("subject") or _subject_of(path))
        text = f"{question.strip()}\nA. {choices[0]}\nB. {choices[1]}\nC. {choices[2]}\nD. {choices[3]}\nAnswer:"
        out.append(MCItem(text, list(LETTERS), gold, where, subject))
    return out


def _answer_index(answer, n: int, where: str) -> int:
    if isinstance(answer, str) and answer.strip().upper() in LETTERS[:n] and answer.strip():
        return LETTERS.index(answer.strip().upper())
    try:
        i = int(answer)
    except (TypeError, ValueError):
        expected = f"an index 0-{n - 1} or a letter A-{LETTERS[n - 1]}"
        raise HerdError(f"{where}: answer {answer!r} is not {expected}") from None
    if not 0 <= i < n:
        raise HerdError(f"{where}: answer index {i} is out of range (expected 0-{n - 1})")
    return i


def _arc_items(path: Path) -> list[MCItem]:
    out = []
    for where, r in _rows(path):
        if isinstance(r, list):
            raise HerdError(f"{where}: an arc CSV needs a header (question, choices, answerKey)")
        question = str(_field(r, "question", where))
        choices = _field(r, "choices", where)
        if not isinstance(choices, dict) or not isinstance(choices.get("text"), list) or not choices["text"]:
            raise HerdError(f"{where}: 'choices' must be {{\"text\": [...], \"label\": [...]}}")
        labels = choices.get("label") or []
        if len(labels) != len(choices["text"]):
            raise HerdError(f"{where}: 'choices' has {len(choices['text'])} texts but {len(labels)} labels")
        key = str(_field(r, "answerKey", where))
        if key not in labels:
            raise HerdError(f"{where}: answerKey {key!r} is not one of the labels {labels}")
        texts = [str(t) for t in choices["text"]]
        out.append(MCItem(f"Question: {question}\nAnswer:", texts, labels.index(key), where))
    return out


def perplexity_task(name: str, source) -> Task:
    """Texts to score in bits per byte: .txt / .jsonl ("text") / .parquet files, a directory of them, or
    "stdlib:val" (the held-out modules of the main job's corpus, the text its validation loss is taken on)."""
    from llamaherd.data.sources import read_documents

    texts = [d.text for d in read_documents([str(source)]) if d.text]
    return Task(name, [], kind="perplexity", texts=texts)


# ---- built in ----


def stdlib_docstring_mc(n_choices: int = 4, seed: int = 0) -> Task:
    """Held-out docstring multiple choice: which function of the held-out standard-library modules does this
    docstring describe? Four names, the right one and three others drawn (seeded) from the same split."""
    from llamaherd.posttrain.embedded import _functions

    fns = _functions("val")
    names = sorted({f"{f.module}.{f.qualname}" for f in fns})
    items = []
    for f in fns:
        name = f"{f.module}.{f.qualname}"
        rng = random.Random(f"{seed}:{name}")
        others = rng.sample([n for n in names if n != name], n_choices - 1)
        choices = others[:]
        gold = rng.randrange(n_choices)
        choices.insert(gold, name)
        text = f"Docstring: {f.paragraph}\nWhich function does this docstring describe?\nAnswer:"
        items.append(MCItem(text, choices, gold, f"stdlib_docstring_mc {name}"))
    return Task("stdlib_docstring_mc", items)
