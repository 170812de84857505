"""Raw text in: the embedded stdlib corpus, file readers, cleaning, and `herd data clean`."""

import ast
import gzip
import hashlib
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from llamaherd.cli import build_parser
from llamaherd.data.clean import clean_documents
from llamaherd.data.prepare import prepare_corpus, write_jsonl
from llamaherd.data.sources import Document, read_documents
from llamaherd.data.stdlib_corpus import split_of, stdlib_documents, stdlib_modules
from llamaherd.errors import HerdError

CAP = 1_000_000


@pytest.fixture(scope="module")
def sample():
    return list(stdlib_documents("train", max_bytes=CAP))


def _module(doc):
    return doc.id.split(":", 2)[2]


# ---- the embedded stdlib corpus ----


def test_stdlib_capped_extraction_is_deterministic(sample):
    def digest(docs):
        return hashlib.sha256(b"".join(f"{d.id}\0{d.text}\0".encode() for d in docs)).hexdigest()

    assert digest(sample) == digest(stdlib_documents("train", max_bytes=CAP))


def test_stdlib_cap_keeps_whole_documents_and_a_mix(sample):
    total = sum(len(d.text.encode()) for d in sample)
    assert CAP * 0.5 < total <= CAP
    kinds = {d.source for d in sample}
    assert kinds == {"stdlib:code", "stdlib:prose"}
    assert len({d.id for d in sample}) == len(sample)


def test_stdlib_splits_are_disjoint_by_module_and_non_empty(sample):
    val = list(stdlib_documents("val"))
    assert {d.source for d in val} == {"stdlib:code", "stdlib:prose"}
    assert {_module(d) for d in val}.isdisjoint({_module(d) for d in sample})
    assert all(split_of(_module(d)) == "val" for d in val) and all(split_of(_module(d)) == "train" for d in sample)
    names = [m for m, _ in stdlib_modules()]
    assert 0.02 < sum(split_of(m) == "val" for m in names) / len(names) < 0.1


def test_stdlib_code_is_the_module_source_and_parses(sample):
    paths = dict(stdlib_modules())
    code = [d for d in sample if d.source == "stdlib:code"]
    assert len(code) > 20
    for doc in code:
        ast.parse(doc.text)
        if paths[_module(doc)].read_bytes().isascii():
            assert doc.text == paths[_module(doc)].read_text()
    assert not any(part in {"test", "tests", "idle_test"} for d in sample for part in _module(d).split("."))


def test_stdlib_prose_is_the_english_docstrings(sample):
    paths = dict(stdlib_modules())
    prose = [d for d in sample if d.source == "stdlib:prose" and _module(d) != "pydoc_data.topics"]
    assert len(prose) > 20
    words = " ".join(d.text for d in prose).split()
    assert words.count("the") > len(words) / 100  # English, not code
    for doc in prose:
        module_doc = ast.get_docstring(ast.parse(paths[_module(doc)].read_text(encoding="utf-8")))
        assert doc.text.startswith(module_doc) if module_doc else doc.text.startswith(_module(doc) + ".")


def test_stdlib_test_suites_only_on_request():
    docs = list(stdlib_documents("train", kinds=("tests",), max_bytes=300_000))
    assert docs and all(d.source == "stdlib:tests" for d in docs)
    assert all({"test", "tests", "idle_test"} & set(_module(d).split(".")) for d in docs)
    with pytest.raises(HerdError, match="kinds"):
        list(stdlib_documents(kinds=("poetry",)))


def test_stdlib_input_name():
    docs = list(read_documents("stdlib:val"))
    assert docs and all(split_of(_module(d)) == "val" for d in docs)


# ---- file readers ----

DOCS = [{"id": "a", "text": "first document\nwith two lines"}, {"text": "second — unicode 😀"}]


