"""Supervised fine-tuning: next-token loss on the assistant's turns of chat data, through the shared Trainer.

    herd sft runs/tiny --out runs/tiny/sft                       # the embedded instruction data
    herd sft BASE --data chat.jsonl --out DIR lora.rank=8        # your data, LoRA adapters
    result = sft("runs/tiny", cfg, "runs/tiny/sft")              # the same in Python

The base is any checkpoint ``llamaherd.load`` reads (a run directory, a Meta or Hugging Face Llama 3).
Training data is ``posttrain.data`` (JSONL / Parquet in TRL's conversational or prompt/completion format)
or, by default, the embedded instruction pairs from the standard library (``posttrain/embedded.py``).
Held-out answers are scored by token F1 against the reference, for the base and the fine-tuned model.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from llamaherd.config import RunConfig, dump_config
from llamaherd.errors import HerdError
from llamaherd.posttrain.data import ChatLoader, chat_format, encode_records, eval_batches, read_records, to_messages
from llamaherd.posttrain.train import PostTrainer, start_from
from llamaherd.train.losses import NextTokenLoss
from llamaherd.train.trainer import TrainResult, check_writable


@dataclass
class SFTResult:
    train: TrainResult
    heldout_token_f1: float  # the fine-tuned model's held-out answers against the references
    base_heldout_token_f1: float  # the same for the model it started from
    examples: int  # training conversations
    skipped: int  # records that could not be used (reported, not fatal)


def _normalize(text: str) -> list[str]:
    """Words of ``text`` as SQuAD's F1 compares them: lower case, no punctuation, no articles."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 between two texts (1.0 when both are empty)."""
    pred, ref = _normalize(prediction), _normalize(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def answer(model, chat, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
    """The model's greedy reply to each conversation (its messages before the last assistant turn)."""
    from llamaherd.generation import generate

    prompts = [chat.encode_dialog_prompt(_prompt_of(c)) for c in conversations]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                           stop_tokens=chat.tokenizer.stop_tokens)
    finally:
        model.train(was_training)
    return [chat.decode_assistant(ids) for ids in out]


def _prompt_of(messages: list[dict]) -> list[dict]:
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def heldout_token_f1(model, chat, conversations: list[list[dict]], max_new_tokens: int) -> float:
    """Mean token F1 of the model's greedy answers against each conversation's last assistant turn."""
    if not conversations:
        return float("nan")
    replies = answer(model, chat, conversations, max_new_tokens)
    refs = [c[max(i for i, m in enumerate(c) if m["role"] == "assistant")]["content"] for c in conversations]
    return sum(token_f1(p, r) for p, r in zip(replies, refs, strict=True)) / len(conversations)


def load_conversations(paths: list[str], split: str, limit: int = 0, *, kinds=("explain", "write"),
                       on_error=None) -> list[tuple[str, list[dict]]]:
    """(where, messages) of the record files ``paths``, or of the embedded data's ``split`` (its ``kinds``);
    at most ``limit``. A bad record is a one-line error, or with ``on_error`` reported to it and left out."""
    out = []
    if paths:
        for path in paths:
            for where, record in read_records(path):
                try:
                    out.append((where, to_messages(record, where)))
                except HerdError as e:
                    if on_error is None:
                        raise
                    on_error(str(e))
    else:
        from llamaherd.posttrain.embedded import sft_examples

        out = [(f"embedded {e['id']}", e["messages"]) for e in sft_examples(split, kinds=kinds)]
    return out[:limit] if limit else out


def sft(base: str | Path, cfg: RunConfig, out_dir: str | Path, *, progress: bool = True,
        console=None) -> SFTResult:
    """Fine-tune checkpoint ``base`` as ``cfg`` says (``train.*``, ``lora.*``, ``posttrain.*``) into
    ``out_dir`` (checkpoints, metrics.jsonl, config.toml, sft_result.json); resumes a run there."""
    out_dir = Path(out_dir)
    tcfg, pcfg = cfg.train, cfg.posttrain
    if tcfg.steps < 1 or tcfg.batch_size < 1 or tcfg.seq_len < 2 or tcfg.grad_accum < 1:
        raise HerdError("train: steps, batch_size and grad_accum must be >= 1 and seq_len >= 2")
    check_writable(out_dir)
    torch.manual_seed(tcfg.seed)  # LoRA's initial A matrices
    model, tokenizer = start_from(base, cfg)
    if tcfg.seq_len > model.args.max_seq_len:
        raise HerdError(f"train.seq_len {tcfg.seq_len} is longer than the model's max_seq_len {model.args.max_seq_len}")
    chat = chat_format(tokenizer)
    skipped_messages: list[str] = []
    train_convs = load_conversations(pcfg.data, "train", pcfg.max_examples, on_error=skipped_messages.append)
    examples, _ = encode_records(chat, ((w, {"messages": m}) for w, m in train_convs), on_error=skipped_messages.append)
    skipped = len(skipped_messages)  # records that could not be read or encoded, each reported
    if console is not None:
        for message in skipped_messages[:5]:
            console.print(f"[yellow]skipped[/] {message}")
    heldout_records = load_conversations(pcfg.eval_data, "val", pcfg.eval_examples)
    val_examples, _ = encode_records(chat, ((w, {"messages": m}) for w, m in heldout_records))
    # answers scored by token F1: the held-out records, or the embedded held-out docstring questions
    heldout = [m for _, m in (heldout_records if pcfg.eval_data else
                              load_conversations([], "val", pcfg.eval_examples, kinds=("explain",)))]
    (out_dir / "config.toml").write_text(dump_config(cfg))
    base_f1 = heldout_token_f1(model, chat, heldout, pcfg.max_new_tokens)
    loader = ChatLoader(examples, tcfg.seq_len, tcfg.batch_size, seed=tcfg.seed)
    trainer = PostTrainer(model, NextTokenLoss(chunk_size=tcfg.loss_chunk), loader, cfg, out_dir, tokenizer=tokenizer,
                          eval_data=(lambda: eval_batches(val_examples, tcfg.seq_len, tcfg.batch_size))
                          if val_examples else None, name="sft", progress=progress, console=console)
    trainer.resume()
    result = trainer.fit()
    f1 = heldout_token_f1(model, chat, heldout, pcfg.max_new_tokens)
    out = SFTResult(result, f1, base_f1, len(examples), skipped)
    record = {"heldout_token_f1": f1, "base_heldout_token_f1": base_f1, "examples": len(examples),
              "skipped": skipped, "checkpoint": str(result.checkpoint), "val_loss": result.val_loss,
              "train_loss": result.train_loss, "steps": result.steps}
    (out_dir / "sft_result.json").write_text(json.dumps(record, indent=2) + "\n")
    return out
