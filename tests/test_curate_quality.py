"""LLM labels -> fast classifiers -> the quality and domain stages; annotate with a checkpoint and an endpoint."""

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from llamaherd.checkpoint import save
from llamaherd.cli import main
from llamaherd.data.curate.annotate import load_prompt
from llamaherd.data.curate.pipeline import curate, load_pipeline, read_records
from llamaherd.data.stdlib_corpus import stdlib_documents
from llamaherd.model import ModelArgs, Transformer
from llamaherd.tokenizer import Tokenizer

SPAM = ["buy", "cheap", "pills", "now", "click", "here", "free", "offer", "winner", "casino", "bonus", "deal",
        "limited", "discount", "subscribe", "sale", "viagra", "loans", "crypto", "prize"]
MENU = ["Home", "About us", "Contact", "Login", "Cart", "Privacy policy", "Terms", "Careers", "Blog", "Help"]


def junk(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return " ".join(rng.choice(SPAM) for _ in range(rng.randint(20, 80))) + "!!!"
    return "\n".join(" | ".join(rng.sample(MENU, 5)) for _ in range(rng.randint(3, 12)))


@pytest.fixture(scope="module")
def stdlib():
    """The stdlib corpus once: {"code": sources, "prose": documentation pages of over 200 characters}."""
    docs = {"code": [], "prose": []}
    for d in stdlib_documents("all"):
        if d.source == "stdlib:code" or len(d.text) > 200:
            docs["code" if d.source == "stdlib:code" else "prose"].append(d.text)
    return docs


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, stdlib):
    """Explanatory prose scored 4-5 and spam and menus scored 0-1, as a judge would; the prose after the
    first 400 pages is left for the stage to see fresh."""
    rng = random.Random(0)
    rows = [{"id": f"p{i}", "text": t, "label": str(rng.choice([4, 5]))} for i, t in enumerate(stdlib["prose"][:400])]
    rows += [{"id": f"j{i}", "text": junk(rng), "label": str(rng.choice([0, 1]))} for i in range(400)]
    rng.shuffle(rows)
    path = tmp_path_factory.mktemp("labels") / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def test_quality_classifier_separates_held_out_documents_and_the_stage_keeps_the_good_ones(capsys, tmp_path,
                                                                                         labelled, stdlib):
    path, rows = labelled
    assert main(["data", "train-classifier", "--labels", str(path), "--out", str(tmp_path / "clf")]) == 0
    printed = capsys.readouterr().out
    info = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert info["kind"] == "regression" and info["labels"] == ["0", "1", "4", "5"]
    assert info["metrics"]["held_out"] == 160 and info["metrics"]["auc"] >= 0.99  # good vs bad, unseen documents
    assert f"auc {info['metrics']['auc']:.3f}" in printed
    # the stage on new documents: new prose kept (scored high), new junk removed (scored low)
    rng = random.Random(7)
    fresh_prose = stdlib["prose"][400:]
    assert len(fresh_prose) >= 50
    fresh = [{"id": f"good{i}", "text": t} for i, t in enumerate(fresh_prose)]
    fresh += [{"id": f"bad{i}", "text": junk(rng)} for i in range(100)]
    src = tmp_path / "fresh.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in fresh))
    pipeline = load_pipeline(stages=["quality"], overrides=[f"quality.model={tmp_path / 'clf'}"])
    curate(pipeline, [src], tmp_path / "out", workers=2)
    kept = [r for p in sorted((tmp_path / "out" / "kept").iterdir()) for r in read_records(p)]
    removed = [r for p in sorted((tmp_path / "out" / "removed").iterdir()) for r in read_records(p)]
    good_kept = sum(r["id"].startswith("good") for r in kept) / len(fresh_prose)
    bad_removed = sum(r["id"].startswith("bad") for r in removed) / 100
    assert good_kept >= 0.95 and bad_removed >= 0.95, (good_kept, bad_removed)
    assert all(r["reason"] == "low_quality" and r["meta"]["quality"] < 3 for r in removed)
    assert all(r["meta"]["quality"] >= 3 for r in kept)


def test_domain_classifier_tags_documents(tmp_path, stdlib):
    rng = random.Random(1)
    code, prose = stdlib["code"][:200], stdlib["prose"][:200]
    german = ["der", "die", "und", "ist", "nicht", "ein", "mit", "sich", "auf", "für", "Haus", "Stadt", "Zeit",
              "Jahr", "Kinder", "immer", "heute", "schön"]
    other = [" ".join(rng.choice(german) for _ in range(rng.randint(30, 120))) for _ in range(201)]
    unseen = other.pop()
    rows = [{"text": t, "label": label} for label, texts in (("code", code), ("prose", prose),
                                                             ("other_language", other)) for t in texts]
    rng.shuffle(rows)
    labels = tmp_path / "domains.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "train-classifier", "--labels", str(labels), "--out", str(tmp_path / "clf")]) == 0
    info = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    # the stdlib's code is full of docstrings and its documentation of code examples: some overlap is real
    assert info["kind"] == "classification" and info["metrics"]["accuracy"] >= 0.9 and info["metrics"]["auc"] > 0.98
    src = tmp_path / "mixed.jsonl"  # unseen: a module's source, and German
    src.write_text(json.dumps({"id": "c", "text": stdlib["code"][300]}) + "\n"
                   + json.dumps({"id": "o", "text": unseen}) + "\n")
    curate(load_pipeline(stages=["domain"], overrides=[f"domain.model={tmp_path / 'clf'}",
                                                       'domain.keep=["code"]']), [src], tmp_path / "out", workers=1)
    kept = list(read_records(tmp_path / "out" / "kept" / "shard_00000.jsonl"))
    removed = list(read_records(tmp_path / "out" / "removed" / "shard_00000.jsonl"))
    assert [(r["id"], r["meta"]["domain"]) for r in kept] == [("c", "code")]
    assert [(r["id"], r["meta"]["domain"], r["reason"]) for r in removed] == [("o", "other_language", "other_domain")]


