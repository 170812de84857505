"""Code Shield (llamaherd.safety.scan_code, `herd codeshield`): every rule against its own examples, recall and
precision on a labelled set side by side with Meta's codeshield, Markdown blocks and line numbers, language
detection, treatment, errors, the command line."""

from __future__ import annotations

import asyncio
import io
import json
import statistics
import time
from pathlib import Path

import pytest

from llamaherd.cli import main
from llamaherd.errors import HerdError
from llamaherd.safety import scan_code
from llamaherd.safety.codeshield import LANGUAGES, RULES, detect_language, split_blocks, strip_comments

LABELLED = Path(__file__).parent / "data" / "codeshield_labelled.jsonl"
# measured on 2026-11-30 over the 136 snippets: recall 0.971 (66/68), precision 1.0 (0 of 68 safe flagged)
MIN_RECALL, MIN_PRECISION = 0.93, 0.95


def labelled() -> list[dict]:
    return [json.loads(line) for line in LABELLED.read_text().splitlines() if line.strip()]


def rule_ids(result: dict) -> set[str]:
    return {i["rule"] for i in result["issues"]}


# --- every rule, every language it runs on --------------------------------------------------------------------

CASES = [pytest.param(rule, lang, id=f"{rule.id}[{lang}]") for rule in RULES for lang in rule.languages]


@pytest.mark.parametrize(("rule", "language"), CASES)
def test_rule_flags_its_positive_example(rule, language):
    found = [i for i in scan_code(rule.positive, language=language)["issues"] if i["rule"] == rule.id]
    assert found, f"{rule.id} does not flag its own positive example in {language}"
    assert {i["cwe"] for i in found} == {rule.cwe}
    assert {i["severity"] for i in found} == {rule.severity}


@pytest.mark.parametrize(("rule", "language"), CASES)
def test_rule_passes_its_negative_example(rule, language):
    result = scan_code(rule.negative, language=language)
    assert result["issues"] == [], f"{rule.id}'s safe example is flagged in {language}: {rule_ids(result)}"
    assert result["recommended_treatment"] == "ignore"


def test_rules_are_well_formed():
    assert len({r.id for r in RULES}) == len(RULES)
    for rule in RULES:
        assert rule.severity in ("error", "warning") and rule.cwe.startswith("CWE-") and rule.description
        assert set(rule.languages) <= set(LANGUAGES) and rule.positive != rule.negative
    for lang in LANGUAGES:  # every language has rules of its own, not only the agnostic ones
        assert sum(1 for r in RULES if r.languages != LANGUAGES and lang in r.languages) >= 6, lang


# --- the labelled set, ours and Meta's ----------------------------------------------------------------------


def recall_precision(verdicts: list[bool], rows: list[dict]) -> tuple[float, float]:
    tp = sum(v and r["label"] == "insecure" for v, r in zip(verdicts, rows))
    fp = sum(v and r["label"] == "safe" for v, r in zip(verdicts, rows))
    positives = sum(r["label"] == "insecure" for r in rows)
    return tp / positives, tp / (tp + fp) if tp + fp else 1.0


def test_labelled_set_is_as_described():
    rows = labelled()
    assert len(rows) >= 80 and len({r["id"] for r in rows}) == len(rows)
    for lang in LANGUAGES:
        mine = [r for r in rows if r["language"] == lang]
        assert sum(r["label"] == "insecure" for r in mine) >= 5 and sum(r["label"] == "safe" for r in mine) >= 5
    assert all(r["cwe"].startswith("CWE-") for r in rows if r["label"] == "insecure")
    assert sum("```" in r["code"] for r in rows) >= 30  # many are Markdown answers with prose around the code


def test_recall_and_precision_on_the_labelled_set():
    rows = labelled()
    results = [scan_code(r["code"]) for r in rows]  # no language given: fences and detection decide
    recall, precision = recall_precision([res["is_insecure"] for res in results], rows)
    assert recall >= MIN_RECALL and precision >= MIN_PRECISION, (recall, precision)
    # what we flag in an insecure snippet names the weakness it was labelled with
    hits = [(r, res) for r, res in zip(rows, results) if r["label"] == "insecure" and res["is_insecure"]]
    assert all(r["cwe"] in {i["cwe"] for i in res["issues"]} for r, res in hits)


def test_at_least_as_good_as_meta_codeshield():
    cs = pytest.importorskip("codeshield.cs", reason="Meta's codeshield package (the reference) is not installed")
    from codeshield.insecure_code_detector.languages import Language

    rows = labelled()

    async def scan_all():
        limit = asyncio.Semaphore(4)  # each scan may start a semgrep process

        async def one(row):
            async with limit:
                return await cs.CodeShield.scan_code(row["code"], Language(row["language"]))
        return await asyncio.gather(*(one(r) for r in rows))

    meta = asyncio.run(scan_all())
    meta_recall, meta_precision = recall_precision([m.is_insecure for m in meta], rows)
    ours_recall, ours_precision = recall_precision([scan_code(r["code"])["is_insecure"] for r in rows], rows)
    # measured 2026-11-30 (codeshield 1.0.1, semgrep 1.75.0, Meta given each snippet's language): recall 0.294,
    # precision 0.833; ours without a language: 0.971, 1.0
    assert meta_recall > 0.1, "Meta's codeshield found almost nothing: is its semgrep layer running?"
    assert ours_recall >= meta_recall and ours_precision >= meta_precision, \
        (ours_recall, ours_precision, meta_recall, meta_precision)


