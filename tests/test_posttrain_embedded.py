"""The embedded post-training data: instruction examples and preference pairs from the stdlib, held out by module."""

import ast
import inspect
import json.encoder
import random
import re
import shlex
from collections import Counter, defaultdict

import pytest

from llamaherd.data.stdlib_corpus import split_of
from llamaherd.errors import HerdError
from llamaherd.posttrain import embedded
from llamaherd.posttrain.embedded import corrupt, preference_pairs, rl_prompts, sft_examples


@pytest.fixture(scope="module")
def data():
    return {split: (sft_examples(split), preference_pairs(split)) for split in ("train", "val")}


def _by_id(data):
    return {ex["id"]: ex for examples, _ in data.values() for ex in examples}


def _first_paragraph(doc):
    return " ".join(re.split(r"\n\s*\n", inspect.cleandoc(doc).strip())[0].split("\n"))


def test_rebuilding_gives_the_same_data():
    first = sft_examples("val"), preference_pairs("val", seed=3)
    embedded._functions.cache_clear()
    assert (sft_examples("val"), preference_pairs("val", seed=3)) == first
    assert preference_pairs("val", seed=4) != first[1]


def test_splits_are_held_out_by_module(data):
    modules = {split: {ex["module"] for ex in examples} for split, (examples, _) in data.items()}
    assert modules["val"] and modules["train"].isdisjoint(modules["val"])
    for split, (examples, pairs) in data.items():
        assert {split_of(ex["module"]) for ex in examples + pairs} == {split}
        assert all(not p.startswith("_") for ex in examples for p in ex["module"].split("."))


def test_explain_answer_is_the_first_paragraph_of_the_docstring(data):
    examples = _by_id(data)
    known = [("json", "dumps", json.dumps), ("json.encoder", "JSONEncoder.encode", json.encoder.JSONEncoder.encode)]
    for module, qualname, obj in known:
        name = f"{module}.{qualname}"
        ex = examples[f"stdlib:explain:{name}"]
        assert ex["module"] == module
        assert ex["messages"] == [
            {"role": "user", "content": f"What does `{name}` do?"},
            {"role": "assistant", "content": _first_paragraph(obj.__doc__)},
        ]
    assert examples["stdlib:explain:json.dumps"]["messages"][1]["content"].startswith("Serialize ``obj`` to a JSON")
    assert not any(i.rsplit(".", 1)[1].startswith("_") for i in examples)


def test_write_answer_is_the_function_source(data):
    ex = _by_id(data)["stdlib:write:shlex.quote"]
    assert ex["messages"][0]["content"] == "Write `quote(s)` that returns a shell-escaped version of the string *s*."
    assert ex["messages"][1]["content"] == inspect.getsource(shlex.quote).rstrip("\n")
    writes = [ex for examples, _ in data.values() for ex in examples if ex["kind"] == "write"]
    for ex in writes:
        prompt, source = (m["content"] for m in ex["messages"])
        name = re.match(r"Write `(\w+)\(", prompt).group(1)
        fn = ast.parse(source).body[0]
        assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name == name
        assert prompt.startswith(f"Write `{name}({ast.unparse(fn.args)})` that ") and prompt.endswith(".")
        assert source.count("\n") < embedded.MAX_LINES and len(source) <= embedded.MAX_CHARS


def test_preference_pairs_reject_a_plausible_wrong_answer(data):
    examples = _by_id(data)
    for split, (sft, pairs) in data.items():
        ids = {p["id"] for p in pairs}
        assert [p["id"] for p in pairs] == [ex["id"] for ex in sft if ex["id"] in ids]
        for pair in pairs:
            ex = examples[pair["id"]]
            chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
            assert pair["prompt"] == ex["messages"][:1] and chosen == ex["messages"][1]["content"]
            assert chosen != rejected and pair["kind"] == ex["kind"] and pair["module"] == ex["module"]
            if pair["kind"] == "explain":  # another function of the same split, its real answer
                other = examples[pair["negative"].removeprefix("other:")]
                assert other["id"] != pair["id"] and other["messages"][1]["content"] == rejected
                assert 1 / embedded.LENGTH_RATIO <= len(rejected) / len(chosen) <= embedded.LENGTH_RATIO
                assert split_of(other["module"]) == split
            else:
                tree, original = ast.parse(rejected), ast.parse(chosen)
                assert tree.body[0].name == original.body[0].name and ast.dump(tree) != ast.dump(original)
    corruptions = Counter(p["negative"] for p in data["train"][1] if p["kind"] == "write")
    assert set(corruptions) == {f"corrupt:{kind}" for kind in embedded.CORRUPTIONS}


def test_corrupt_makes_one_small_edit():
    source = (
        "def clamp(x, lo=0, hi=1):\n"
        '    """Return x limited to [lo, hi]."""\n'
        "    if x < lo and lo is not None:\n"
        "        x = lo  # low end\n"
        "    y = x * 2\n"
        "    return min(x, hi)\n"
    )
    lines = source.splitlines()
    seen = defaultdict(set)
    for seed in range(60):
        text, kind = corrupt(source, random.Random(seed))
        assert ast.dump(ast.parse(text)) != ast.dump(ast.parse(source))
        assert 1 <= len(set(lines) ^ set(text.splitlines())) <= 2  # one line changed or dropped
        seen[kind].add(text)
    assert set(seen) == set(embedded.CORRUPTIONS)
    edited = lambda old, new: source.replace(old, new, 1)
    assert seen["compare"] == {edited("x < lo", "x >= lo"), edited("lo is not None", "lo is None")}
    assert seen["boolop"] == {edited("lo and lo", "lo or lo")}
    assert seen["return"] == {edited("return min(x, hi)", "return")}
    assert seen["constant"] == {edited("x * 2", "x * 3")}  # not the defaults, which the prompt shows
    assert seen["drop-line"] == {edited("    y = x * 2\n", ""), edited("    return min(x, hi)\n", "")}
    assert corrupt('def f(x):\n    """Doc."""\n    print(x)\n', random.Random(0)) == (None, None)


def test_sizes_truncation_and_prompts(data):
    counts = {split: Counter(ex["kind"] for ex in examples) for split, (examples, _) in data.items()}
    assert counts["train"]["explain"] > 3000 and counts["train"]["write"] > 500
    assert counts["val"]["explain"] > 50 and counts["val"]["write"] > 10
    train, pairs = data["train"]
    assert len(pairs) > 0.95 * len(train)
    assert sft_examples("train", max_examples=7) == train[:7] and preference_pairs("train", max_pairs=5) == pairs[:5]
    assert [ex["kind"] for ex in sft_examples("val", kinds=("write",))] == ["write"] * counts["val"]["write"]
    assert rl_prompts("val") == [ex["messages"][:1] for ex in data["val"][0]]
    assert len(rl_prompts("train", max_prompts=3)) == 3
    assert json.loads(json.dumps(pairs[:50])) == pairs[:50]
    with pytest.raises(HerdError, match="split 'test'"):
        sft_examples("test")
    with pytest.raises(HerdError, match="kinds"):
        sft_examples("train", kinds=("summarize",))
