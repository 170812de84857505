"""The curation pipeline: accounting, exact dedups, resuming after SIGKILL, outputs, bad input."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from llamaherd.cli import main
from llamaherd.data.curate.base import Record
from llamaherd.data.curate.hashing import collapse_whitespace
from llamaherd.data.curate.normalize import Normalize
from llamaherd.data.curate.pii import Pii
from llamaherd.data.curate.pipeline import curate, load_pipeline, read_records
from llamaherd.data.sources import read_documents
from llamaherd.errors import HerdError

BOILERPLATE = ["Accept all cookies", "Subscribe to our newsletter", "Home | About | Contact", "Share this page"]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def corpus(n: int, seed: int = 0) -> list[dict]:
    """Records with exact and whitespace-only duplicates, shared URLs, boilerplate lines, PII, empty texts."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        lines = [" ".join(rng.choices(WORDS, k=rng.randint(3, 9))) for _ in range(rng.randint(1, 5))]
        if rng.random() < 0.5:
            lines.insert(rng.randint(0, len(lines)), rng.choice(BOILERPLATE))
        text = "\n".join(lines)
        r = rng.random()
        if r < 0.15 and records:
            text = rng.choice(records)["text"]  # an exact duplicate
        elif r < 0.2 and records:
            text = "  " + rng.choice(records)["text"].replace(" ", "   ") + "\r\n"  # differs only in whitespace
        elif r < 0.23:
            text = " \n\t "  # empty once normalized
        elif r < 0.3:
            text += f"\nwrite to user{i}@example.org or call (415) 555-01{i % 100:02d} from 10.1.{i % 250}.7"
        record = {"id": f"doc{i}", "text": text}
        if rng.random() < 0.8:
            record["url"] = f"https://example.com/page/{rng.randint(0, n // 2)}"
        records.append(record)
    return records


def write_jsonl(path: Path, records: list[dict], bad_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in records]
    for at, line in sorted((bad_lines or {}).items()):
        lines.insert(at, line)
    path.write_text("\n".join(lines) + "\n")
    return path


STAGES = ["normalize", "url_dedup", "exact_dedup", "line_dedup", "pii"]


def run(tmp: Path, records, name="out", stages=STAGES, overrides=(), workers=2, bad_lines=None, src=None):
    src = src or write_jsonl(tmp / f"{name}.jsonl", records, bad_lines)
    extra = ["line_dedup.bucket_docs=100"] if "line_dedup" in stages else []
    pipeline = load_pipeline(stages=stages, overrides=["output.shard_docs=37", *extra, *overrides])
    stats = curate(pipeline, [src], tmp / name, workers=workers)
    return src, stats


def shard_records(directory: Path) -> list[dict]:
    return [r for path in sorted(directory.iterdir()) for r in read_records(path)]