def always_three(tmp_path):
    """A tiny byte-level checkpoint that answers "3" to anything: its blocks add nothing, every token embeds
    to the same vector, and only the output row of the byte "3" points along it."""
    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=4096)
    model = Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.tok_embeddings.weight[:] = 1.0
        model.norm.weight[:] = 1.0
        model.output.weight[ord("3")] = 1.0
    return save(model, tmp_path / "judge", tokenizer=tok)


def docs_file(tmp_path, n=5):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": f"Document {i}: photosynthesis turns light into "
                                        f"sugar." if i % 2 else f"Document {i}: buy now!!!"}) + "\n" for i in range(n)))
    return path


def test_annotate_with_a_llamaherd_checkpoint(capsys, tmp_path):
    judge, docs = always_three(tmp_path), docs_file(tmp_path)
    out = tmp_path / "labels.jsonl"
    assert main(["data", "annotate", "--judge", str(judge), "--prompt", "edu_quality", "--input", str(docs),
                 "--out", str(out), "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"d{i}" for i in range(5)]
    assert all(r["label"] == "3" and r["answer"].startswith("3") for r in rows)
    assert "5 of 5 documents labelled (3 5)" in capsys.readouterr().out
    # the domain prompt wants a word: "333..." has no label; counted, not written
    assert main(["data", "annotate", "--judge", str(judge), "--prompt", "domain", "--input", str(docs),
                 "--out", str(out), "--device", "cpu", "--max-docs", "2"]) == 0
    assert out.read_text() == "" and "0 of 2 documents labelled" in capsys.readouterr().out


class _Endpoint(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint on loopback: scores 4 what mentions photosynthesis, 1 the rest."""

    def log_message(self, *args):
        pass

    def _send(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self._send({"object": "list", "data": [{"id": "grader", "object": "model", "created": 0, "owned_by": "t"}]})

    def do_POST(self):  # noqa: N802
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(request)
        text = request["messages"][-1]["content"]
        answer = "4" if "photosynthesis" in text.split('"""')[1] else "1"
        self._send({"id": "x", "object": "chat.completion", "created": 0, "model": request["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": answer}}]})


def test_annotate_with_an_openai_compatible_endpoint(capsys, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    server.requests = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        out = tmp_path / "labels.jsonl"
        assert main(["data", "annotate", "--judge", url, "--prompt", "edu_quality", "--input",
                     str(docs_file(tmp_path, 6)), "--out", str(out)]) == 0
    finally:
        server.shutdown()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["label"]) for r in rows] == [(f"d{i}", "4" if i % 2 else "1") for i in range(6)]
    prompt = load_prompt("edu_quality")
    first = server.requests[0]
    assert first["model"] == "grader" and first["temperature"] == 0 and first["max_tokens"] == prompt.max_tokens
    assert first["messages"] == prompt.messages("Document 0: buy now!!!")


def test_annotate_and_training_errors_are_one_line(capsys, tmp_path):
    docs = docs_file(tmp_path)
    code = main(["data", "annotate", "--judge", str(tmp_path / "nope"), "--prompt", "edu_quality", "--input",
                 str(docs), "--out", str(tmp_path / "l.jsonl")])
    assert code == 2 and "nope" in capsys.readouterr().err
    code = main(["data", "annotate", "--judge", "http://127.0.0.1:9/v1", "--prompt", "edu_quality", "--input",
                 str(docs), "--out", str(tmp_path / "l.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: http://127.0.0.1:9/v1: cannot list") and err.count("\n") == 1
    code = main(["data", "annotate", "--judge", "x", "--prompt", "no-such-prompt", "--input", str(docs),
                 "--out", str(tmp_path / "l.jsonl")])
    assert code == 2 and "prompt 'no-such-prompt' not found" in capsys.readouterr().err
    one_label = tmp_path / "one.jsonl"
    one_label.write_text(json.dumps({"text": "a", "label": "1"}) + "\n" + json.dumps({"text": "b", "label": "1"}))
    code = main(["data", "train-classifier", "--labels", str(one_label), "--out", str(tmp_path / "c")])
    assert code == 2 and "training needs at least two" in capsys.readouterr().err
    code = main(["data", "curate", "--input", str(docs), "--out", str(tmp_path / "o"), "--stages", "quality"])
    assert code == 2 and "quality.model: set it" in capsys.readouterr().err
