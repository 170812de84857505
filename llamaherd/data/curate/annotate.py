"""Labels that an LLM gives documents, for training the ``quality`` and ``domain`` classifiers (as Meta did:
Llama 3's quality classifiers learned from labels an earlier Llama produced).

    herd data annotate --judge CKPT_OR_URL --prompt edu_quality --input ... --out labels.jsonl

A prompt is a TOML file (two ship with llamaherd, ``edu_quality`` and ``domain``; see prompts/): a
system message, a user message with ``{text}`` where the document goes, the allowed ``labels`` and an
``answer_pattern`` whose first group, in the judge's reply, is the label. A judge is any callable that
takes a batch of chat conversations and returns one reply each (``llamaherd.eval.judge`` makes one from
a checkpoint or an OpenAI-compatible endpoint). Replies with no label are counted and not written.

    labels.jsonl: {"id", "source", "text", "label", "answer"} per labelled document
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from llamaherd.data.document import Document
from llamaherd.errors import HerdError

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
Judge = Callable[[list[list[dict]]], list[str]]


@dataclass
class Prompt:
    name: str
    labels: list[str]
    answer_pattern: str
    system: str
    user: str
    max_chars: int = 3000
    max_tokens: int = 8

    def messages(self, text: str) -> list[dict]:
        """The chat conversation that asks about ``text`` (cut to ``max_chars``, at a line end if one is near)."""
        if len(text) > self.max_chars:
            cut = text.rfind("\n", 0, self.max_chars)
            text = text[: cut if cut > self.max_chars // 2 else self.max_chars]
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.user.replace("{text}",
                                                                                                         text)}]

    def parse(self, answer: str) -> str | None:
        """The label in ``answer``: the pattern's first match, normalised to one of ``labels``; else None."""
        match = re.search(self.answer_pattern, answer)
        if not match:
            return None
        label = (match.group(1) if match.groups() else match.group(0)).strip().lower().replace(" ", "_")
        return next((known for known in self.labels if known.lower() == label), None)


def builtin_prompts() -> list[str]:
    return sorted(p.stem for p in PROMPTS_DIR.glob("*.toml"))


def load_prompt(name_or_path: str | os.PathLike) -> Prompt:
    """A shipped prompt by name (``edu_quality``, ``domain``) or a prompt TOML file."""
    path = Path(name_or_path)
    if not path.is_file():
        path = PROMPTS_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise HerdError(f"prompt {str(name_or_path)!r} not found: expected a .toml file or one of "
                        f"{', '.join(builtin_prompts())}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise HerdError(f"{path}: not valid TOML ({e})") from None
    missing = [k for k in ("labels", "answer_pattern", "system", "user") if k not in data]
    if missing:
        raise HerdError(f"{path}: missing {', '.join(missing)} (a prompt needs labels, answer_pattern, system, user)")
    if "{text}" not in data["user"]:
        raise HerdError(f"{path}: the user message has no {{text}} where the document goes")
    try:
        re.compile(data["answer_pattern"])
    except re.error as e:
        raise HerdError(f"{path}: answer_pattern is not a regular expression ({e})") from None
    known = {"name", "labels", "answer_pattern", "system", "user", "max_chars", "max_tokens"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise HerdError(f"{path}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}")
    return Prompt(**{"name": path.stem, **data, "labels": [str(x) for x in data["labels"]]})


def annotate(docs: Iterable[Document], judge: Judge, prompt: Prompt, out: str | os.PathLike, *, batch_size: int = 8,
             max_docs: int | None = None, progress: Callable[[int], None] | None = None) -> dict:
    """Ask ``judge`` about each document; write the labelled ones to ``out`` (JSONL, atomically).
    Returns counts: documents asked, labelled, without a label in the reply, and per label."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    counts: Counter = Counter()
    asked = unparsed = 0
    examples: list[str] = []
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            batch: list[Document] = []

            def flush() -> None:
                nonlocal asked, unparsed
                answers = judge([prompt.messages(d.text) for d in batch])
                if len(answers) != len(batch):
                    raise HerdError(f"judge returned {len(answers)} replies for {len(batch)} documents")
                for doc, answer in zip(batch, answers):
                    label = prompt.parse(answer)
                    asked += 1
                    if label is None:
                        unparsed += 1
                        if len(examples) < 5:
                            examples.append(answer[:200])
                        continue
                    counts[label] += 1
                    record = {"id": doc.id, "source": doc.source, "text": doc.text, "label": label, "answer": answer}
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                if progress:
                    progress(asked)
                batch.clear()

            for doc in docs:
                if max_docs is not None and asked + len(batch) >= max_docs:
                    break
                batch.append(doc)
                if len(batch) == batch_size:
                    flush()
            if batch:
                flush()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"asked": asked, "labelled": asked - unparsed, "unparsed": unparsed, "labels": dict(sorted(counts.items())),
            "unparsed_examples": examples}
