"""Test-set contamination: which of a task's items share a word n-gram with the training data.

    report = decontaminate(load_task("data/mmlu:mmlu"), "runs/tiny/data/train", n=13)
    report["contaminated"], report["items"]      # items with at least one shared 13-gram, of all

As GPT-3 and the Llama papers did it: texts are lowercased and split into words (runs of letters and digits),
and an item is contaminated when any n consecutive words of it (13 by default) appear in the training data;
an item of fewer than n words counts when its whole word sequence appears. The item's text is what the
model reads for it without few-shot examples and its answer (a question and its choices; a math problem and
its worked solution; a code prompt and its reference solution; a perplexity text whole).

The training data: a packed dataset directory (``herd data pack`` / ``herd run``'s ``data/train``, decoded with
the tokenizer that packed it, found beside it or given), or curated / raw JSONL, text or Parquet files (their
``text`` field). The task's n-grams are kept in memory and the training text is streamed past them.
"""

from __future__ import annotations

import re
from pathlib import Path

from llamaherd.errors import HerdError
from llamaherd.eval.tasks import Task

WORD = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def _item_texts(task: Task) -> list[tuple[str, str]]:
    if task.kind == "perplexity":
        return [(f"text {i}", t) for i, t in enumerate(task.texts)]
    if task.kind == "multiple_choice":
        return [(it.where, it.text + " " + " ".join(it.choices)) for it in task.items]
    return [(it.where, it.text + " " + it.target) for it in task.items]


def training_texts(source: str | Path, tokenizer: str | Path | None = None):
    """The training data's documents as text: a packed dataset directory, or text / JSONL / Parquet inputs."""
    source = Path(source)
    if (source / "meta.json").is_file():
        from llamaherd.data.pack import PackedDataset
        from llamaherd.tokenizer import Tokenizer

        ds = PackedDataset(source)
        if tokenizer is None:
            found = [p / "tokenizer.model" for p in (source, *source.parents[:3]) if (p / "tokenizer.model").is_file()]
            if not found:
                raise HerdError(f"{source}: a packed dataset; give the tokenizer that packed it (--tokenizer)")
            tokenizer = found[0]
        tok = Tokenizer.from_file(tokenizer)
        ds.check_tokenizer(tok, tokenizer)
        specials = set(tok.special_tokens.values())
        for i in range(len(ds)):
            yield tok.decode([t for t in ds.doc(i).tolist() if t not in specials])
        return
    from llamaherd.data.sources import read_documents

    for doc in read_documents([str(source)]):
        yield doc.text


def decontaminate(task: Task, source: str | Path, *, n: int = 13, tokenizer: str | Path | None = None,
                  progress=None) -> dict:
    """{"task", "n", "items", "contaminated", "fraction", "documents", "contaminated_items": [where, ...]}."""
    if n < 1:
        raise HerdError(f"n-gram length {n}: expected 1 or more")
    grams: dict[tuple[str, ...], set[int]] = {}
    items = _item_texts(task)
    short: dict[tuple[str, ...], set[int]] = {}  # items of fewer than n words: their whole sequence
    for k, (_, text) in enumerate(items):
        w = words(text)
        if len(w) < n:
            if w:
                short.setdefault(tuple(w), set()).add(k)
            continue
        for i in range(len(w) - n + 1):
            grams.setdefault(tuple(w[i : i + n]), set()).add(k)
    hit: set[int] = set()
    documents = 0
    lengths = sorted({len(s) for s in short})
    for text in training_texts(source, tokenizer):
        documents += 1
        w = words(text)
        for i in range(len(w) - n + 1):
            found = grams.get(tuple(w[i : i + n]))
            if found:
                hit |= found
        for m in lengths:
            for i in range(len(w) - m + 1):
                found = short.get(tuple(w[i : i + m]))
                if found:
                    hit |= found
        if progress:
            progress(documents)
    if documents == 0:
        raise HerdError(f"{source}: no training documents")
    return {"task": task.name, "n": n, "items": len(items), "contaminated": len(hit),
            "fraction": len(hit) / max(len(items), 1), "documents": documents,
            "contaminated_items": [items[k][0] for k in sorted(hit)]}
