"""`herd eval`: multiple choice by log-likelihood, against lm-evaluation-harness on the same model and task files,
through a checkpoint and through `herd serve`; task files in published layouts and their errors."""

import json
import math

import pytest
import torch

import llamaherd
from llamaherd.cli import main
from llamaherd.errors import HerdError
from llamaherd.eval.harness import evaluate_task
from llamaherd.eval.loglik import EndpointScorer, ModelScorer, _groups
from llamaherd.eval.tasks import load_task

MMLU = [
    ("The heart has how many chambers?", ["two", "three", "four", "five"], 2),
    ("Which bone is in the thigh?", ["femur", "tibia", "ulna", "radius"], 0),
    ("Where is the liver?", ["head", "abdomen", "leg", "arm"], 1),
    ("What carries oxygen in blood?", ["plasma", "platelets", "white cells", "red cells"], 3),
    ("How many lungs do people have?", ["one", "two", "three", "four"], 1),
    ("The skull protects the", ["brain", "heart", "liver", "lungs"], 0),
]
ARC = [
    ("Which is a gas at room temperature?", ["iron", "oxygen", "salt"], ["A", "B", "C"], "B"),
    ("What makes plants green?", ["chlorophyll", "water", "soil", "sunlight"], ["1", "2", "3", "4"], "1"),
    ("Which planet is closest to the Sun?", ["Venus", "Mercury", "Mars", "Earth"], ["A", "B", "C", "D"], "B"),
    ("Ice melting is a", ["chemical change", "physical change"], ["A", "B"], "B"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory, small_tokenizer):
    """The model (random weights, small BPE) in our layout and exported for transformers, and task files in
    the mmlu layout (a dev and a test file) and the arc layout."""
    from conftest import tiny_model_args

    from llamaherd.model.transformer import Transformer

    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = Transformer(tiny_model_args(max_seq_len=1024))
    model.init_weights(std=0.3, seed=5)
    llamaherd.save(model, root / "herd", tokenizer=small_tokenizer)
    llamaherd.save(model, root / "hf", layout="hf", tokenizer=small_tokenizer)
    mmlu = root / "mmlu"
    mmlu.mkdir()
    for split, rows in (("dev", MMLU[:3]), ("test", MMLU[3:] + MMLU[:2])):
        (mmlu / f"anatomy_{split}.jsonl").write_text("".join(
            json.dumps({"question": q, "choices": c, "answer": a, "subject": "anatomy"}) + "\n" for q, c, a in rows))
    (root / "arc_test.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "question": q, "choices": {"text": t, "label": lab}, "answerKey": k}) + "\n"
        for i, (q, t, lab, k) in enumerate(ARC)))
    return root


def lm_eval_run(files, task_yaml: str, name: str, num_fewshot: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = files / f"lm_eval_{name}"
    tasks.mkdir(exist_ok=True)
    (tasks / f"{name}.yaml").write_text(task_yaml)
    return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={files / 'hf'},dtype=float32",
                                   tasks=[name], task_manager=TaskManager(include_path=str(tasks)),
                                   num_fewshot=num_fewshot, log_samples=True, device="cpu", batch_size=4)