# --- Markdown blocks and line numbers -----------------------------------------------------------------------

ANSWER = """Sure! First install the package:

```bash
pip install requests
```

Then call the API. Never pass user input to eval() or os.system() in real code.

```python
import os

def ping(host):
    os.system("ping -c 1 " + host)
```

And the page that shows the result:

~~~js
el.innerHTML = `<b>${result}</b>`;
~~~
"""


def test_fenced_blocks_are_scanned_with_lines_of_the_whole_text():
    result = scan_code(ANSWER)
    assert [(i["rule"], i["line"]) for i in result["issues"]] == [("py-os-system", 13), ("js-xss-dom", 19)]
    assert [(b["language"], b["first_line"], b["last_line"], b["fenced"]) for b in result["scanned_blocks"]] == \
        [("bash", 4, 4, True), ("python", 10, 13, True), ("javascript", 19, 19, True)]
    assert ANSWER.split("\n")[12].strip().startswith("os.system") and ANSWER.split("\n")[18].startswith("el.inner")
    assert result["language"] == "mixed" and result["recommended_treatment"] == "block"


def test_prose_around_fences_is_not_scanned():
    text = "Avoid eval(user_input) and os.system(cmd); use:\n\n```python\nvalue = ast.literal_eval(text)\n```\n"
    assert scan_code(text)["issues"] == []
    assert scan_code("Avoid eval(user_input) and os.system(cmd)", language="python")["is_insecure"]  # no fence


def test_unclosed_fence_runs_to_the_end():
    text = "Here:\n\n```c\n#include <stdio.h>\nint main(void) {\n    char b[8];\n    gets(b);"
    result = scan_code(text)
    assert [(i["rule"], i["line"]) for i in result["issues"]] == [("c-gets", 7)]
    assert result["scanned_blocks"][0]["last_line"] == 7


@pytest.mark.parametrize(("info", "language"), [
    ("python", "python"), ("py", "python"), ("Python3", "python"), ("{.python}", "python"),
    ('py title="app.py"', "python"), ("c++", "cpp"), ("main.rs", "rust"), ("ts", "javascript"), ("C#", "csharp"),
    ("bash", "bash"), ("", "python")])
def test_fence_info_strings(info, language):
    blocks = split_blocks(f"Text\n```{info}\nimport os\nos.system(cmd)\n```\n")
    assert len(blocks) == 1 and (blocks[0].first_line, blocks[0].code) == (3, "import os\nos.system(cmd)")
    assert scan_code(f"```{info}\nimport os\nos.system(cmd)\n```")["scanned_blocks"][0]["language"] == language


def test_a_fence_for_another_language_gets_only_the_agnostic_rules():
    result = scan_code('```bash\nexport DB_PASSWORD="hunter2hunter2"\nsystem("rm -rf $dir")\n```')
    assert rule_ids(result) == {"any-hardcoded-credential"}


def test_language_argument_applies_to_blocks_without_a_language():
    text = "```\nstrcpy(dst, src);\n```\n```python\nstrcpy(dst, src)\n```"
    result = scan_code(text, language="c")
    assert [(i["rule"], i["line"]) for i in result["issues"]] == [("c-strcpy", 2)]
    assert [b["how"] for b in result["scanned_blocks"]] == ["argument", "fence"]


# --- language detection ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("code", "language"), [
    ("import json\n\ndef load(p):\n    with open(p) as f:\n        return json.load(f)\n", "python"),
    ("#include <stdio.h>\nint main(void) {\n    printf(\"hi\\n\");\n    return 0;\n}\n", "c"),
    ("#include <iostream>\nint main() {\n    std::cout << \"hi\" << std::endl;\n}\n", "cpp"),
    ("const express = require('express');\nconst app = express();\napp.listen(3000);\n", "javascript"),
    ("import java.util.List;\npublic class A {\n    public static void main(String[] args) {}\n}\n", "java"),
    ("<?php\n$name = $_GET['name'] ?? '';\necho htmlspecialchars($name);\n", "php"),
    ("use std::fs;\nfn main() {\n    let mut s = String::new();\n    println!(\"{}\", s);\n}\n", "rust"),
    ("using System;\npublic class P\n{\n    public string Name { get; set; }\n}\n", "csharp"),
    ("The weather is nice today.", None),
])
def test_detect_language(code, language):
    assert detect_language(code) == language


def test_comments_are_blanked_and_strings_kept():
    code = 'x = "# not a comment"  # os.system(cmd)\n'
    assert strip_comments(code, "python") == 'x = "# not a comment"' + " " * 18 + "\n"
    assert scan_code("// strcpy(dst, src);\n/* gets(buf); */\nputs(\"ok\");", language="c")["issues"] == []


