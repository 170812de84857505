"""Code scored by running it: pass@k and the sandbox (`llamaherd.eval.code`, `herd eval code`)."""

import json
import math
import socket
import threading

import pytest

from llamaherd.cli import main
from llamaherd.errors import HerdError
from llamaherd.eval.code import pass_at_k, pass_at_ks, run_program


@pytest.mark.parametrize("n, c, k, want", [
    (1, 1, 1, 1.0), (1, 0, 1, 0.0), (10, 3, 1, 0.3), (5, 0, 3, 0.0), (5, 4, 2, 1.0),
    (4, 1, 2, 1 - 3 / 6),            # 1 - C(3, 2) / C(4, 2)
    (10, 2, 5, 1 - 56 / 252),        # 1 - C(8, 5) / C(10, 5)
    (200, 13, 10, 1 - math.comb(187, 10) / math.comb(200, 10)),
])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k, want):
    """Must show 2: 1 - C(n - c, k) / C(n, k), by hand and from the binomials."""
    assert pass_at_k(n, c, k) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_pass_at_k_averages_over_problems_and_leaves_out_k_beyond_the_samples():
    results = [{"task_id": "a", "passed": p} for p in (True, False, False, False)] + \
              [{"task_id": "b", "passed": p} for p in (True, True)]
    out = pass_at_ks(results, [1, 2, 10])
    assert out["n"] == 2 and out["samples"] == 6
    assert out["pass@1"] == pytest.approx((0.25 + 1.0) / 2)
    assert out["pass@2"] == pytest.approx(((1 - 3 / 6) + 1.0) / 2)
    assert "pass@10" not in out  # problem b has 2 samples
    with pytest.raises(HerdError, match="pass@k"):
        pass_at_k(3, 4, 1)


def test_the_sandbox_reports_each_outcome():
    """Must show 2: an infinite loop is killed, a network connection and a write outside the program's
    directory are refused, and each failure has its reason."""
    assert run_program("assert sum([1, 2]) == 3").result == "passed"
    assert run_program("assert sum([1, 2]) == 4").result == "failed"
    assert run_program("while True:\n    pass\n", timeout=1).result == "timed out"
    assert run_program("def f(:\n").result.startswith("error: SyntaxError")
    assert run_program("raise KeyError('k')").result == "error: KeyError: 'k'"
    # writing inside its own directory is allowed, outside it is not
    assert run_program("open('out.txt', 'w').write('x')\nassert open('out.txt').read() == 'x'").passed
    assert run_program("import os\nos.remove('/etc/hostname')").result.startswith("error: PermissionError: sandbox")
    assert run_program("import subprocess\nsubprocess.run(['true'])").result.startswith("error: PermissionError")


def test_the_sandbox_blocks_writes_and_the_network(tmp_path):
    target = tmp_path / "escaped.txt"
    outcome = run_program(f"open({str(target)!r}, 'w').write('x')")
    assert outcome.result.startswith("error: PermissionError: sandbox: writing outside") and not target.exists()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(5)
    accepted = []
    threading.Thread(target=lambda: accepted.append(_accept(server)), daemon=True).start()
    port = server.getsockname()[1]
    outcome = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
    assert outcome.result.startswith("error: PermissionError: sandbox: socket"), outcome
    server.close()
    assert accepted in ([], [None])  # nobody connected


def _accept(server):
    try:
        return server.accept()
    except OSError:
        return None


PROBLEMS = [
    {"task_id": "t/0", "prompt": "def add(a, b):\n", "entry_point": "add",
     "test": "def check(f):\n    assert f(1, 2) == 3\n    assert f(-1, 1) == 0\n"},
    {"task_id": "t/1", "prompt": "def loop():\n", "entry_point": "loop",
     "test": "def check(f):\n    assert f() == 1\n"},
]
SAMPLES = [
    {"task_id": "t/0", "completion": "    return a + b\n"},
    {"task_id": "t/0", "completion": "    return a - b\n"},
    {"task_id": "t/1", "completion": "    while True:\n        pass\n"},
    {"task_id": "t/1", "completion": "    return 1\n"},
]


def test_herd_eval_code_scores_samples_like_human_eval(tmp_path, capsys):
    problems, samples, out = tmp_path / "problems.jsonl", tmp_path / "samples.jsonl", tmp_path / "out.json"
    problems.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    samples.write_text("".join(json.dumps(s) + "\n" for s in SAMPLES))
    assert main(["eval", "code", str(samples), "--problems", str(problems), "--k", "1,2,5", "--timeout", "1",
                 "--json", str(out), "--log-samples", "--no-progress"]) == 0
    result = json.loads(out.read_text())["tasks"]["code"]
    assert result["pass@1"] == pytest.approx(0.5) and result["pass@2"] == pytest.approx(1.0)
    assert "pass@5" not in result and result["results"] == {"passed": 2, "failed": 1, "timed out": 1}
    assert [r["result"] for r in result["samples"]] == ["passed", "failed", "timed out", "passed"]
    assert "pass@5 left out" in capsys.readouterr().out


def test_herd_eval_code_bad_input_is_one_line(tmp_path, capsys):
    problems, samples = tmp_path / "problems.jsonl", tmp_path / "samples.jsonl"
    problems.write_text(json.dumps({"task_id": "t/0", "prompt": "", "test": ""}) + "\n")
    samples.write_text(json.dumps({"task_id": "t/0", "completion": ""}) + "\n")
    assert main(["eval", "code", str(samples), "--problems", str(problems)]) == 2
    assert f"{problems}:1: no 'entry_point' field" in capsys.readouterr().err
    problems.write_text(json.dumps(PROBLEMS[0]) + "\n")
    samples.write_text(json.dumps({"task_id": "t/9", "completion": ""}) + "\n")
    assert main(["eval", "code", str(samples), "--problems", str(problems)]) == 2
    assert "no such problem" in capsys.readouterr().err
    assert main(["eval", "code", str(samples), "--problems", str(problems), "--k", "one"]) == 2
    assert "--k 'one'" in capsys.readouterr().err
