"""`herd eval`'s engine: tasks in, metrics out, in the JSON layout scripts read.

    scorer = ModelScorer(model, tokenizer)
    result = evaluate(scorer, [load_task("data/arc:arc")], num_fewshot=0, limit=100)
    # {"tasks": {"data/arc:arc": {"n": 100, "acc": 0.31, "acc_stderr": ..., "acc_norm": 0.33, ...}}}

Multiple choice, as lm-evaluation-harness scores it: ``acc`` is the share of items whose right choice has
the highest log-likelihood, ``acc_norm`` the same with each log-likelihood divided by its choice's length in
characters; ``*_stderr`` the standard error of the mean (sample standard deviation / sqrt(n)).
"""

from __future__ import annotations

import math

from llamaherd.eval.tasks import Task


def _mean_stderr(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # the first of equals, as numpy's argmax


def evaluate_task(scorer, task: Task, *, num_fewshot: int | None = None, limit: int | None = None,
                  log_samples: bool = False, progress=None) -> dict:
    """A multiple-choice task's metrics: {"n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}, and with
    ``log_samples`` the per-item records under "samples"; a perplexity task's {"n", "bits_per_byte",
    "bytes", "tokens"}. ``progress(done, total)`` after each batch."""
    if task.kind == "perplexity":
        return _perplexity(scorer, task, limit=limit, log_samples=log_samples, progress=progress)
    items = task.items[:limit] if limit else task.items
    requests = [task.requests(item, num_fewshot) for item in items]
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


def evaluate(scorer, tasks: list[Task], *, model: str = "", **kw) -> dict:
    """``{"model": model, "tasks": {name: metrics}}`` for every task, in order."""
    return {"model": model, "tasks": {task.name: evaluate_task(scorer, task, **kw) for task in tasks}}