def _write(path: Path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def _jsonl(docs):
    return "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode()


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.jsonl.zst", "d.parquet", "d.parquet.zst"])
def test_readers_give_the_same_documents(tmp_path, name):
    path = tmp_path / name
    if ".parquet" in name:
        table = pa.table({"text": [d["text"] for d in DOCS], "n": [1, 2]})
        pq.write_table(table, tmp_path / "plain.parquet")
        _write(path, (tmp_path / "plain.parquet").read_bytes())
    else:
        _write(path, _jsonl(DOCS))
    docs = list(read_documents(path))
    assert [d.text for d in docs] == [d["text"] for d in DOCS]
    assert all(d.source == str(path) for d in docs)
    if ".jsonl" in name:
        assert [d.id for d in docs] == ["a", f"{path}:2"]  # the record's id, else file:line


@pytest.mark.parametrize("name", ["x.txt", "x.txt.gz", "x.txt.zst"])
def test_txt_is_one_document_per_file(tmp_path, name):
    path = _write(tmp_path / name, "línea uno\n\nlínea dos\n".encode())
    assert [(d.id, d.text) for d in read_documents(path)] == [(str(path), "línea uno\n\nlínea dos\n")]


def test_text_field_and_blank_lines(tmp_path):
    path = _write(tmp_path / "c.jsonl", b'{"content": "x"}\n\n{"content": "y"}\n')
    assert [d.text for d in read_documents(path, text_field="content")] == ["x", "y"]


def test_directories_and_globs_are_sorted(tmp_path):
    for name in ["b.txt", "a.jsonl", "sub/c.txt", "sub/a.txt.gz", ".hidden.txt", "notes.md", "z/.x/y.txt"]:
        _write(tmp_path / name, _jsonl([{"text": name}]) if name.endswith(".jsonl") else name.encode())
    got = [Path(d.source).relative_to(tmp_path).as_posix() for d in read_documents(tmp_path)]
    assert got == ["a.jsonl", "b.txt", "sub/a.txt.gz", "sub/c.txt"]
    got = [Path(d.source).name for d in read_documents([str(tmp_path / "**/*.txt*"), tmp_path / "a.jsonl"])]
    assert got == ["b.txt", "a.txt.gz", "c.txt", "a.jsonl"]


@pytest.mark.parametrize(
    "content, match",
    [
        (b'{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl:3: invalid JSON"),
        (b'{"text": "ok"}\n{"body": "no text"}\n', r"bad\.jsonl:2: no 'text' field \(fields: 'body'\)"),
        (b'{"text": 7}\n', r"bad\.jsonl:1: field 'text' is a int; expected a string"),
        (b'["text"]\n', r"bad\.jsonl:1: a JSON list; expected an object"),
        (b'{"text": "\xff"}\n', r"bad\.jsonl:1: invalid UTF-8"),
        (b"", r"no documents in .*bad\.jsonl"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, content, match):
    path = _write(tmp_path / "bad.jsonl", content)
    with pytest.raises(HerdError, match=match):
        list(read_documents(path))


def test_unusable_inputs_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "notes.md", b"x")
    _write(tmp_path / "broken.jsonl.gz", b"")
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    _write(tmp_path / "junk.parquet", b"not parquet")
    cases = [
        (tmp_path / "missing.jsonl", r"missing\.jsonl: no such file"),
        (str(tmp_path / "*.nothing"), r"pattern matches no"),
        (tmp_path / "empty", r"empty: directory has no"),
        (tmp_path / "notes.md", r"notes\.md: unknown format"),
        (tmp_path / "broken.jsonl.gz", r"broken\.jsonl\.gz: cannot read"),
        (tmp_path / "t.parquet", r"t\.parquet: no column 'text' \(columns: body\)"),
        (tmp_path / "junk.parquet", r"junk\.parquet: cannot read \(ArrowInvalid"),
        ([], r"no inputs"),
    ]
    for inputs, match in cases:
        with pytest.raises(HerdError, match=match) as e:
            list(read_documents(inputs))
        assert "\n" not in str(e.value)


def test_missing_optional_package_is_a_one_line_error(tmp_path, monkeypatch):
    path = _write(tmp_path / "d.jsonl.zst", _jsonl(DOCS))
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if not installed
    with pytest.raises(HerdError, match=r"d\.jsonl\.zst: reading this file needs the zstandard package"):
        list(read_documents(path))


def test_missing_path_fails_before_reading(tmp_path):
    with pytest.raises(HerdError, match="no such file"):
        read_documents(["stdlib", tmp_path / "nope.txt"])  # no iteration needed


# ---- cleaning ----


def _docs(texts):
    return [Document(id=str(i), text=t, source="mem") for i, t in enumerate(texts)]


def test_cleaning_counts_every_document():
    texts = [
        "a well sized document, kept",
        "a  well sized\tdocument,\n kept",  # duplicate once whitespace is collapsed
        "tiny",
        "x" * 500,
        "   \n ",
        "another kept document here",
        "a well sized document, kept",
    ]
    kept, stats = clean_documents(_docs(texts), min_chars=10, max_chars=100)
    kept = list(kept)
    assert [d.text for d in kept] == [texts[0], texts[5]]
    assert stats.removed == {"duplicate": 2, "too_short": 1, "too_long": 1, "empty": 1}
    assert stats.read == len(texts) == stats.kept + sum(stats.removed.values())
    assert stats.kept_bytes == sum(len(d.text.encode()) for d in kept)
    assert stats.read_bytes == sum(len(t.encode()) for t in texts)
    assert "removed: duplicate" in stats.table() and "kept" in stats.table()


def test_max_docs_stops_reading():
    pulled = []

    def source():
        for doc in _docs([f"document number {i}" for i in range(10)]):
            pulled.append(doc)
            yield doc

    kept, stats = clean_documents(source(), min_chars=1, max_docs=3)
    assert len(list(kept)) == 3 and stats.read == 3 == len(pulled)


def test_data_clean_cli_and_prepare_corpus(tmp_path, capsys):
    texts = ["hello there world", "hi", "hello  there world"]
    src = _write(tmp_path / "in.jsonl", _jsonl([{"text": t} for t in texts]))
    out = tmp_path / "out" / "clean.jsonl"
    args = build_parser().parse_args(["data", "clean", "--input", str(src), "--out", str(out), "--min-chars", "5"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "removed: duplicate" in printed and "removed: too_short" in printed and "1 documents" in printed
    assert [(d.id, d.text) for d in read_documents(out)] == [(f"{src}:1", "hello there world")]
    assert [p.name for p in out.parent.iterdir()] == ["clean.jsonl"]  # no temporary left behind

    val = _write(tmp_path / "val.jsonl", _jsonl([{"text": "hello there   world"}, {"text": "held out text"}]))
    stats = prepare_corpus(src, tmp_path / "corpus", min_chars=5, val_inputs=val)
    assert stats["val"].kept == 2 and stats["train"].kept == 0  # train's copy of a val text is dropped
    assert stats["train"].removed == {"duplicate": 2, "too_short": 1}
    assert json.loads((tmp_path / "corpus" / "clean_stats.json").read_text())["train"]["read"] == 3


def test_write_jsonl_is_atomic(tmp_path):
    out = _write(tmp_path / "keep.jsonl", b'{"text": "old"}\n')

    def failing():
        yield Document("1", "new", "mem")
        raise HerdError("boom")

    with pytest.raises(HerdError):
        write_jsonl(failing(), out)
    assert out.read_bytes() == b'{"text": "old"}\n' and [p.name for p in tmp_path.iterdir()] == ["keep.jsonl"]
