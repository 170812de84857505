"""The embedded default post-training data, built from the stdlib corpus that pretraining reads.

Nothing is shipped or downloaded: every example comes from the installed Python standard library,
so the same Python version gives the same data. Two kinds of instruction example:

- ``explain``: "What does `json.dumps` do?" -> the first paragraph of its docstring, for every
  public, documented top-level function and method of a public class;
- ``write``: "Write `quote(s)` that returns a shell-escaped version of the string *s*." (the first
  sentence of the docstring, its leading verb put in the third person) -> the whole ``def`` as the
  file holds it, decorators and docstring included, for public top-level functions of at most
  MAX_LINES lines and MAX_CHARS characters whose docstring starts with a verb.

Preference pairs reuse the prompts and choose the right answer; the rejected one is another
function's first paragraph of about the same length (explain) or the same source with one small bug
(write, see CORRUPTIONS).

Modules come in the corpus's hash order, functions in source order. Splits are by module, as in
``stdlib_corpus``: "val" is exactly the modules that ``split_of`` holds out, so no module gives
examples to both. Private modules (a dotted part starting with "_"), test suites and
``pydoc_data.topics`` give none.
"""

from __future__ import annotations

import ast
import bisect
import random
import re
from functools import lru_cache
from typing import NamedTuple

from llamaherd.data.stdlib_corpus import PROSE_ONLY, TEST_DIRS, _read, split_of, stdlib_modules
from llamaherd.errors import HerdError

KINDS = ("explain", "write")
SPLITS = ("train", "val")
MIN_ANSWER, MAX_ANSWER = 20, 600  # characters of an explain answer
MAX_LINES, MAX_CHARS = 40, 1500  # of a write answer, so that examples fit a short context
LENGTH_RATIO = 1.2  # an explain pair's rejected answer is at most this much longer or shorter than the chosen
CORRUPTIONS = ("compare", "boolop", "return", "constant", "drop-line")
# first words of docstrings that are not verbs, so "Write `f(x)` that ..." cannot take them
NOT_VERBS = {
    "a", "an", "the", "this", "same", "like", "given", "if", "for", "when", "with", "as", "in", "used",
    "equivalent", "decorator", "special", "main", "helper", "internal", "utility", "convenience", "function",
    "class", "simple", "fast", "small", "version", "shorthand", "replacement", "recursive", "default", "dummy",
    "robust", "generator", "iterator", "wrapper", "factory", "coroutine", "directory", "path", "script",
    "deprecated", "removed", "unrelated", "data", "we", "type", "union", "covariance", "slope", "timeout",
    "encoding", "decoding", "processing", "comment", "subelement", "formatted", "typed", "shallow", "deep", "sun",
    "lookup", "simply",
}  # fmt: skip


class _Function(NamedTuple):
    module: str
    qualname: str  # "dumps", "JSONEncoder.encode"
    paragraph: str  # the docstring's first paragraph on one line
    write: tuple[str, str] | None  # (prompt, source) when the function makes a write example


def _first_paragraph(doc: str) -> str:
    """The lines of a cleaned docstring up to the first blank one, joined by spaces."""
    lines = []
    for line in doc.strip().split("\n"):
        if not line.strip():
            break
        lines.append(line.strip())
    return " ".join(lines)


def _third_person(verb: str) -> str:
    if verb.endswith("s") and not verb.endswith("ss"):
        return verb  # "returns", "does"
    if verb.endswith(("ss", "sh", "ch", "x", "z", "o")):
        return verb + "es"
    if len(verb) > 1 and verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _task(paragraph: str) -> str | None:
    """The first sentence as a clause after "that": "Return x." -> "returns x"; None if not a verb."""
    end = re.search(r"(?<!e\.g)(?<!i\.e)(?<!etc)\.(?=\s|$)", paragraph)
    sentence = paragraph[: end.start()] if end else paragraph
    first, _, rest = sentence.partition(" ")
    if first.endswith("ly") and not first.endswith("ply"):  # an adverb: "Recursively", "Quickly"
        return None
    if not re.fullmatch(r"[A-Z][a-z]+(-[a-z]+)?", first) or first.lower() in NOT_VERBS:
        return None
    if not rest or sentence.endswith(":") or len(sentence) < 10:
        return None
    return f"{_third_person(first.lower())} {rest}"