@pytest.mark.parametrize("layout", ["mmlu", "arc"])
def test_multiple_choice_equals_lm_evaluation_harness(files, layout):
    """Must show 1: the same log-likelihood of every choice (1e-4) and the same acc and acc_norm as the
    harness's `hf` model on our exported checkpoint, on the same task files: mmlu 2-shot (first_n from dev,
    the subject's description), arc 0-shot."""
    if layout == "mmlu":
        spec, shots = f"{files / 'mmlu'}:mmlu", 2
        yaml = (
            "task: herd_mmlu\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {files / 'mmlu' / 'anatomy_test.jsonl'}\n    dev: {files / 'mmlu' / 'anatomy_dev.jsonl'}\n"
            "test_split: test\nfewshot_split: dev\nfewshot_config:\n  sampler: first_n\n"
            "output_type: multiple_choice\n"
            "description: \"The following are multiple choice questions (with answers) about anatomy.\\n\\n\"\n"
            "doc_to_text: \"{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}"
            "\\nD. {{choices[3]}}\\nAnswer:\"\n"
            "doc_to_choice: [\"A\", \"B\", \"C\", \"D\"]\ndoc_to_target: answer\n"
            "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    else:
        spec, shots = f"{files / 'arc_test.jsonl'}:arc", 0
        yaml = (
            "task: herd_arc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {files / 'arc_test.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
            "doc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
            "doc_to_target: \"{{choices.label.index(answerKey)}}\"\ndoc_to_choice: \"{{choices.text}}\"\n"
            "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    name = f"herd_{layout}"
    theirs = lm_eval_run(files, yaml, name, shots)
    model, tok = llamaherd.load(files / "herd", dtype=torch.float32)
    ours = evaluate_task(ModelScorer(model, tok), load_task(spec), num_fewshot=shots, log_samples=True)
    samples = sorted(theirs["samples"][name], key=lambda s: s["doc_id"])
    assert ours["n"] == len(samples) == (5 if layout == "mmlu" else 4)
    for mine, their in zip(ours["samples"], samples, strict=True):
        assert mine["context"] == their["arguments"][0][0]  # the same prompt, few-shot examples included
        assert [c for c in mine["choices"]] == [a[1] for a in their["arguments"]]
        for ll, greedy, resp in zip(mine["loglikelihoods"], mine["is_greedy"], their["resps"], strict=True):
            assert ll == pytest.approx(resp[0][0], abs=1e-4)
            assert greedy == resp[0][1]
    for metric in ("acc", "acc_norm"):
        assert ours[metric] == pytest.approx(theirs["results"][name][f"{metric},none"], abs=1e-9)


GSM8K = [(f"{who} has {a} pens and buys {b} more. How many pens now?", f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}.\n"
          f"#### {a + b:,}") for who, a, b in (("Ann", 3, 4), ("Bo", 1200, 7), ("Cy", 5, 9), ("Di", 8, 8),
                                                ("Ed", 2, 40), ("Flo", 6, 1))]


def test_gsm8k_generation_and_scoring_equal_lm_evaluation_harness(files):
    """The same k-shot prompts, the same greedy generations cut at the same strings, the same extracted
    answers (strict and flexible) and exact_match as the harness's gsm8k task (its yaml's prompts, filters
    and metric) with its `hf` model on our exported checkpoint."""
    root = files / "gsm8k"
    root.mkdir(exist_ok=True)
    for split, rows in (("train", GSM8K[:3]), ("test", GSM8K[3:])):
        (root / f"gsm_{split}.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                                          for q, a in rows))
    yaml = (
        "task: herd_gsm8k\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    train: {root / 'gsm_train.jsonl'}\n    test: {root / 'gsm_test.jsonl'}\n"
        "output_type: generate_until\ntraining_split: train\nfewshot_split: train\ntest_split: test\n"
        "fewshot_config:\n  sampler: first_n\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        "    ignore_case: true\n    ignore_punctuation: false\n    regexes_to_ignore:\n"
        '      - ","\n      - "\\\\$"\n      - "(?s).*#### "\n      - "\\\\.$"\n'
        'generation_kwargs:\n  until:\n    - "Question:"\n    - "</s>"\n    - "<|im_end|>"\n'
        "  do_sample: false\n  temperature: 0.0\n"
        "filter_list:\n  - name: strict-match\n    filter:\n      - function: regex\n"
        '        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"\n      - function: take_first\n'
        "  - name: flexible-extract\n    filter:\n      - function: regex\n        group_select: -1\n"
        '        regex_pattern: "(-?[$0-9.,]{2,})|(-?[0-9]+)"\n      - function: take_first\n'
    )
    theirs = lm_eval_run(files, yaml, "herd_gsm8k", 2)
    model, tok = llamaherd.load(files / "herd", dtype=torch.float32)
    ours = evaluate_task(ModelScorer(model, tok), load_task(f"{root / 'gsm_test.jsonl'}:gsm8k"), num_fewshot=2,
                         log_samples=True)
    samples = {}
    for s in theirs["samples"]["herd_gsm8k"]:
        samples.setdefault(s["doc_id"], {})[s["filter"]] = s
    assert len(samples) == len(ours["samples"]) == 3
    assert all(len(mine["response"]) > 20 for mine in ours["samples"])  # real generations, not empty ones
    for i, mine in enumerate(ours["samples"]):
        strict, flexible = samples[i]["strict-match"], samples[i]["flexible-extract"]
        assert mine["context"] == strict["arguments"][0][0]
        assert mine["response"] == strict["resps"][0][0]
        assert (mine["strict"], mine["flexible"]) == (strict["filtered_resps"][0], flexible["filtered_resps"][0])
        assert (mine["exact_match"], mine["exact_match_flexible"]) == (strict["exact_match"], flexible["exact_match"])
    metrics = theirs["results"]["herd_gsm8k"]
    assert ours["exact_match"] == pytest.approx(metrics["exact_match,strict-match"], abs=1e-9)
    assert ours["exact_match_flexible"] == pytest.approx(metrics["exact_match,flexible-extract"], abs=1e-9)


def test_shared_context_scoring_equals_scoring_each_choice_alone(files):
    """The context read once for all choices (one row, a mask keeping the choices apart), and the few-shot
    start read once for all items (its keys and values kept), give what a forward of context + choice gives
    for each choice, in any batch."""
    model, tok = llamaherd.load(files / "herd", dtype=torch.float32)
    task = load_task(f"{files / 'mmlu'}:mmlu")
    requests = [task.requests(item, 2) for item in task.items] + [("Question: x\nAnswer:", [" yes", " no way"])]
    scorer = ModelScorer(model, tok, batch_tokens=300)  # several batches of different widths
    rows = [(tok.encode(c, bos=True), [tok.encode(c + x, bos=True)[len(tok.encode(c, bos=True)):] for x in conts])
            for c, conts in requests]
    groups = _groups(rows)  # the mmlu items share their 2-shot start: read once for all of them
    assert [len(m) for p, m in groups if p] == [len(task.items)] and len(groups) == 2
    together = scorer.score_many(requests)
    for (context, conts), scores in zip(requests, together, strict=True):
        for cont, (ll, greedy) in zip(conts, scores, strict=True):
            ctx = tok.encode(context, bos=True)
            ids = ctx + tok.encode(context + cont, bos=True)[len(ctx):]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), -1)
            want = [logp[i - 1, ids[i]] for i in range(len(ctx), len(ids))]
            assert ll == pytest.approx(float(sum(want)), abs=1e-4)
            assert greedy == all(int(logp[i - 1].argmax()) == ids[i] for i in range(len(ctx), len(ids)))


