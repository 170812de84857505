"""`herd eval`'s engine: tasks in, metrics out, in the JSON layout scripts read.

    scorer = ModelScorer(model, tokenizer)
    result = evaluate(scorer, [load_task("data/arc:arc")], num_fewshot=0, limit=100)
    # {"tasks": {"data/arc:arc": {"n": 100, "acc": 0.31, "acc_stderr": ..., "acc_norm": 0.33, ...}}}

Multiple choice, as lm-evaluation-harness scores it: ``acc`` is the share of items whose right choice has
the highest log-likelihood, ``acc_norm`` the same with each log-likelihood divided by its choice's length in
characters; ``*_stderr`` the standard error of the mean (sample standard deviation / sqrt(n)).

Math word problems (gsm8k), as the harness scores them: ``exact_match`` takes the number after "#### " in the
generated answer ("strict-match"), ``exact_match_flexible`` the last number in it ("flexible-extract"); both
compared with the reference's final answer after removing commas, dollar signs and a final full stop.

Code (humaneval, stdlib_doctest): each completion runs against the problem's tests in the sandbox;
``pass@K`` by the unbiased estimator over ``samples`` completions a problem, and how many ended each way.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from llamaherd.eval.tasks import Task

# lm-evaluation-harness's gsm8k filters and the regexes its exact_match ignores
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")
INVALID = "[invalid]"


def _mean_stderr(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # the first of equals, as numpy's argmax


def strict_answer(response: str) -> str:
    """The number after the first "#### " (the harness's strict-match), else "[invalid]"."""
    m = STRICT.search(response)
    return m.group(1).strip() if m else INVALID


def flexible_answer(response: str) -> str:
    """The last number in the response (the harness's flexible-extract), else "[invalid]"."""
    found = FLEXIBLE.findall(response)
    if not found:
        return INVALID
    groups = [g for g in found[-1] if g]
    return groups[0].strip() if groups else INVALID


def normalise_answer(text: str) -> str:
    """What exact_match compares: commas, dollar signs, everything up to "#### " and a final full stop
    removed, lower case."""
    for pattern in IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def evaluate_task(scorer, task: Task, *, num_fewshot: int | None = None, limit: int | None = None,
                  log_samples: bool = False, progress=None, chat: bool = False, samples: int = 1,
                  temperature: float = 0.0, ks: list[int] | None = None, timeout: float = 5.0,
                  max_gen_tokens: int | None = None, seed: int = 0) -> dict:
    """A multiple-choice task's metrics: {"n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}; a gsm8k
    task's {"n", "exact_match", "exact_match_flexible", ...}; a code task's {"n", "pass@K", "results"}; a
    perplexity task's {"n", "bits_per_byte", "bytes", "tokens"}; with ``log_samples`` the per-item records
    under "samples". ``chat``: prompts in the chat format. Generation: ``samples`` a problem at
    ``temperature`` (greedy: 0), at most ``max_gen_tokens`` (default the task's, at most half the model's
    window). ``progress(done, total)`` after each batch."""
    if task.kind == "perplexity":
        return _perplexity(scorer, task, limit=limit, log_samples=log_samples, progress=progress)
    if task.kind in ("gsm8k", "code"):
        return _generation(scorer, task, num_fewshot=num_fewshot, limit=limit, log_samples=log_samples,
                           progress=progress, chat=chat, samples=samples, temperature=temperature, ks=ks,
                           timeout=timeout, max_gen_tokens=max_gen_tokens, seed=seed)
    items = task.items[:limit] if limit else task.items
    requests = [task.requests(item, num_fewshot, chat) for item in items]
    results: list = []
    step = 64
    for i in range(0, len(requests), step):
        results += scorer.score_many(requests[i : i + step])
        if progress:
            progress(len(results), len(requests))
    acc, acc_norm, samples = [], [], []
    for item, (context, conts), scores in zip(items, requests, results, strict=True):
        lls = [s[0] for s in scores]
        pred = _argmax(lls)
        pred_norm = _argmax([ll / len(c) for ll, c in zip(lls, item.choices, strict=True)])
        acc.append(float(pred == item.gold))
        acc_norm.append(float(pred_norm == item.gold))
        if log_samples:
            samples.append({"where": item.where, "context": context, "choices": conts, "gold": item.gold,
                            "loglikelihoods": lls, "is_greedy": [s[1] for s in scores], "pred": pred,
                            "acc": acc[-1], "acc_norm": acc_norm[-1]})
    out = {"n": len(items)}
    for name, xs in (("acc", acc), ("acc_norm", acc_norm)):
        out[name], out[f"{name}_stderr"] = _mean_stderr(xs)
    out["num_fewshot"] = task.default_fewshot if num_fewshot is None else num_fewshot
    if log_samples:
        out["samples"] = samples
    return out


def _generation(scorer, task: Task, *, num_fewshot, limit, log_samples, progress, chat, samples, temperature, ks,
                timeout, max_gen_tokens, seed) -> dict:
    from llamaherd.errors import HerdError

    if samples < 1 or temperature < 0:
        raise HerdError(f"samples {samples}, temperature {temperature}: expected 1 or more samples, temperature >= 0")
    if samples > 1 and temperature == 0:
        raise HerdError(f"{samples} samples a problem at temperature 0 are all the same: give a temperature > 0")
    items = task.items[:limit] if limit else task.items
    window = getattr(scorer, "max_len", None)
    max_tokens = max_gen_tokens or (min(task.max_gen_tokens, window // 2) if window else task.max_gen_tokens)
    contexts = [task.prompt(item, num_fewshot, chat) for item in items]
    until = [] if chat and task.kind == "code" else task.until  # a chat reply ends at its end-of-turn token
    replies = scorer.generate_until(contexts, until, max_tokens, samples=samples, temperature=temperature,
                                    seed=seed, progress=progress)
    out: dict = {"n": len(items), "num_fewshot": 0 if task.kind == "code" else
                 (task.default_fewshot if num_fewshot is None else num_fewshot), "max_gen_tokens": max_tokens}
    if task.kind == "gsm8k":
        records = []
        for item, context, (reply, *_) in zip(items, contexts, replies, strict=True):
            gold = normalise_answer(item.target)
            strict, flexible = strict_answer(reply), flexible_answer(reply)
            records.append({"where": item.where, "context": context, "response": reply, "target": gold,
                            "strict": strict, "flexible": flexible,
                            "exact_match": float(normalise_answer(strict) == gold),
                            "exact_match_flexible": float(normalise_answer(flexible) == gold)})
        for name in ("exact_match", "exact_match_flexible"):
            out[name], out[f"{name}_stderr"] = _mean_stderr([r[name] for r in records])
    else:
        from llamaherd.eval.code import check_samples, code_from_reply, pass_at_ks

        runs = [{"task_id": item.problem["task_id"], "completion": code_from_reply(r, item.problem) if chat else r}
                for item, rs in zip(items, replies, strict=True) for r in rs]
        problems = {item.problem["task_id"]: item.problem for item in items}
        records = check_samples(runs, problems, timeout=timeout)
        ks = ks or [k for k in (1, 10, 100) if k <= samples]
        out.update({k: v for k, v in pass_at_ks(records, ks).items() if k != "n"})
        out["results"] = dict(Counter(r["result"].split(":")[0] for r in records))
    if log_samples:
        out["samples"] = records
    return out


def _perplexity(scorer, task: Task, *, limit=None, log_samples=False, progress=None) -> dict:
    """Bits per byte: the texts' negative log-likelihood in bits over their UTF-8 bytes (each text begins
    with <|begin_of_text|>, which is not scored)."""
    texts = task.texts[:limit] if limit else task.texts
    nll = n_bytes = n_tokens = 0
    samples = []
    for i, text in enumerate(texts, 1):
        ids = scorer.encode(text)
        doc_nll, doc_bytes = scorer.rolling_nll(ids), len(text.encode("utf-8"))
        nll, n_bytes, n_tokens = nll + doc_nll, n_bytes + doc_bytes, n_tokens + len(ids) - 1
        if log_samples:
            samples.append({"index": i - 1, "bytes": doc_bytes, "tokens": len(ids) - 1, "nll": doc_nll})
        if progress:
            progress(i, len(texts))
    out = {"n": len(texts), "bits_per_byte": nll / math.log(2) / max(n_bytes, 1), "bytes": n_bytes,
           "tokens": n_tokens, "num_fewshot": 0}
    if log_samples:
        out["samples"] = samples
    return out


def headline(metrics: dict) -> list[tuple[str, float, float | None]]:
    """(metric, value, standard error or None) of a task's result, in the order tables and plots show them."""
    names = ["acc", "acc_norm", "exact_match", "exact_match_flexible", "bits_per_byte"]
    names += sorted((k for k in metrics if re.fullmatch(r"pass@\d+", k)), key=lambda k: int(k[5:]))
    return [(k, metrics[k], metrics.get(f"{k}_stderr")) for k in names if k in metrics]


def evaluate(scorer, tasks: list[Task], *, model: str = "", **kw) -> dict:
    """``{"model": model, "tasks": {name: metrics}}`` for every task, in order."""
    return {"model": model, "tasks": {task.name: evaluate_task(scorer, task, **kw) for task in tasks}}