def test_python_fragment_that_does_not_parse_falls_back_to_the_regex():
    fragment = "    else:\n        subprocess.call(user_cmd, shell=True)\n"
    assert [(i["rule"], i["line"]) for i in scan_code(fragment, language="python")["issues"]] == \
        [("py-subprocess-shell", 2)]


def test_python_syntax_tree_follows_imports_and_constants():
    code = "from subprocess import run as r\nCMD = 'ls -l'\nr(CMD, shell=True)\nr(f'ls {d}', shell=True)\n"
    assert [(i["rule"], i["line"]) for i in scan_code(code, language="python")["issues"]] == \
        [("py-subprocess-shell", 4)]


# --- treatment, result shape, errors -------------------------------------------------------------------------

def test_treatment_follows_the_worst_severity():
    error = scan_code("os.system(cmd)", language="python")
    warning = scan_code("digest = hashlib.md5(data).hexdigest()", language="python")
    both = scan_code("os.system(cmd)\ndigest = hashlib.md5(data).hexdigest()", language="python")
    clean = scan_code("print('hello')", language="python")
    assert (error["recommended_treatment"], error["is_insecure"]) == ("block", True)
    assert (warning["recommended_treatment"], warning["is_insecure"]) == ("warn", True)
    assert both["recommended_treatment"] == "block" and [i["severity"] for i in both["issues"]] == ["error", "warning"]
    assert (clean["recommended_treatment"], clean["is_insecure"], clean["issues"]) == ("ignore", False, [])


def test_result_shape():
    result = scan_code("os.system(cmd)", language="py")
    assert set(result) >= {"is_insecure", "issues", "recommended_treatment", "language", "scanned_blocks"}
    assert set(result["issues"][0]) >= {"rule", "cwe", "line", "severity", "description"}
    assert json.loads(json.dumps(result)) == result
    assert scan_code("") == {"is_insecure": False, "issues": [], "recommended_treatment": "ignore",
                             "language": None, "scanned_blocks": []}


@pytest.mark.parametrize(("args", "words"), [
    (("os.system(x)", "cobol"), ["cobol", "python"]),
    ((b"os.system(x)", None), ["code", "bytes"]),
])
def test_bad_input_is_a_one_line_error(args, words):
    with pytest.raises(HerdError) as e:
        scan_code(*args)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words)


def test_latency_on_a_typical_output():
    rows = labelled()
    text = "\n\nSome explanation.\n\n".join(r["code"] for r in rows[:4])[:2000]
    times = []
    for _ in range(50):
        start = time.perf_counter()
        scan_code(text)
        times.append(time.perf_counter() - start)
    assert max(times) < 0.07 and statistics.median(times) < 0.02, (statistics.median(times), max(times))


@pytest.mark.parametrize("text", ['"' * 20000 + "'" * 20000, "a[" * 20000, '"SELECT * FROM t WHERE ' + "x " * 20000,
                                  "password password = " * 3000])
def test_adversarial_input_scans_in_linear_time(text):
    start = time.perf_counter()
    scan_code(text)
    assert time.perf_counter() - start < 2.0


def test_python_request_data_is_followed_to_its_sink():
    code = ("@app.route('/img')\ndef img():\n    f = request.files['img']\n    im = Image.open(f)\n"
            "    name = request.args['name']\n    path = os.path.join('static', name)\n    return send_file(path)\n")
    assert [(i["rule"], i["line"]) for i in scan_code(code, language="python")["issues"]] == \
        [("py-path-traversal", 6), ("py-path-traversal", 7)]


# --- the command line -----------------------------------------------------------------------------------------

def test_cli_json_from_a_file(tmp_path, capsys):
    path = tmp_path / "answer.md"
    path.write_text(ANSWER)
    assert main(["codeshield", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recommended_treatment"] == "block" and [i["line"] for i in out["issues"]] == [13, 19]


def test_cli_reads_stdin_and_exit_code(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("```c\nchar b[8];\ngets(b);\n```\n"))
    assert main(["codeshield", "-", "--exit-code"]) == 1
    out = capsys.readouterr().out
    assert "c-gets" in out and "CWE-242" in out and "block: 1 issue(s)" in out
    monkeypatch.setattr("sys.stdin", io.StringIO("print('hi')\n"))
    assert main(["codeshield", "--exit-code", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recommended_treatment"] == "ignore"


def test_cli_uses_the_file_extension(tmp_path, capsys):
    path = tmp_path / "copy.c"
    path.write_text("strcpy(dst, src);\n")  # too little to guess a language from
    assert main(["codeshield", str(path), "--json"]) == 0
    assert [i["rule"] for i in json.loads(capsys.readouterr().out)["issues"]] == ["c-strcpy"]


@pytest.mark.parametrize(("argv", "words"), [
    (["codeshield", "/no/such/answer.md"], ["/no/such/answer.md", "no such file"]),
    (["codeshield", "-", "--language", "cobol"], ["cobol", "expected one of"]),
])
def test_cli_errors_are_one_line_with_status_2(monkeypatch, capsys, argv, words):
    monkeypatch.setattr("sys.stdin", io.StringIO("x = 1\n"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and all(w in err for w in words)
