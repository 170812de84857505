"""SFT and DPO training throughput on CPU, and peak memory of LoRA vs full SFT: llamaherd against TRL.

The same model, tokenizer, data and settings on both sides. Model: the `tiny` preset shape (dim 256, 4
layers, 8/2 heads, tied embeddings) with seeded random weights, float32, saved once in our layout and once in
Hugging Face layout (both must give the same logits). Tokenizer: a byte-level BPE of 1,024 ranks (+ the 256
Llama 3 special tokens) trained on the data's text, written for transformers too, with the Llama 3 chat
template carrying `{% generation %}` marks around the assistant's content and its `<|eot_id|>`, which are
exactly the tokens our SFT loss covers; every conversation must tokenise to the same ids, with the same loss
mask, on both sides. Data: the embedded instruction examples and preference pairs (stdlib), written as JSONL
in TRL's conversational format and read from those files by both sides.

Contenders, each in a process of its own (this script re-invoked with --contender), so that each peak
resident set (VmHWM, as cpu_minhash.py measures it) is its own:

    ours-sft, ours-sft-lora   llamaherd.posttrain.sft.sft() (full; lora.rank=8 on wq wk wv wo)
    trl-sft, trl-sft-lora     TRL SFTTrainer (full; a peft LoraConfig, r 8, alpha 16, q k v o)
    ours-dpo                  llamaherd.posttrain.dpo.dpo(): beta 0.1, NLL 0.2, reference scored before training
    trl-dpo                   TRL DPOTrainer, loss_type ["sigmoid", "sft"] weights [1, 0.2], precompute_ref_log_probs
    trl-dpo-live-ref          the same with a reference model (a copy) run at every step (not with --quick)

Settings on both sides: batch 8 rows (DPO: 8 pairs, 16 rows), 256 tokens a row (TRL's max_length), AdamW
(fused, betas 0.9/0.95, no weight decay), gradient clipping 1.0, a constant learning rate (the recipe's: SFT
5e-4, DPO 1e-5), float32, one thread; no evaluation and no checkpoint during the steps. SFT packs on both
sides, each conversation its own document (attention kept inside it, positions restarting): ours greedy into
[8, 256] rows with a document mask; TRL's packing="bfd" (best-fit decreasing), which turns on padding_free:
the batch's rows flattened into one sequence, documents told apart by position_ids. Loss on the assistant's
tokens only (ours always; TRL assistant_only_loss=True).

Timing: the first --warmup steps are not counted, then --steps steps. Ours: each step's seconds from the
run's metrics.jsonl (log_every=1: the tokens_per_s of a step is batch x seq_len over the time since the
previous step's record, so that time is the step); TRL: the time between consecutive on_step_end callbacks.
Both include fetching the batch; neither includes setup (loading, tokenising, packing, the reference
log-probabilities) nor our final checkpoint. Tokens: the real (non-padding) tokens in the model's input for
the batches fed, counted from the batches themselves (our loader's rows; what TRL's collator returns).
tokens/s = tokens of the timed steps / their seconds; the ratio ours/TRL is the median of the per-round
ratios (each round runs every contender once, the order reversed every other round).

Memory: the resident set just before the first step, and the peak resident set (VmHWM) at the end of the last
step (ours: when the final checkpoint starts; TRL: on_train_end); their difference is what training adds to
the libraries, model and data. The TRL processes also import transformers, datasets, peft and trl, so they
start higher.

Not the same on the two sides: the packing itself (ours greedy in data order, with padding; TRL best-fit
decreasing, no padding: more tokens a step), TRL's attention over the flattened batch (one mask over all
8 x 256 positions, where ours has one per row), and DPO's scored tokens (TRL counts each response's
`<|eot_id|>`, our DPO leaves it out as Llama 3 does: one token a response, the same computation).

    python benchmarks/cpu_posttrain.py                  # about 7 minutes on 2 cores
    python benchmarks/cpu_posttrain.py --quick          # about 2 minutes: 1 round, 2 + 8 steps
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    ROOT,
    add_threads_argument,
    assert_same_logits,
    build_ours,
    fmt_table,
    machine,
    paired_ratio,
    print_machine,
    set_threads,
    stats,
    write_json,
)

NAMES = {
    "ours-sft": "llamaherd SFT full",
    "trl-sft": "TRL SFTTrainer full",
    "ours-sft-lora": "llamaherd SFT LoRA r8",
    "trl-sft-lora": "TRL SFTTrainer + peft LoRA r8",
    "ours-dpo": "llamaherd DPO",
    "trl-dpo": "TRL DPOTrainer (ref precomputed)",
    "trl-dpo-live-ref": "TRL DPOTrainer (ref model live)",
}
PAIRS = [("SFT full", "ours-sft", "trl-sft"), ("SFT LoRA r8", "ours-sft-lora", "trl-sft-lora"),
         ("DPO, TRL ref precomputed", "ours-dpo", "trl-dpo"),
         ("DPO, TRL ref model live", "ours-dpo", "trl-dpo-live-ref")]
LORA = {"rank": 8, "alpha": 16.0, "ours": ["wq", "wk", "wv", "wo"], "hf": ["q_proj", "k_proj", "v_proj", "o_proj"]}

# our LLAMA3_CHAT_TEMPLATE (tokenizer/hf.py) with the assistant's content and <|eot_id|> marked as generated:
# what transformers' return_assistant_tokens_mask (TRL's assistant_only_loss) reads
TRAINING_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\n\n' }}"
    "{%- if role == 'assistant' %}{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}"
    "{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)


def memory_mib(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident set. Not ru_maxrss: after a fork and exec
    that may still hold the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the shared inputs ------------------------------------------------------------------------------------


def prepare(a, work: Path) -> dict:
    """Tokenizer, model (both layouts) and data files in ``work``; the checks; the spec every contender reads."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from llamaherd.checkpoint import save
    from llamaherd.model.args import preset
    from llamaherd.posttrain.data import chat_format, encode_conversation
    from llamaherd.posttrain.embedded import preference_pairs, sft_examples
    from llamaherd.tokenizer import Tokenizer
    from llamaherd.tokenizer.train import train_bpe

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    steps = a.warmup + a.steps
    convs = [e["messages"] for e in sft_examples("train", max_examples=a.batch * steps * 8)]
    pairs = [{k: p[k] for k in ("prompt", "chosen", "rejected")}
             for p in preference_pairs("train", max_pairs=a.batch * steps)]
    if a.tokenizer == "bpe":
        texts = [m["content"] for c in convs for m in c]
        texts += [m["content"] for p in pairs for k in ("prompt", "chosen", "rejected") for m in p[k]]
        tok = Tokenizer.from_ranks(train_bpe(texts, a.bpe_ranks, progress=False))
    else:
        tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})
    args = preset("tiny", vocab_size=tok.n_words)
    model = build_ours(args, seed=0)
    save(model, work / "herd", layout="herd", tokenizer=tok)
    save(model, work / "hf", layout="hf", tokenizer=tok)

    files = {"sft": [{"messages": c} for c in convs],
             "sft_eval": [{"messages": e["messages"]} for e in sft_examples("val", max_examples=1)],
             "dpo": pairs, "dpo_eval": [{k: p[k] for k in ("prompt", "chosen", "rejected")}
                                        for p in preference_pairs("val", max_pairs=1)]}
    for name, records in files.items():
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    # the same tokens: our chat encoding against transformers' chat template, as TRL calls it
    chat, hf_tok = chat_format(tok), hf_tokenizer(work / "hf")
    same_ids = same_mask = 0
    for c in convs:
        ours = encode_conversation(chat, c)
        theirs = hf_tok.apply_chat_template(c, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        same_ids += theirs["input_ids"] == ours.ids
        same_mask += [bool(m) for m in theirs["assistant_masks"]] == ours.loss
    same_pairs = eot_only = 0
    for p in pairs:  # TRL: prompt with the generation prompt, then the prompt + each response
        prompt = hf_tok.apply_chat_template(p["prompt"], tokenize=True, return_dict=True,
                                            add_generation_prompt=True)["input_ids"]
        ok, eot = True, True
        for key in ("chosen", "rejected"):
            ours = encode_conversation(chat, p["prompt"] + p[key], eot_loss=False)
            full = hf_tok.apply_chat_template(p["prompt"] + p[key], tokenize=True, return_dict=True)["input_ids"]
            ok &= full == ours.ids and full[:len(prompt)] == prompt
            # TRL scores the completion (content and <|eot_id|>); our DPO the content without <|eot_id|>
            eot &= [i >= len(prompt) for i in range(len(full))] == [*ours.loss[:-1], True] and not ours.loss[-1]
        same_pairs += ok
        eot_only += eot
    check = {"conversations": len(convs), "same_ids": same_ids, "same_loss_mask": same_mask,
             "pairs": len(pairs), "pairs_same_ids": same_pairs, "pairs_mask_differs_only_by_eot": eot_only}
    if same_ids != len(convs) or same_mask != len(convs) or same_pairs != len(pairs):
        sys.exit(f"error: the two sides tokenise differently: {check}")

    hf = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32, attn_implementation="sdpa")
    ids = torch.tensor([encode_conversation(chat, convs[0]).ids])
    check["logits_max_abs_diff"] = assert_same_logits(model.eval(), hf.eval(), ids)
    del hf

    from llamaherd.config import load_config
    lr = {"sft": load_config("sft").train.lr, "dpo": load_config("dpo").train.lr}
    return {"work": str(work), "batch": a.batch, "seq_len": a.seq_len, "warmup": a.warmup, "steps": a.steps,
            "threads": a.threads, "lr": lr, "vocab_size": tok.n_words, "bos_id": tok.bos_id, "check": check}