def test_an_endpoint_gives_the_checkpoint_s_numbers(files):
    """Must show 4: `herd serve` on the checkpoint, scored through its OpenAI-compatible API (tokenize, echo,
    logprobs), gives the same log-likelihoods and accuracy as the checkpoint itself."""
    from llamaherd.serve.app import running_server

    model, tok = llamaherd.load(files / "herd", dtype=torch.float32)
    task = load_task(f"{files / 'mmlu'}:mmlu")
    direct = evaluate_task(ModelScorer(model, tok), task, num_fewshot=2, log_samples=True)
    with running_server(model, tok, "tiny", kv_blocks=512, block_size=16) as (url, _, _):
        served = evaluate_task(EndpointScorer(url + "/v1"), task, num_fewshot=2, log_samples=True)
    for a, b in zip(direct["samples"], served["samples"], strict=True):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)
        assert a["is_greedy"] == b["is_greedy"]
    assert direct["acc"] == served["acc"] and direct["acc_norm"] == served["acc_norm"]


def test_herd_eval_cli_writes_the_json_layout(files, tmp_path, capsys):
    out = tmp_path / "eval.json"
    spec = f"{files / 'arc_test.jsonl'}:arc"
    assert main(["eval", str(files / "herd"), "--tasks", spec, "--limit", "3", "--json", str(out),
                 "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == str(files / "herd") and list(result["tasks"]) == [spec]
    metrics = result["tasks"][spec]
    assert metrics["n"] == 3 and 0 <= metrics["acc"] <= 1 and 0 <= metrics["acc_norm"] <= 1
    assert "acc_norm" in capsys.readouterr().out


def test_the_builtin_docstring_task_is_held_out_and_well_formed():
    task = load_task("stdlib_docstring_mc")
    assert len(task.items) >= 100
    for item in task.items:
        assert len(item.choices) == 4 and len(set(item.choices)) == 4 and 0 <= item.gold < 4
        name = item.where.split(" ", 1)[1]
        assert item.choices[item.gold] == name and item.text.startswith("Docstring: ")
    golds = [item.gold for item in task.items]
    assert max(golds.count(g) for g in range(4)) < 0.4 * len(golds)  # the right answer's place is spread


@pytest.mark.parametrize("content, message", [
    ('{"choices": ["a", "b", "c", "d"], "answer": 0}', ":1: no 'question' field"),
    ('{"question": "q", "choices": ["a", "b", "c", "d"], "answer": 4}', ":1: answer index 4 is out of range"),
    ('{"question": "q", "choices": ["a", "b", "c", "d"], "answer": "E"}', ":1: answer 'E' is not an index"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 0}', ":1: 'choices' must be a list of 4"),
    ('{"question": "q", "answer": 0}\n', ":1: no 'choices' field and no A, B, C, D columns"),
    ("not json", ":1: not valid JSON"),
])
def test_bad_task_files_are_one_line_errors_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "items_test.jsonl"
    path.write_text(content + "\n")
    with pytest.raises(HerdError, match=str(path).replace("\\", "\\\\") + message.replace("(", r"\(")):
        load_task(f"{path}:mmlu")


def test_task_specs_and_csv_layouts(tmp_path, capsys):
    with pytest.raises(HerdError, match="unknown layout 'squad'"):
        load_task(f"{tmp_path}:squad")
    with pytest.raises(HerdError, match="expected a built-in task"):
        load_task("mmlu")  # nothing is downloaded: a local file is needed
    with pytest.raises(HerdError, match="file not found"):
        load_task(f"{tmp_path / 'none.jsonl'}:arc")
    # the original MMLU release: headerless CSV, the subject from the file name
    (tmp_path / "virology_test.csv").write_text('"What is a virus?",cell,particle,organ,tissue,B\n')
    task = load_task(f"{tmp_path / 'virology_test.csv'}:mmlu")
    assert task.items[0].gold == 1 and task.items[0].subject == "virology"
    context, conts = task.requests(task.items[0], 0)
    assert context.startswith("The following are multiple choice questions (with answers) about virology.\n\n")
    assert context.endswith("What is a virus?\nA. cell\nB. particle\nC. organ\nD. tissue\nAnswer:")
    assert conts == [" A", " B", " C", " D"]
    (tmp_path / "bad_test.csv").write_text("q,a,b\n")
    with pytest.raises(HerdError, match=r"bad_test.csv:1: expected 6 columns"):
        load_task(f"{tmp_path / 'bad_test.csv'}:mmlu")
    assert main(["eval", str(tmp_path), "--tasks", f"{tmp_path}:nope"]) == 2
    assert "unknown layout 'nope'" in capsys.readouterr().err


def test_perplexity_is_bits_per_byte_over_disjoint_windows(files, tmp_path, small_tokenizer, make_tiny_model):
    """A text longer than the model's context is scored in windows, each token predicted from its window's
    earlier tokens (the first from the previous window's last one): bits per byte by hand, through a
    checkpoint and through `herd serve`, and as `PATH:perplexity` from the command line."""
    from llamaherd.serve.app import running_server

    model = make_tiny_model(seed=1, max_seq_len=32)
    text = "the theory of the thing, then another thing; " * 3  # 135 bytes: more than four windows of 32
    ids = small_tokenizer.encode(text, bos=True)
    assert len(ids) > 2 * 32 + 1
    want = 0.0
    for s in range(0, len(ids) - 1, 32):
        window = ids[s : s + 33]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([window[:-1]]))[0].float(), -1)
        want -= sum(float(logp[i, t]) for i, t in enumerate(window[1:]))
    scorer = ModelScorer(model, small_tokenizer)
    assert scorer.rolling_nll(ids) == pytest.approx(want, rel=1e-5)
    (tmp_path / "corpus.txt").write_text(text)
    task = load_task(f"{tmp_path / 'corpus.txt'}:perplexity")
    got = evaluate_task(scorer, task)
    assert got["n"] == 1 and got["bytes"] == len(text.encode())
    assert got["bits_per_byte"] == pytest.approx(want / math.log(2) / len(text.encode()), rel=1e-5)
    with running_server(model, small_tokenizer, "tiny", kv_blocks=64, block_size=8) as (url, _, _):
        served = evaluate_task(EndpointScorer(url + "/v1"), task)  # windows of the server's context less one
    assert served["bits_per_byte"] == pytest.approx(got["bits_per_byte"], rel=0.05)
    out = tmp_path / "ppl.json"
    assert main(["eval", str(files / "herd"), "--tasks", f"{tmp_path / 'corpus.txt'}:perplexity", "--json", str(out),
                 "--no-progress"]) == 0
    metrics = json.loads(out.read_text())["tasks"][f"{tmp_path / 'corpus.txt'}:perplexity"]
    assert metrics["n"] == 1 and metrics["bits_per_byte"] > 0