def test_every_stage_and_the_whole_run_account_for_every_document(tmp_path):
    records = corpus(400)
    bad = {3: "{not json", 50: json.dumps({"body": "no text field"}), 77: json.dumps({"text": 5})}
    src, stats = run(tmp_path, records, bad_lines=bad)
    stages = stats["stages"]
    assert [s["name"] for s in stages] == STAGES
    for prev, s in zip([None, *stages], stages):
        docs, size = s["documents"], s["bytes"]
        assert docs["in"] == docs["kept"] + sum(docs["removed"].values())
        assert size["in"] == size["kept"] + sum(size["removed"].values())
        assert docs["removed"].keys() == size["removed"].keys()
        if prev is None:
            assert (docs["in"], size["in"]) == (stats["input"]["documents"], stats["input"]["bytes"])
        else:  # what one stage keeps, the next reads
            assert (docs["in"], size["in"]) == (prev["documents"]["kept"], prev["bytes"]["kept_after"])
    assert stats["input"]["documents"] == len(records)
    assert stats["input"]["bytes"] == sum(len(r["text"].encode()) for r in records)
    assert stats["input"]["skipped"]["count"] == 3
    assert [s["where"] for s in stats["input"]["skipped"]["lines"]] == [f"{src}:4", f"{src}:51", f"{src}:78"]
    # the files hold exactly what the stats say: every input document once, kept or removed with a reason
    kept, removed = shard_records(tmp_path / "out" / "kept"), shard_records(tmp_path / "out" / "removed")
    assert len(kept) == stats["output"]["kept"]["documents"]
    assert len(removed) == stats["output"]["removed"]["documents"]
    assert sum(len(r["text"].encode()) for r in kept) == stats["output"]["kept"]["bytes"]
    assert sorted(r["id"] for r in kept + removed) == sorted(r["id"] for r in records)
    by_reason = Counter((r["stage"], r["reason"]) for r in removed)
    assert by_reason == Counter({(s["name"], reason): n for s in stages
                                 for reason, n in s["documents"]["removed"].items()})
    assert {"normalize", "url_dedup", "exact_dedup"} <= {stage for stage, _ in by_reason}
    assert all(set(r) == {"id", "text", "source", "meta"} for r in kept)
    assert all(r["meta"].get("url") == original.get("url") for r in kept
               for original in [next(o for o in records if o["id"] == r["id"])])
    # kept shards follow the input order, shard by shard
    order = {r["id"]: i for i, r in enumerate(records)}
    assert [order[r["id"]] for r in kept] == sorted(order[r["id"]] for r in kept)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["kept", "pipeline.json", "removed", "stats.json"]


def reference_dedup(records: list[dict], key) -> dict[str, str | None]:
    """id -> the id of the first record with the same key (None for the first itself, or no key)."""
    first, out = {}, {}
    for r in records:
        k = key(r)
        if k is None:
            out[r["id"]] = None
        elif k in first:
            out[r["id"]] = first[k]
        else:
            first[k] = r["id"]
            out[r["id"]] = None
    return out


def test_exact_and_url_dedup_remove_exactly_the_later_copies(tmp_path):
    records = corpus(500, seed=1)
    for stage, reason, key in (("exact_dedup", "duplicate", lambda r: collapse_whitespace(r["text"])),
                               ("url_dedup", "duplicate_url", lambda r: r.get("url"))):
        _, stats = run(tmp_path, records, name=stage, stages=[stage], workers=1)
        want = reference_dedup(records, key)
        removed = {r["id"]: r for r in shard_records(tmp_path / stage / "removed")}
        assert {i: r["duplicate_of"] for i, r in removed.items()} == {i: k for i, k in want.items() if k}
        assert all(r["reason"] == reason and r["stage"] == stage for r in removed.values())
        assert stats["stages"][0]["documents"]["removed"] == {reason: len(removed)} and len(removed) > 50