def _source(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """A top-level def as the file's ``lines`` hold it, from its first decorator to its end."""
    start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    last = lines[node.end_lineno - 1].encode()[: node.end_col_offset].decode()  # the offset counts bytes
    return "".join(lines[start - 1 : node.end_lineno - 1]) + last


@lru_cache(maxsize=None)
def _functions(split: str) -> tuple[_Function, ...]:
    found: list[_Function] = []
    for module, path in stdlib_modules():
        parts = module.split(".")
        if split_of(module) != split or module == PROSE_ONLY or not TEST_DIRS.isdisjoint(parts):
            continue
        if any(p.startswith("_") for p in parts) or (read := _read(path)) is None:
            continue
        text, tree = read
        lines = None if "\r" in text else [line + "\n" for line in text.split("\n")]  # as ast counts them
        seen = set()
        for node, qualname in _defs(tree):
            doc = ast.get_docstring(node)
            paragraph = _first_paragraph(doc or "")
            if qualname in seen or not MIN_ANSWER <= len(paragraph) <= MAX_ANSWER:
                continue
            if paragraph.startswith((">>>", f"{node.name}(")):  # a doctest or a signature line, not prose
                continue
            seen.add(qualname)
            write = None
            if lines and qualname == node.name and (task := _task(paragraph)):
                source = _source(lines, node)
                if source.count("\n") < MAX_LINES and len(source) <= MAX_CHARS:
                    write = (f"Write `{node.name}({ast.unparse(node.args)})` that {task}.", source)
            found.append(_Function(module, qualname, paragraph, write))
    return tuple(found)


def _defs(tree: ast.Module):
    """(node, qualname) of public top-level functions and of methods of public top-level classes."""
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        if not isinstance(node, ast.ClassDef):
            yield node, node.name
        else:
            for child in node.body:
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and not child.name.startswith("_"):
                    yield child, f"{node.name}.{child.name}"


def _check(split: str, kinds: tuple[str, ...] = KINDS) -> None:
    if split not in SPLITS:
        raise HerdError(f"embedded post-training split {split!r}: expected 'train' or 'val'")
    if not kinds or set(kinds) - set(KINDS):
        raise HerdError(f"embedded post-training kinds {kinds!r}: expected a non-empty subset of {KINDS}")


def _examples(split: str, kinds: tuple[str, ...]):
    """(id, module, kind, prompt, answer) in module hash order, then source order, explain before write."""
    for f in _functions(split):
        name = f"{f.module}.{f.qualname}"
        if "explain" in kinds:
            yield f"stdlib:explain:{name}", f.module, "explain", f"What does `{name}` do?", f.paragraph
        if "write" in kinds and f.write:
            yield f"stdlib:write:{name}", f.module, "write", *f.write


def sft_examples(split: str = "train", max_examples: int | None = None, kinds: tuple[str, ...] = KINDS) -> list[dict]:
    """Instruction examples in TRL's conversational format, plus ``id``, ``module`` and ``kind``.

    ``max_examples`` keeps the first N: since modules come in hash order, a spread-out sample of modules.
    """
    _check(split, kinds)
    out = []
    for id, module, kind, prompt, answer in _examples(split, tuple(kinds)):
        if max_examples is not None and len(out) >= max_examples:
            break
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        out.append({"messages": messages, "id": id, "module": module, "kind": kind})
    return out


def rl_prompts(split: str = "train", max_prompts: int | None = None) -> list[list[dict]]:
    """The user turns of ``sft_examples`` (same order), as prompts for rejection sampling and PPO."""
    return [ex["messages"][:1] for ex in sft_examples(split, max_prompts)]


def preference_pairs(split: str = "train", max_pairs: int | None = None, seed: int = 0) -> list[dict]:
    """Preference pairs in TRL's conversational format, plus ``id``, ``module``, ``kind`` and ``negative``.

    The chosen answer is the sft example's; the rejected one is, for explain, the first paragraph of
    another function of the split with a different text and about the same length (within LENGTH_RATIO,
    so that length alone tells neither a reward model nor a log-probability which is right;
    ``negative`` = ``"other:<its id>"``), and for
    write, the source with one corruption (``negative`` = ``"corrupt:<kind>"``) that still parses and
    differs from the original's syntax tree; a write example that admits none gives no pair. Each
    pair's draw is seeded by ``seed`` and its id, so ``max_pairs`` (the first N) does not change it.
    """
    _check(split)
    pool = sorted(((f"stdlib:explain:{f.module}.{f.qualname}", f.paragraph) for f in _functions(split)),
                  key=lambda o: (len(o[1]), o[0]))
    lengths = [len(o[1]) for o in pool]
    out = []
    for id, module, kind, prompt, chosen in _examples(split, KINDS):
        if max_pairs is not None and len(out) >= max_pairs:
            break
        rng = random.Random(f"{seed}:{id}")
        if kind == "explain":
            other = _similar_length(pool, lengths, chosen, rng)
            rejected, negative = (other[1], f"other:{other[0]}") if other else (None, None)
        else:
            rejected, negative = corrupt(chosen, rng)
            negative = negative and f"corrupt:{negative}"
        if rejected is None:
            continue
        out.append({
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "id": id, "module": module, "kind": kind, "negative": negative,
        })  # fmt: skip
    return out


def _similar_length(pool: list[tuple[str, str]], lengths: list[int], chosen: str, rng: random.Random):
    """An (id, paragraph) of ``pool`` (sorted by length) with a text other than ``chosen`` and a length within
    LENGTH_RATIO of it, drawn with ``rng``; the nearest in length when none is that close; None if none."""
    n = len(chosen)
    lo, hi = bisect.bisect_left(lengths, n / LENGTH_RATIO), bisect.bisect_right(lengths, n * LENGTH_RATIO)
    near = [o for o in pool[lo:hi] if o[1] != chosen]
    if near:
        return rng.choice(near)
    others = [o for o in pool if o[1] != chosen]
    return min(others, key=lambda o: abs(len(o[1]) - n), default=None)


# ---- corrupted sources: one small, plausible bug, edited into the text so that the rest stays as written ----

_SWAPS = {
    ast.Lt: ">=", ast.GtE: "<", ast.Gt: "<=", ast.LtE: ">", ast.Eq: "!=", ast.NotEq: "==",
    ast.In: "not in", ast.NotIn: "in", ast.Is: "is not", ast.IsNot: "is", ast.And: "or", ast.Or: "and",
}  # fmt: skip
_SYMBOLS = {
    ast.Lt: "<", ast.GtE: ">=", ast.Gt: ">", ast.LtE: "<=", ast.Eq: "==", ast.NotEq: "!=",
    ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not", ast.And: "and", ast.Or: "or",
}  # fmt: skip


def _sites(src: bytes, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> dict[str, list[tuple[int, int, bytes]]]:
    """Per corruption kind, the edits it could make: (start, end, replacement) in ``src``'s bytes."""
    starts = [0] + [i + 1 for i, c in enumerate(src) if c == ord("\n")]
    at = lambda line, col: starts[line - 1] + col
    span = lambda n: (at(n.lineno, n.col_offset), at(n.end_lineno, n.end_col_offset))

    def swap(op, left, right):  # the operator between two operands, if written plainly between them
        a, b = span(left)[1], span(right)[0]
        if " ".join(src[a:b].decode().split()) == _SYMBOLS.get(type(op)):
            return [(a, b, f" {_SWAPS[type(op)]} ".encode())]
        return []

    body = fn.body[1:] if ast.get_docstring(fn) is not None else fn.body
    sites = {kind: [] for kind in CORRUPTIONS}
    blocks, in_fstring = [body], set()
    for node in (n for stmt in body for n in ast.walk(stmt)):
        blocks += [b for b in (getattr(node, f, None) for f in ("body", "orelse", "finalbody")) if isinstance(b, list)]
        if isinstance(node, ast.JoinedStr):
            in_fstring.update(id(n) for n in ast.walk(node))
        elif isinstance(node, ast.Compare):
            sites["compare"] += swap(node.ops[0], node.left, node.comparators[0])
        elif isinstance(node, ast.BoolOp):
            sites["boolop"] += swap(node.op, node.values[0], node.values[1])
        elif isinstance(node, ast.Return) and node.value is not None:
            if not (isinstance(node.value, ast.Constant) and node.value.value is None):
                sites["return"].append((*span(node), b"return"))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float) and id(node) not in in_fstring:
            if abs(node.value) < 1e15:
                sites["constant"].append((*span(node), repr(node.value + 1).encode()))
    for block in blocks:  # a statement on a line of its own, in a block that keeps another
        for stmt in block if len(block) >= 2 else []:
            if stmt.lineno == stmt.end_lineno and not isinstance(stmt, (ast.Pass, ast.Expr)):
                a, b = span(stmt)
                line_a, line_b = starts[stmt.lineno - 1], src.find(b"\n", b) + 1 or len(src)
                if not src[line_a:a].strip() and src[b:line_b].strip()[:1] in (b"", b"#"):
                    sites["drop-line"].append((line_a, line_b, b""))
    return sites


def corrupt(source: str, rng: random.Random) -> tuple[str | None, str | None]:
    """(corrupted source, corruption kind): one edit drawn with ``rng``; (None, None) if none applies.

    The result parses, still defines the same function, and differs from ``source`` as a syntax tree.
    """
    fn = ast.parse(source).body[0]
    src = source.encode()
    sites = _sites(src, fn)
    kinds = [k for k in CORRUPTIONS if sites[k]]
    rng.shuffle(kinds)
    for kind in kinds:
        for a, b, new in rng.sample(sites[kind], len(sites[kind])):
            text = (src[:a] + new + src[b:]).decode()
            try:
                tree = ast.parse(text)
            except SyntaxError:
                continue
            same_def = isinstance(tree.body[0], type(fn)) and tree.body[0].name == fn.name
            if same_def and ast.dump(tree) != ast.dump(ast.parse(source)):
                return text, kind
    return None, None