def test_decontamination_finds_items_that_share_a_13_gram_with_training_data(tmp_path, small_tokenizer, capsys):
    """`herd eval decontaminate`: an item whose question (13 words or more, any case and punctuation) appears in
    the training data is reported, one that does not is not; from JSONL and from packed shards decoded with
    the tokenizer found beside them."""
    from llamaherd.data.pack import pack_documents
    from llamaherd.eval.decontaminate import decontaminate

    leaked = "which of these animals lives in the sea and breathes air through a hole on its head"
    items = [("Which of these animals LIVES in the sea, and breathes air through a hole on its head?",
              ["whale", "shark"], ["A", "B"], "A"),
             ("What do bees make from the nectar that they collect from many kinds of flowers?",
              ["honey", "wax"], ["A", "B"], "A"),
             ("Short one?", ["yes", "no"], ["A", "B"], "A")]
    (tmp_path / "quiz_test.jsonl").write_text("".join(
        json.dumps({"question": q, "choices": {"text": t, "label": lab}, "answerKey": k}) + "\n"
        for q, t, lab, k in items))
    docs = [f"Some text first. {leaked}. And more after it.", "Bees and flowers, but other words entirely."]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    task = load_task(f"{tmp_path / 'quiz_test.jsonl'}:arc")
    report = decontaminate(task, tmp_path / "train.jsonl")
    assert report["items"] == 3 and report["documents"] == 2
    assert report["contaminated_items"] == [f"{tmp_path / 'quiz_test.jsonl'}:1"]
    assert decontaminate(task, tmp_path / "train.jsonl", n=30)["contaminated"] == 0  # longer than any item
    run = tmp_path / "run"
    run.mkdir()
    small_tokenizer.save(run / "tokenizer.model")
    pack_documents(docs, small_tokenizer, run / "data" / "train", tokenizer_file=run / "tokenizer.model",
                   progress=False)
    out = tmp_path / "contam.json"
    assert main(["eval", "decontaminate", f"{tmp_path / 'quiz_test.jsonl'}:arc", "--against",
                 str(run / "data" / "train"), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["contaminated_items"] == report["contaminated_items"]
    assert "1 of 3 items" in capsys.readouterr().out
    assert main(["eval", "decontaminate", "stdlib_docstring_mc", "--against", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err
