"""Multiple-choice items/s on CPU: `herd eval`'s scorer against lm-evaluation-harness's `hf` model.

The same model, tokenizer, task file and prompts on both sides. Model: the `tiny` preset shape (dim 256, 4
layers) with seeded random weights, float32, saved in our layout and exported to Hugging Face's (which the
harness loads with transformers). Tokenizer: 256 byte ranks + the Llama 3 special tokens, or Meta's 128K
file with --meta-tokenizer (from the llama-models package). Task: an MMLU-layout file built from the
embedded held-out docstring questions ("which function does this docstring describe?", four names), 5-shot
from a dev file of the first examples (the harness's first_n), as a YAML task for the harness.

Each contender runs in a process of its own (this script re-invoked with --contender): it loads the model,
then the evaluation of every item is timed (the harness: `simple_evaluate` on an already built HFLM, so its
task building is counted, as ours is; ours: load_task + evaluate_task). Items/s = items / seconds; rounds
alternate the order; the ratio is the median of the per-round ratios. The two sides' log-likelihoods are
compared (max |diff|) and their accuracies must agree.

    python benchmarks/cpu_eval.py                 # about 3 minutes on 2 cores
    python benchmarks/cpu_eval.py --quick         # 1 round, 60 items
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = ("herd", "lm-eval-hf")


def prepare(a, work: Path) -> dict:
    import torch

    import llamaherd
    from llamaherd.eval.tasks import stdlib_docstring_mc
    from llamaherd.model.args import preset
    from llamaherd.model.transformer import Transformer
    from llamaherd.tokenizer import Tokenizer

    if a.meta_tokenizer:
        import llama_models

        tok = Tokenizer.from_file(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model")
    else:
        tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})
    args = preset("tiny", vocab_size=tok.n_words, max_seq_len=4096)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_rope()
    model.init_weights(seed=0)
    llamaherd.save(model, work / "herd", tokenizer=tok, overwrite=True)
    llamaherd.save(model, work / "hf", layout="hf", tokenizer=tok, overwrite=True)
    items = stdlib_docstring_mc().items
    rows = [{"question": it.text.removeprefix("Docstring: ").split("\nWhich function")[0], "choices": it.choices,
             "answer": it.gold, "subject": "python"} for it in items]
    data = work / "task"
    data.mkdir(exist_ok=True)
    (data / "python_dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    (data / "python_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[5 : 5 + a.items]))
    yaml = work / "lm_eval_tasks"
    yaml.mkdir(exist_ok=True)
    (yaml / "herd_bench.yaml").write_text(
        "task: herd_bench\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data / 'python_test.jsonl'}\n    dev: {data / 'python_dev.jsonl'}\n"
        "test_split: test\nfewshot_split: dev\nfewshot_config:\n  sampler: first_n\noutput_type: multiple_choice\n"
        "description: \"The following are multiple choice questions (with answers) about python.\\n\\n\"\n"
        "doc_to_text: \"{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}"
        "\\nD. {{choices[3]}}\\nAnswer:\"\ndoc_to_choice: [\"A\", \"B\", \"C\", \"D\"]\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return {"work": str(work), "items": min(a.items, len(rows) - 5), "shots": 5, "threads": a.threads,
            "batch": a.batch, "vocab": tok.n_words}


def run_herd(spec: dict) -> dict:
    import torch

    import llamaherd
    from llamaherd.eval.harness import evaluate_task
    from llamaherd.eval.loglik import ModelScorer
    from llamaherd.eval.tasks import load_task

    work = Path(spec["work"])
    model, tok = llamaherd.load(work / "herd", dtype=torch.float32)
    t0 = time.perf_counter()
    out = evaluate_task(ModelScorer(model, tok), load_task(f"{work / 'task'}:mmlu"), num_fewshot=spec["shots"],
                        log_samples=True)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "n": out["n"], "acc": out["acc"], "acc_norm": out["acc_norm"],
            "lls": [s["loglikelihoods"] for s in out["samples"]]}


def run_lm_eval(spec: dict) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    work = Path(spec["work"])
    lm = HFLM(pretrained=str(work / "hf"), dtype="float32", device="cpu", batch_size=spec["batch"])
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=["herd_bench"], num_fewshot=spec["shots"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(work / "lm_eval_tasks")))
    seconds = time.perf_counter() - t0
    samples = sorted(out["samples"]["herd_bench"], key=lambda s: s["doc_id"])
    res = out["results"]["herd_bench"]
    return {"seconds": seconds, "n": len(samples), "acc": res["acc,none"], "acc_norm": res["acc_norm,none"],
            "lls": [[r[0][0] for r in s["resps"]] for s in samples]}


def child(name: str, spec_path: str) -> None:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    result = run_herd(spec) if name == "herd" else run_lm_eval(spec)
    print("RESULT " + json.dumps(result))


def run_child(name: str, spec_path: Path) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(json.loads(spec_path.read_text())["threads"])}
    proc = subprocess.run([sys.executable, __file__, "--contender", name, "--spec", str(spec_path)],
                          capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=95, help="test items (the held-out docstrings less 5 for shots)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads a contender")
    p.add_argument("--batch", type=int, default=8, help="the harness's batch size (requests a forward)")
    p.add_argument("--meta-tokenizer", action="store_true", help="Meta's 128K tokenizer (llama-models)")
    p.add_argument("--quick", action="store_true", help="1 round, 60 items")
    p.add_argument("--work", default=None, help="a scratch directory (default: a temporary one)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--contender", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.contender:
        return child(a.contender, a.spec)
    if a.quick:
        a.rounds, a.items = 1, 60
    import tempfile

    import torch

    tmp = tempfile.TemporaryDirectory() if a.work is None else None
    work = Path(a.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    machine = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit.stdout.strip(),
               "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__}
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    spec = prepare(a, work)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    print(f"task: {spec['items']} items, {spec['shots']}-shot, 4 choices; vocab {spec['vocab']}; "
          f"{a.threads} thread(s); the harness's batch {a.batch}")
    rounds = []
    for r in range(a.rounds):
        order = NAMES if r % 2 == 0 else NAMES[::-1]
        got = {name: run_child(name, spec_path) for name in order}
        for name in order:
            g = got[name]
            print(f"  round {r + 1}/{a.rounds} {name}: {g['n'] / g['seconds']:.1f} items/s "
                  f"({g['seconds']:.1f} s, acc {g['acc']:.4f}, acc_norm {g['acc_norm']:.4f})")
        rounds.append(got)
    diff = max(abs(x - y) for g in rounds for a_, b_ in zip(g["herd"]["lls"], g["lm-eval-hf"]["lls"], strict=True)
               for x, y in zip(a_, b_, strict=True))
    same = all(g["herd"]["acc"] == g["lm-eval-hf"]["acc"] and g["herd"]["acc_norm"] == g["lm-eval-hf"]["acc_norm"]
               for g in rounds)
    rates = {name: [g[name]["n"] / g[name]["seconds"] for g in rounds] for name in NAMES}
    ratios = [h / e for h, e in zip(rates["herd"], rates["lm-eval-hf"], strict=True)]
    print(f"\nlog-likelihoods: max |herd - harness| = {diff:.2e}; accuracies equal: {same}")
    print("| contender | items/s (median) | min-max |\n|---|---:|---:|")
    for name in NAMES:
        print(f"| {name} | {statistics.median(rates[name]):.1f} | {min(rates[name]):.1f}-{max(rates[name]):.1f} |")
    print(f"\nherd / harness items/s: {statistics.median(ratios):.2f}x (rounds: "
          f"{', '.join(f'{x:.2f}' for x in ratios)})")
    if a.out:
        Path(a.out).write_text(json.dumps({"machine": machine, "spec": spec, "rates": rates, "ratios": ratios,
                                           "max_ll_diff": diff, "acc_equal": same}, indent=2) + "\n")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