def hf_tokenizer(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = TRAINING_TEMPLATE
    return tok


# --- one contender, in its own process ------------------------------------------------------------------------


def run_ours(name: str, spec: dict) -> dict:
    """Ours through the public sft() / dpo(); the loader counts each batch's real tokens as it serves it."""
    from llamaherd.config import load_config
    from llamaherd.posttrain import dpo as dpo_mod
    from llamaherd.posttrain import sft as sft_mod
    from llamaherd.posttrain.train import PostTrainer

    work, stage = Path(spec["work"]), "dpo" if "dpo" in name else "sft"
    counted, mem = [], {}

    def first_batch() -> None:
        if not mem:
            mem.update(before_mib=memory_mib("VmRSS"), setup_peak_mib=memory_mib())

    class ChatCounter(sft_mod.ChatLoader):
        def __next__(self):
            first_batch()
            batch = super().__next__()
            # per row, the positions of its conversations (each starts with bos; the padding after them does not)
            counted.append(sum(int(torch.isin(docs, docs[inputs == spec["bos_id"]]).sum())
                               for inputs, docs in zip(batch.inputs, batch.doc_ids)))
            return batch

    class PairCounter(dpo_mod.PairLoader):
        def __next__(self):
            first_batch()
            batch = super().__next__()
            counted.append(int((batch.last + 1).sum()))  # each row's tokens up to its last real one
            return batch

    # no evaluation, no checkpoint before the end; one held-out record, answered with one token, before training
    data, heldout = json.dumps([str(work / f"{stage}.jsonl")]), json.dumps([str(work / f"{stage}_eval.jsonl")])
    overrides = [f"train.steps={spec['warmup'] + spec['steps']}", f"train.batch_size={spec['batch']}",
                 f"train.seq_len={spec['seq_len']}", f"train.lr={spec['lr'][stage]}", "train.warmup_steps=0",
                 "train.min_lr_ratio=1.0", "train.weight_decay=0.0", "train.grad_clip=1.0", "train.eval_every=0",
                 "train.log_every=1", "train.device=cpu", "train.dtype=float32", "train.seed=0",
                 "checkpoint.every=0", "checkpoint.keep=1", f"posttrain.data={data}", f"posttrain.eval_data={heldout}",
                 "posttrain.eval_examples=1", "posttrain.max_new_tokens=1", "posttrain.max_examples=0"]
    if stage == "dpo":
        overrides += ["posttrain.beta=0.1", "posttrain.nll_alpha=0.2"]
    if name.endswith("lora"):
        overrides += [f"lora.rank={LORA['rank']}", f"lora.alpha={LORA['alpha']}",
                      f"lora.targets={json.dumps(LORA['ours'])}"]
    cfg = load_config(stage, overrides)
    out = work / f"run-{name}-{os.getpid()}"
    trainable = []
    init, save = PostTrainer.__init__, PostTrainer.save

    def counting_init(self, model, *args, **kw):  # the parameters that train, for the table
        trainable.append(sum(p.numel() for p in model.parameters() if p.requires_grad))
        init(self, model, *args, **kw)

    def final_save(self):  # the one checkpoint, after the last step: the peak of training is reached
        mem.setdefault("peak_mib", memory_mib())
        return save(self)

    PostTrainer.__init__, PostTrainer.save = counting_init, final_save
    if stage == "sft":
        sft_mod.ChatLoader = ChatCounter
        sft_mod.sft(work / "herd", cfg, out, progress=False)
    else:
        dpo_mod.PairLoader = PairCounter
        dpo_mod.dpo(work / "herd", cfg, out, progress=False)
    mem["peak_end_mib"] = memory_mib()  # after the checkpoint and the held-out answer too
    per_step = spec["batch"] * spec["seq_len"]  # what the Trainer's tokens_per_s counts per step
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = [per_step / r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    return {"step_seconds": seconds, "step_tokens": counted[:len(seconds)], **mem, "trainable_params": trainable[0]}


def run_trl(name: str, spec: dict) -> dict:
    """TRL's trainers as its documentation shows them, with our settings; a callback times the steps."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, TrainerCallback

    work, stage = Path(spec["work"]), "dpo" if "dpo" in name else "sft"
    tok = hf_tokenizer(work / "hf")

    def model():
        return AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32, attn_implementation="sdpa")

    data = load_dataset("json", data_files=str(work / f"{stage}.jsonl"), split="train",
                        cache_dir=str(work / f"datasets-{name}-{os.getpid()}"))
    common = dict(output_dir=str(work / f"run-{name}-{os.getpid()}"), max_steps=spec["warmup"] + spec["steps"],
                  per_device_train_batch_size=spec["batch"], max_length=spec["seq_len"],
                  learning_rate=spec["lr"][stage], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                  adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch_fused",
                  bf16=False, fp16=False, activation_checkpointing=False, use_cpu=True, seed=0,
                  logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
                  disable_tqdm=True, dataloader_num_workers=0)
    times, mem = [], {}

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            mem.update(before_mib=memory_mib("VmRSS"), setup_peak_mib=memory_mib())
            times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kw):
            mem["peak_mib"] = memory_mib()

    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        peft = None
        if name.endswith("lora"):
            from peft import LoraConfig

            peft = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0, bias="none",
                              target_modules=LORA["hf"], task_type="CAUSAL_LM")
        args = SFTConfig(**common, packing=True, packing_strategy="bfd", assistant_only_loss=True)
        trainer = SFTTrainer(model=model(), args=args, train_dataset=data, processing_class=tok, peft_config=peft,
                             callbacks=[Clock()])
    else:
        from trl import DPOConfig, DPOTrainer

        live = name.endswith("live-ref")
        args = DPOConfig(**common, beta=0.1, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2],
                         precompute_ref_log_probs=not live)
        trainer = DPOTrainer(model=model(), ref_model=model() if live else None, args=args, train_dataset=data,
                             processing_class=tok, callbacks=[Clock()])
    counted = []
    collate = trainer.data_collator

    def counting(examples):  # the real tokens of each training batch, as the collator hands it to the model
        batch = collate(examples)
        mask = batch.get("attention_mask")
        counted.append(int(mask.sum()) if mask is not None else int(batch["position_ids"].numel()))
        return batch

    trainer.data_collator = counting
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    mem["peak_end_mib"] = memory_mib()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    settings = {"activation_checkpointing": trainer.args.activation_checkpointing, "bf16": trainer.args.bf16,
                "optimizer": type(opt).__name__, "fused": opt.defaults.get("fused"),
                "padding_free": getattr(trainer, "padding_free", None), "dtype": str(trainer.model.dtype)}
    seconds = [b - a for a, b in zip(times, times[1:])]
    return {"step_seconds": seconds, "step_tokens": counted[:len(seconds)], **mem, "trainable_params": trainable,
            "trl_settings": settings}


def child(name: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    set_threads(spec["threads"])
    t0 = time.perf_counter()
    result = (run_ours if name.startswith("ours") else run_trl)(name, spec)
    result.update(wall_s=time.perf_counter() - t0, threads=torch.get_num_threads())
    print("RESULT " + json.dumps(result), flush=True)


def run_child(name: str, spec_path: Path, work: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(work / "hf-home"), "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--contender", name, "--spec", str(spec_path)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"error: contender {name} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                 f"{proc.stderr[-6000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


# --- the run ----------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="rows per step (SFT) or pairs per step (DPO)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens a row (TRL's max_length)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per contender")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--reps", type=int, default=2, help="rounds; each runs every contender once, in a fresh process")
    p.add_argument("--tokenizer", choices=["bpe", "bytes"], default="bpe",
                   help="a BPE trained on the data's text, or the 256 single bytes")
    p.add_argument("--bpe-ranks", type=int, default=1024)
    p.add_argument("--contenders", default=None, help="comma-separated subset of: " + ", ".join(NAMES))
    p.add_argument("--quick", action="store_true", help="1 round, 2 + 8 steps, no live-reference DPO")
    add_threads_argument(p)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--contender", default=None, help=argparse.SUPPRESS)  # the child process
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.contender:
        return child(a.contender, a.spec)
    if a.quick:
        a.reps, a.steps, a.warmup = 1, 8, 2
    names = a.contenders.split(",") if a.contenders else [n for n in NAMES if not (a.quick and n.endswith("live-ref"))]
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        sys.exit(f"error: unknown contender(s) {', '.join(unknown)}; expected some of {', '.join(NAMES)}")
    set_threads(a.threads)
    info = machine()
    print_machine(info)
    print(f"config: tiny preset shape, float32, batch {a.batch} x {a.seq_len}, {a.warmup} warm-up + {a.steps} timed "
          f"steps, {a.reps} round(s), {a.threads or 'default'} thread(s), tokenizer {a.tokenizer}")

    with tempfile.TemporaryDirectory(prefix="cpu_posttrain-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        spec = prepare(a, work)
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec))
        c = spec["check"]
        print(f"setup {time.perf_counter() - t0:.0f} s: vocab {spec['vocab_size']}, {c['conversations']} conversations "
              f"and {c['pairs']} pairs written; logits equal (max |diff| {c['logits_max_abs_diff']:.1e})")
        print(f"check: tokens identical on both sides for {c['same_ids']}/{c['conversations']} conversations "
              f"(loss masks identical: {c['same_loss_mask']}) and {c['pairs_same_ids']}/{c['pairs']} pairs; DPO "
              f"scores differ by <|eot_id|> only (TRL scores it, ours not) in {c['pairs_mask_differs_only_by_eot']}")
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for r in range(a.reps):
            for name in (names if r % 2 == 0 else names[::-1]):
                res = run_child(name, spec_path, work)
                t = sum(res["step_seconds"][a.warmup:])
                res["tok_per_s"] = sum(res["step_tokens"][a.warmup:]) / t
                runs[name].append(res)
                print(f"  round {r + 1}/{a.reps} {name}: {res['tok_per_s']:.0f} tok/s, peak {res['peak_mib']:.0f} MiB "
                      f"({res['wall_s']:.0f} s in all)", flush=True)

    rows, result = [], {"benchmark": "cpu_posttrain", "machine": info, "config": vars(a), "check": spec["check"],
                        "results": {}, "ratios": {}}
    for name, rs in runs.items():
        tps = stats([x["tok_per_s"] for x in rs])
        peak = stats([x["peak_mib"] for x in rs])
        before = stats([x["before_mib"] for x in rs])
        per_step = stats([sum(x["step_tokens"][a.warmup:]) / a.steps for x in rs])
        ms = stats([sum(x["step_seconds"][a.warmup:]) / a.steps * 1e3 for x in rs])
        rows.append([NAMES[name], f"{tps['median']:.0f}", f"{tps['min']:.0f}-{tps['max']:.0f}", f"{ms['median']:.0f}",
                     f"{per_step['median']:.0f}", f"{rs[0]['trainable_params']:,}", f"{before['median']:.0f}",
                     f"{peak['median']:.0f}", f"{peak['median'] - before['median']:.0f}"])
        result["results"][name] = {"runs": rs, "tok_per_s": tps, "peak_mib": peak, "before_training_mib": before,
                                   "tokens_per_step": per_step, "ms_per_step": ms}
    print()
    print(fmt_table(["", "tok/s (median)", "tok/s (min-max)", "ms/step", "tokens/step", "trainable params",
                     "RSS before training MiB", "peak RSS MiB", "peak - before MiB"], rows))
    rows = []
    for label, ours, trl in PAIRS:
        if ours in runs and trl in runs:
            r = paired_ratio([x["tok_per_s"] for x in runs[ours]], [x["tok_per_s"] for x in runs[trl]])
            result["ratios"][label] = r
            rows.append([f"{label}: tok/s llamaherd / TRL", f"{r['median']:.2f}x", f"{r['min']:.2f}-{r['max']:.2f}"])
    for side, full, lora in (("llamaherd", "ours-sft", "ours-sft-lora"), ("TRL", "trl-sft", "trl-sft-lora")):
        if full in runs and lora in runs:
            r = paired_ratio([x["peak_mib"] for x in runs[lora]], [x["peak_mib"] for x in runs[full]])
            result["ratios"][f"{side} peak RSS LoRA / full"] = r
            rows.append([f"{side}: peak RSS LoRA / full SFT", f"{r['median']:.2f}x", f"{r['min']:.2f}-{r['max']:.2f}"])
    print()
    print(fmt_table(["", "median (paired)", "min-max"], rows))
    write_json(a.out, result)


if __name__ == "__main__":
    main()
