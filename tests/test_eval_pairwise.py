"""`herd eval pairwise`: both orders judged, the verdicts combined, rates with bootstrap intervals, a report."""

import json

import pytest

from llamaherd.cli import main
from llamaherd.eval.pairwise import CATEGORIES, aggregate, combine, judge_pairs, load_prompts, parse_verdict, rates


def test_verdicts_are_parsed_and_an_unparseable_one_is_none():
    assert parse_verdict("1") == "1" and parse_verdict(" Answer 2 is better.") == "2"
    assert parse_verdict("TIE") == "tie" and parse_verdict("I cannot decide") is None
    assert parse_verdict("12 reasons") is None  # a number that is not a verdict


def test_both_orders_must_agree_for_a_win_or_a_loss():
    assert combine("1", "2") == "win"     # A first: answer 1 is A; B first: answer 2 is A
    assert combine("2", "1") == "loss"
    assert combine("1", "1") == "tie"     # the judge prefers the first position whatever it holds
    assert combine("tie", "2") == "tie" and combine(None, "2") == "tie" and combine(None, None) == "tie"


def test_position_swapping_and_aggregation_on_known_judge_outputs():
    """Must show 3: each pair goes to the judge twice, A's answer first and then second; a judge that always
    picks the first position gives only ties; a judge that picks A's answer wherever it is gives wins; an
    unparseable reply is counted, not a crash."""
    prompts = [{"category": c, "prompt": f"p{i}"} for i, c in enumerate(["coding"] * 4 + ["reasoning"] * 4)]
    a = [f"good {i}" for i in range(8)]
    b = [f"bad {i}" for i in range(8)]
    seen = []

    def prefers_good(convs):
        seen.extend(convs)
        out = []
        for conv in convs:
            text = conv[0]["content"]
            first = text.split("[Answer 1]\n")[1].split("\n\n[Answer 2]")[0]
            if "bad 7" in text:
                out.append("no idea")  # unparseable, both orders
            else:
                out.append("1" if first.startswith("good") else "2")
        return out

    records = judge_pairs(prefers_good, prompts, a, b)
    assert len(seen) == 16
    assert "[Answer 1]\ngood 0\n\n[Answer 2]\nbad 0" in seen[0][0]["content"]
    assert "[Answer 1]\nbad 0\n\n[Answer 2]\ngood 0" in seen[1][0]["content"]
    assert [r["outcome"] for r in records] == ["win"] * 7 + ["tie"]
    summary = aggregate(records, samples=200)
    assert summary["unparsed"] == 2
    assert summary["categories"]["coding"]["win"] == 1.0
    assert summary["categories"]["reasoning"]["win"] == 0.75 and summary["categories"]["reasoning"]["tie"] == 0.25
    assert summary["overall"]["win"] == 7 / 8 and summary["overall"]["net"] == 7 / 8
    first_always = judge_pairs(lambda convs: ["1"] * len(convs), prompts, a, b)
    assert {r["outcome"] for r in first_always} == {"tie"}


def test_rates_and_their_bootstrap_intervals():
    outcomes = ["win"] * 30 + ["tie"] * 10 + ["loss"] * 60
    r = rates(outcomes, samples=2000, seed=1)
    assert (r["n"], r["win"], r["tie"], r["loss"]) == (100, 0.3, 0.1, 0.6)
    assert r["net"] == pytest.approx(-0.3)
    for key in ("win", "tie", "loss", "net"):
        low, high = r[f"{key}_ci"]
        assert low <= r[key] <= high
    # the binomial's standard error for 30 of 100 is 0.046: a 95% interval about +-0.09 around 0.3
    assert 0.15 < r["win_ci"][1] - r["win_ci"][0] < 0.22
    assert rates(["win"] * 5)["win_ci"] == [1.0, 1.0]
    assert rates(outcomes, samples=500, seed=3) == rates(outcomes, samples=500, seed=3)  # seeded


def test_the_builtin_prompts_cover_the_12_categories():
    prompts = load_prompts("builtin")
    counts = {c: sum(p["category"] == c for p in prompts) for c in CATEGORIES}
    assert len(prompts) >= 120 and all(n >= 10 for n in counts.values()), counts
    assert {p["category"] for p in prompts} == set(CATEGORIES)
    assert len({p["prompt"] for p in prompts}) == len(prompts)


def test_herd_eval_pairwise_end_to_end_with_checkpoints(tmp_path, small_tokenizer, make_tiny_model, capsys):
    """Two checkpoints answer, a third judges (a random model: its replies mostly name no verdict, and are
    counted); the report, the chart, the judgements and results.json are written."""
    import llamaherd

    for name, seed in (("a", 1), ("b", 2), ("judge", 3)):
        llamaherd.save(make_tiny_model(seed=seed, max_seq_len=512), tmp_path / name, tokenizer=small_tokenizer)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"category": c, "prompt": f"Say something about {c}."}) + "\n"
                               for c in ("coding", "reasoning", "coding")))
    out = tmp_path / "out"
    assert main(["eval", "pairwise", "--prompts", str(prompts), "--a", str(tmp_path / "a"), "--b",
                 str(tmp_path / "b"), "--judge", str(tmp_path / "judge"), "--out", str(out), "--max-tokens", "4",
                 "--device", "cpu"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["overall"]["n"] == 3 and set(result["categories"]) == {"coding", "reasoning"}
    assert result["overall"]["win"] + result["overall"]["tie"] + result["overall"]["loss"] == pytest.approx(1)
    judged = [json.loads(line) for line in (out / "judgements.jsonl").read_text().splitlines()]
    assert len(judged) == 3 and all({"judge_a_first", "judge_b_first", "outcome"} <= set(j) for j in judged)
    assert (out / "pairwise.png").stat().st_size > 1000 and "| **overall** |" in (out / "report.md").read_text()
    assert "A wins" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"category": "coding"}\n')
    assert main(["eval", "pairwise", "--prompts", str(bad), "--a", "x", "--b", "y", "--judge", "z",
                 "--out", str(out)]) == 2
    assert f"{bad}:1: expected a non-empty string 'prompt'" in capsys.readouterr().err