def reference_line_dedup(records: list[dict], max_count: int, bucket: int) -> dict[str, str | None]:
    """id -> text after line dedup (None if lines were removed and nothing is left), counting stripped
    non-blank lines per bucket."""
    counts: dict[int, Counter] = {}
    for i, r in enumerate(records):
        counts.setdefault(i // bucket, Counter()).update(s for line in r["text"].split("\n") if (s := line.strip()))
    out = {}
    for i, r in enumerate(records):
        c = counts[i // bucket]
        before = r["text"].split("\n")
        lines = [line for line in before if not line.strip() or c[line.strip()] <= max_count]
        text = "\n".join(lines)
        out[r["id"]] = None if len(lines) < len(before) and not text.strip() else text
    return out


@pytest.mark.parametrize("max_count, bucket", [(6, 100), (2, 1000), (6, 37)])
def test_line_dedup_removes_exactly_the_frequent_lines_of_each_bucket(tmp_path, max_count, bucket):
    records = corpus(300, seed=2)
    records += [{"id": f"only-boiler{i}", "text": BOILERPLATE[i % 2] + "\n\n" + BOILERPLATE[i % 2]}
                for i in range(20)]
    run(tmp_path, records, stages=["line_dedup"], workers=2,
        overrides=[f"line_dedup.max_count={max_count}", f"line_dedup.bucket_docs={bucket}"])
    want = reference_line_dedup(records, max_count, bucket)
    kept = {r["id"]: r for r in shard_records(tmp_path / "out" / "kept")}
    removed = {r["id"]: r for r in shard_records(tmp_path / "out" / "removed")}
    assert {i: r["text"] for i, r in kept.items()} == {i: t for i, t in want.items() if t is not None}
    assert set(removed) == {i for i, t in want.items() if t is None}
    assert all(r["reason"] == "empty_after_line_dedup" for r in removed.values())
    changed = [r for r in kept.values() if r["meta"].get("line_dedup_removed")]
    assert changed and all(r["meta"]["line_dedup_removed"] > 0 for r in changed)


def snapshot(out: Path) -> dict:
    """Every output file's bytes; stats.json without its timings."""
    files = {}
    for path in sorted(out.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.name == "stats.json":
                stats = json.loads(data)
                stats.pop("seconds")
                for s in stats["stages"]:
                    s.pop("seconds")
                data = json.dumps(stats).encode()
            files[str(path.relative_to(out))] = data
    return files


def herd(*args, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llamaherd", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def processes_with(marker: str) -> list[int]:
    """Processes whose environment holds ``marker`` (a run's own, inherited by every process it starts)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            pass
    return found


@pytest.mark.slow
@pytest.mark.parametrize("kill_in_segment", [0, 1])
def test_sigkill_then_rerun_gives_byte_identical_output(tmp_path, kill_in_segment):
    records = corpus(6000, seed=3)
    src = write_jsonl(tmp_path / "in.jsonl", records)
    args = ["data", "curate", "--input", src, "--stages", ",".join(STAGES), "--workers", 2, "--no-progress",
            "output.shard_docs=50", "output.compression=gzip", "line_dedup.bucket_docs=2000"]
    proc = herd(*args, "--out", tmp_path / "whole")
    assert proc.wait(timeout=600) == 0, proc.stderr.read()

    out = tmp_path / "killed"
    marker = f"CURATE_TEST_RUN={os.getpid()}-{kill_in_segment}-{time.time()}"
    proc = herd(*args, "--out", out, env=dict([marker.split("=", 1)]))
    marker_dir = out / ".work" / f"seg{kill_in_segment}"
    deadline = time.time() + 300
    while not (marker_dir.is_dir() and any(p.name.startswith("done_") for p in marker_dir.iterdir())):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (out / "stats.json").exists(), "the run finished before the kill"
    deadline = time.time() + 15  # its worker processes end on their own soon after
    while processes_with(marker) and time.time() < deadline:
        time.sleep(0.2)
    assert processes_with(marker) == []
    finished_units = [p for p in (out / ".work").rglob("done_*.json")]
    assert finished_units
    proc = herd(*args, "--out", out)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    assert snapshot(out) == snapshot(tmp_path / "whole")
    assert not (out / ".work").exists()


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compressed_shards_hold_the_same_records_and_read_back_as_input(tmp_path, compression):
    records = corpus(120, seed=4)
    src, _ = run(tmp_path, records, name="plain")
    run(tmp_path, records, name=compression, overrides=[f"output.compression={compression}"], src=src)
    suffix = ".jsonl.gz" if compression == "gzip" else ".jsonl.zst"
    assert all(p.name.endswith(suffix) for p in (tmp_path / compression / "kept").iterdir())
    for part in ("kept", "removed"):
        assert shard_records(tmp_path / compression / part) == shard_records(tmp_path / "plain" / part)
    # kept/ is an input like any other (e.g. for herd data pack), ids and all
    again = list(read_documents(tmp_path / compression / "kept"))
    plain = shard_records(tmp_path / "plain" / "kept")
    assert [(d.id, d.text) for d in again] == [(r["id"], r["text"]) for r in plain]


def test_a_recipe_file_with_overrides(tmp_path):
    recipe = tmp_path / "pipe.toml"
    recipe.write_text('# a pipeline\n[output]\ncompression = "gzip"\nshard_docs = 64\n\n'
                      '[[stages]]\nname = "normalize"\nmax_blank_lines = 1\n\n'
                      '[[stages]]\nname = "line_dedup"\nmax_count = 3\n')
    pipeline = load_pipeline(recipe, overrides=["line_dedup.max_count=5", "output.shard_docs=10"])
    described = pipeline.describe()
    assert [s["name"] for s in described["stages"]] == ["normalize", "line_dedup"]
    assert described["stages"][0]["max_blank_lines"] == 1 and described["stages"][1]["max_count"] == 5
    assert described["output"] == {"compression": "gzip", "shard_docs": 10}
    assert [s.name for s in load_pipeline(recipe, stages=["pii"]).stages] == ["pii"]  # --stages replaces the list


@pytest.mark.parametrize("stages, overrides, message", [
    (["normalize", "bogus"], [], "unknown curation stage 'bogus'"),
    (["normalize"], ["normalize.bogus=1"], "unknown parameter 'bogus' of stage 'normalize'"),
    (["line_dedup"], ["line_dedup.max_count=abc"], "line_dedup.max_count: expected int, got 'abc'"),
    (["line_dedup"], ["line_dedup.max_count=0"], "max_count and bucket_docs must be >= 1"),
    (["normalize"], ["normalize.form=XX"], "not a Unicode normalization form"),
    (["normalize"], ["pii.emails=false"], "stage 'pii' is not in this pipeline"),
    (["normalize"], ["output.compression=lz4"], "output.compression: 'lz4'"),
    (["normalize"], ["output.shard_docs=0"], "output.shard_docs: expected an integer >= 1"),
    (["normalize", "normalize"], [], "a stage appears twice"),
])
def test_bad_pipelines_are_one_line_errors_before_any_work(capsys, tmp_path, stages, overrides, message):
    src = write_jsonl(tmp_path / "in.jsonl", corpus(5))
    code = main(["data", "curate", "--input", str(src), "--out", str(tmp_path / "out"), "--stages", ",".join(stages),
                 *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_an_output_directory_made_by_another_pipeline_is_refused(capsys, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", corpus(30))
    base = ["data", "curate", "--input", str(src), "--out", str(tmp_path / "out"), "--no-progress", "--workers", "1"]
    assert main([*base, "--stages", "normalize"]) == 0
    first = capsys.readouterr().out
    assert main([*base, "--stages", "normalize"]) == 0  # the same again: nothing to do, the same table
    assert capsys.readouterr().out == first
    code = main([*base, "--stages", "normalize,pii"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "curated with another pipeline" in err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code = main([*base[:4], "--out", str(tmp_path / "other"), "--stages", "normalize"])
    assert code == 2 and "not empty and not a curation output" in capsys.readouterr().err


def test_curate_command_prints_the_per_stage_table(capsys, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", corpus(60), {2: "{broken"})
    assert main(["data", "curate", "--input", str(src), "--out", str(tmp_path / "out"), "--no-progress",
                 "--stages", "normalize,exact_dedup", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    duplicates = stats["stages"][1]["documents"]["removed"]["duplicate"]
    assert "normalize" in out and "exact_dedup" in out and f"duplicate {duplicates}" in out
    assert f"skipped 1 malformed input record(s), e.g. {src}:3: invalid JSON" in out


def test_normalize_keeps_indentation_and_removes_what_it_should():
    stage = Normalize()
    r = Record("1", "\ufeffCafe\u0301\r\n    indented\u00a0line   \r\n\n\n\n\nend\x07\x00  \n\n", "s")
    assert stage(r) is None
    assert r.text == "\ufeffCafé\n    indented line\n\n\nend"
    assert Normalize()(Record("2", " \t\r\n\u3000 \n", "s")) == "empty"
    assert Normalize(max_blank_lines=None, strip=False)(r2 := Record("3", "a\n\n\n\n\nb\n", "s")) is None
    assert r2.text == "a\n\n\n\n\nb\n"


def test_pii_is_replaced_and_counted_and_code_is_left_alone():
    stage = Pii()
    r = Record("1", "Mail jane.doe@mail.example.co.uk, ping 192.168.1.20 or 8.8.8.8, call +1 415-555-0199 "
                    "or (212) 555-0123. Version 3.11.7 and id 4155550199 stay.", "s")
    assert stage(r) is None
    assert r.meta["pii"] == {"email": 1, "ip": 2, "phone": 2}
    assert "jane.doe" not in r.text and "192.168" not in r.text and "415-555-0199" not in r.text
    assert "Version 3.11.7 and id 4155550199 stay." in r.text and "email@example.com" in r.text
    clean = Record("2", "def f(x):\n    return x * 1000000  # no PII here", "s")
    assert stage(clean) is None and "pii" not in clean.meta and clean.text.endswith("here")
    assert Pii(emails=False)(r3 := Record("3", "a@b.org", "s")) is None and r3.text == "a@b.org"


def test_stages_pickle_for_worker_processes():
    import pickle

    pipeline = load_pipeline(stages=STAGES)
    assert [s.name for s in pickle.loads(pickle.dumps(pipeline)).stages] == STAGES
    with pytest.raises(HerdError, match="unknown curation stage 'gopher'"):
        load_pipeline(stages=["gopher"])


def test_stats_command_writes_a_report_with_plots(capsys, tmp_path):
    records = corpus(150, seed=5)
    src, stats = run(tmp_path, records)
    assert main(["data", "stats", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    report = (tmp_path / "out" / "report.md").read_text()
    for s in stats["stages"]:
        assert s["name"] in out
        assert f"| {s['name']} | {s['documents']['in']:,} | {s['documents']['kept']:,} |" in report
    for png in ("removals.png", "lengths.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in report
    code = main(["data", "stats", str(tmp_path)])
    assert code == 2 and "not a finished curation" in capsys.readouterr().err


SENTENCES = {
    "en": "The committee will meet again next week to discuss the new budget and the school building plans.",
    "de": "Der Ausschuss wird sich nächste Woche wieder treffen, um den neuen Haushalt zu besprechen.",
    "fr": "Le comité se réunira de nouveau la semaine prochaine pour discuter du nouveau budget de l'école.",
    "es": "El comité se reunirá de nuevo la próxima semana para discutir el nuevo presupuesto escolar.",
    "ru": "Комитет снова соберётся на следующей неделе, чтобы обсудить новый бюджет и планы школы.",
    "zh": "委员会将在下周再次开会，讨论新的预算和学校建设计划。",
    "ja": "委員会は来週再び会合を開き、新しい予算と学校の建設計画について話し合います。",
}


def test_language_is_identified_recorded_and_filtered(tmp_path):
    from llamaherd.data.curate.language import Language

    for lang, text in SENTENCES.items():
        r = Record(lang, text, "s")
        assert Language(label_only=True)(r) is None
        assert r.meta["language"] == lang and r.meta["language_score"] > 0.8, (lang, r.meta)
    assert Language(languages=["en"])(Record("1", SENTENCES["de"], "s")) == "language_not_kept"
    assert Language(languages=["en", "de"])(Record("2", SENTENCES["de"], "s")) is None
    code = Record("3", "x = f(y)[0]; z += 1", "s")
    assert Language()(code) == "language_low_score" and code.meta["language_score"] < 0.65
    records = [{"id": lang, "text": text} for lang, text in SENTENCES.items()]
    _, stats = run(tmp_path, records, stages=["language"], overrides=['language.languages=["en", "fr"]'])
    assert stats["stages"][0]["documents"] == {"in": 7, "kept": 2, "removed": {"language_not_kept": 5}}
    kept = shard_records(tmp_path / "out" / "kept")
    assert [(r["id"], r["meta"]["language"]) for r in kept] == [("en", "en"), ("fr", "fr")]
    with pytest.raises(HerdError, match="language_threshold"):
        Language(language_threshold=2.0)


def mixed_sources(tmp_path: Path) -> list[Path]:
    """Three sources of 40, 100 and 300 documents."""
    paths = []
    for name, n in (("a", 40), ("b", 100), ("c", 300)):
        paths.append(write_jsonl(tmp_path / f"{name}.jsonl", [{"id": f"{name}{i}", "text": f"{name} text {i}"}
                                                               for i in range(n)]))
    return paths


def mix_run(tmp_path: Path, out: str, *overrides: str) -> tuple[dict, list[dict]]:
    pipeline = load_pipeline(stages=["mix"], overrides=["mix.by=source", "output.shard_docs=64", *overrides])
    stats = curate(pipeline, mixed_sources(tmp_path), tmp_path / out, workers=2)
    return stats, shard_records(tmp_path / out / "kept")


def test_mix_reaches_the_target_shares_by_down_and_up_sampling(tmp_path):
    a, b, c = (str(tmp_path / f"{n}.jsonl") for n in "abc")
    weights = json.dumps({a: 0.2, b: 0.3, c: 0.5})
    # no total: the largest output that repeats nothing (a's 40 documents are its 20%: 200 in all)
    stats, kept = mix_run(tmp_path, "down", f"mix.weights={weights}")
    by_source = Counter(r["source"] for r in kept)
    assert by_source == {a: 40, b: 60, c: 100} and len({r["id"] for r in kept}) == 200
    summary = stats["stages"][0]["summary"]
    assert summary["total"] == 200 and summary["groups"][c] == {"available": 300, "target_share": 0.5,
                                                                "output": 100, "achieved_share": 0.5}
    assert stats["stages"][0]["documents"]["removed"] == {"mix_downsampled": 240}
    # a total beyond what a has: its documents repeat, each 3 or 4 times, copies side by side
    stats, kept = mix_run(tmp_path, "up", f"mix.weights={weights}", "mix.total=700")
    by_source = Counter(r["source"] for r in kept)
    assert by_source == {a: 140, b: 210, c: 350}
    repeats = Counter(r["id"] for r in kept if r["source"] == a)
    assert set(repeats.values()) == {3, 4} and len(repeats) == 40
    ids = [r["id"] for r in kept]
    assert all(ids[i] == ids[i - 1] for i in range(1, len(ids)) if ids[i] in ids[:i])  # copies are adjacent
    docs = stats["stages"][0]["documents"]
    assert docs["added_copies"] == 700 - docs["kept"] and stats["output"]["kept"]["documents"] == 700
    assert docs["in"] == docs["kept"] + sum(docs["removed"].values()) == 440
    # deterministic from the seed; another seed samples others
    _, again = mix_run(tmp_path, "again", f"mix.weights={weights}")
    _, other = mix_run(tmp_path, "other", f"mix.weights={weights}", "mix.seed=1")
    assert [r["id"] for r in again] == [r["id"] for r in shard_records(tmp_path / "down" / "kept")]
    assert {r["id"] for r in other} != {r["id"] for r in again}
    # a source not named is removed as unlisted
    stats, kept = mix_run(tmp_path, "unlisted", f"mix.weights={json.dumps({b: 1, c: 1})}")
    assert stats["stages"][0]["documents"]["removed"]["mix_unlisted"] == 40 and len(kept) == 200


def test_mix_errors(capsys, tmp_path):
    with pytest.raises(HerdError, match="mix.weights: name the groups"):
        load_pipeline(stages=["mix"])
    with pytest.raises(HerdError, match="non-negative numbers"):
        load_pipeline(stages=["mix"], overrides=['mix.weights={"x": -1}'])
    src = write_jsonl(tmp_path / "in.jsonl", corpus(20))
    code = main(["data", "curate", "--input", str(src), "--out", str(tmp_path / "o"), "--stages", "mix",
                 'mix.weights={"code": 1}', "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "mix: no document in group(s) code (by domain); groups found: unknown" in err


@pytest.mark.slow
def test_the_ray_executor_gives_byte_identical_output(tmp_path):
    """The same pipeline as Ray tasks on a local Ray (loopback) and in the local process pool."""
    src = write_jsonl(tmp_path / "in.jsonl", corpus(1500, seed=6), {7: "{bad"})
    args = ["data", "curate", "--input", str(src), "--stages", ",".join(STAGES + ["minhash_dedup"]),
            "--workers", "2", "--no-progress", "output.shard_docs=100", "output.compression=gzip"]
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    assert main([*args, "--out", str(tmp_path / "ray"), "--executor", "ray"]) == 0
    assert snapshot(tmp_path / "ray") == snapshot(tmp_path / "local")
    assert len(list((tmp_path / "ray" / "kept").iterdir())) == 15


def test_curated_output_can_be_curated_again_keeping_its_annotations(tmp_path):
    records = [{"id": f"d{i}", "text": SENTENCES[lang], "url": f"https://x/{i}"}
               for i, lang in enumerate(["en", "de", "en", "fr"])]
    run(tmp_path, records, name="first", stages=["language"], overrides=["language.label_only=true"])
    pipeline = load_pipeline(stages=["exact_dedup"])
    curate(pipeline, [tmp_path / "first" / "kept"], tmp_path / "second", workers=1)
    kept = shard_records(tmp_path / "second" / "kept")
    assert [(r["id"], r["meta"]["language"], r["meta"]["url"]) for r in kept] == [
        ("d0", "en", "https://x/0"), ("d1", "de", "https://x/1"), ("d3", "fr", "https://x/3")]
    assert all(r["meta"]["source"].endswith("first.jsonl") for r in kept)  # where it came from first


def test_a_list_parameter_can_be_switched_off_from_the_command_line():
    pipeline = load_pipeline(stages=["gopher_repetition"],
                             overrides=["gopher_repetition.top_n_grams=null",
                                        "gopher_repetition.dup_n_grams=[[5, 0.2]]"])
    stage = pipeline.stages[0]
    assert stage.top_n_grams == () and stage.dup_n_grams == ((5, 0.2),)
    # one word a hundred times: no top n-gram rule is left to catch it, the duplicated 5-grams do
    assert stage(Record("1", "word " * 100, "s")) == "duplicated_5_n_grams"


def test_dup_ngram_coverage_removes_lines_of_repeated_content():
    from llamaherd.data.curate.dup_ngram_coverage import DupNgramCoverage, duplicated_coverage

    log = " ".join(["ERROR connection to db-7 refused after 30 s, retrying"] * 6)
    prose = ("The committee met on Tuesday to discuss the budget for the new library, the repairs to the "
             "bridge over the river and the plans for a summer festival in the park next year.")
    assert duplicated_coverage(log.split(), 5) > 0.8 and duplicated_coverage(prose.split(), 5) == 0.0
    assert duplicated_coverage("a b c d e a b c d e".split(), 5) == 0.5  # the second half repeats the first
    stage = DupNgramCoverage()
    r = Record("1", f"{prose}\n{log}\nshort line\nshort line", "s")
    assert stage(r) is None
    assert r.text == f"{prose}\nshort line\nshort line" and r.meta["dup_ngram_lines_removed"] == 1
    assert stage(Record("2", log, "s")) == "empty_after_dup_ngram_coverage"
    kept = Record("3", prose, "s")
    assert stage(kept) is None and kept.text == prose and "dup_ngram_lines_removed" not in kept.meta


def test_token_outlier_removes_documents_made_of_tokens_nobody_else_uses(tmp_path):
    rng = random.Random(3)
    records = corpus(200, seed=7)  # ordinary documents share their words
    blob = lambda: " ".join("".join(rng.choice("0123456789abcdef") for _ in range(24)) for _ in range(40))  # noqa: E731
    records += [{"id": f"blob{i}", "text": blob()} for i in range(5)]
    records += [{"id": "half", "text": blob()[: 24 * 15] + " " + " ".join(rng.choices(WORDS, k=60))}]
    _, stats = run(tmp_path, records, stages=["token_outlier"])
    removed = {r["id"]: r for r in shard_records(tmp_path / "out" / "removed")}
    assert set(removed) == {f"blob{i}" for i in range(5)}
    assert all(r["reason"] == "token_outliers" and r["meta"]["outlier_token_fraction"] > 0.9
               for r in removed.values())
    kept = {r["id"]: r for r in shard_records(tmp_path / "out" / "kept")}
    assert 0.1 < kept["half"]["meta"]["outlier_token_fraction"] < 0.3  # some junk, not enough
    # ordinary documents keep theirs low (their few unique tokens: the e-mail addresses and numbers planted in some)
    assert max(r["meta"]["outlier_token_fraction"] for i, r in kept.items() if i != "half") < 0.2
