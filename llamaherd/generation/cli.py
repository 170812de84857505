"""`herd generate` and `herd chat`: text in, text out, from any checkpoint `llamaherd.load` reads."""

from __future__ import annotations

import argparse
import sys

from llamaherd.errors import HerdError


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory (Meta, Hugging Face, llamaherd layout, or a run dir)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate per reply")
    p.add_argument("--temperature", type=float, default=0.6, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: bfloat16 on GPU; on CPU the checkpoint's own dtype)")
    p.add_argument("--compile", action="store_true",
                   help="decode through a compiled step (CUDA graphs on a GPU, an AOTInductor library on a "
                        "CPU): faster, after a first call that compiles (20-60 s)")
    p.add_argument("--quant", default=None, choices=["int8", "int4"],
                   help="quantise the linear layers' weights as the model loads, int8 per output channel or int4 "
                        "per group of inputs (weight-only); it then runs in bfloat16 unless --dtype says otherwise. "
                        "A checkpoint written by `herd quantize` loads quantised without it")
    p.add_argument("--group-size", type=int, default=None,
                   help="with --quant int4: inputs per scale, 32, 64, 128 or 256 (128 when not given)")


def register(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("generate", help="complete a prompt", formatter_class=fmt,
                       description="Complete a text prompt with a model and print the completion as it is generated.")
    _add_common(p)
    p.add_argument("--prompt", required=True, help="text to complete ('-' reads standard input)")
    p.add_argument("--draft", default=None, metavar="CKPT",
                   help="speculative decoding: a smaller model with the same tokenizer proposes tokens that this "
                        "model checks several at a time (greedy output unchanged; sampled output distributed the same)")
    p.add_argument("--draft-tokens", type=int, default=4, metavar="K", help="tokens the draft proposes a round")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat", formatter_class=fmt,
                       description="Chat with a model in the Llama 3 chat format. Type /reset to start over, "
                                   "/exit or end of input to quit.")
    _add_common(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("quantize", help="write a weight-only int8 / int4 quantised checkpoint", formatter_class=fmt,
                       description="Quantise a float checkpoint's linear layers, weight-only, to int8 (one scale per "
                                   "output channel) or int4 (a scale and a zero per group of inputs), and write it "
                                   "as a herd checkpoint, tokenizer included, that llamaherd.load, herd generate "
                                   "and herd chat read like any other (herd info shows the scheme).")
    p.add_argument("checkpoint", metavar="CKPT", help="float checkpoint directory (any layout, or a run dir)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--quant", required=True, choices=["int8", "int4"], default=argparse.SUPPRESS,
                   help="int8: per output channel; int4: per group of --group-size inputs")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4 only: inputs per scale, 32, 64, 128 or 256 (128 when not given)")
    p.add_argument("--head", action=argparse.BooleanOptionalAction, default=None,
                   help="quantise the output head too (when not given: yes for int8, no for int4)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="floating dtype the quantised model runs in: its scales, embeddings and norms")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it already holds a checkpoint")
    p.set_defaults(func=cmd_quantize)


def _load(args):
    from llamaherd.generation import load_for_decoding

    model, tokenizer = load_for_decoding(args.checkpoint, device=args.device, dtype=args.dtype,
                                         quant=getattr(args, "quant", None),
                                         group_size=getattr(args, "group_size", None))
    if tokenizer is None:
        raise HerdError(f"{args.checkpoint}: has no tokenizer files; text generation needs one")
    if args.compile:  # the first reply waits for the compiler: say so rather than look hung
        print("compiling the decode step for the first reply (tens of seconds)...", file=sys.stderr, flush=True)
    return model, tokenizer


class _Printer:
    """Prints decoded text as tokens arrive, holding back bytes of an unfinished UTF-8 character."""

    def __init__(self, tokenizer, stop_tokens, out=None):
        self.tokenizer, self.stop, self.out = tokenizer, set(stop_tokens), out or sys.stdout
        self.ids: list[int] = []
        self.shown = 0

    def __call__(self, row: int, token: int) -> None:
        if token in self.stop:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.out.write(text[self.shown:])
            self.out.flush()
            self.shown = len(text)

    def finish(self) -> str:
        """Write what was held back (an incomplete character at the very end) and a newline; the whole text."""
        text = self.tokenizer.decode(self.ids)
        self.out.write(text[self.shown:] + "\n")
        self.out.flush()
        return text


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, compile=args.compile)


def cmd_generate(args) -> int:
    from llamaherd.generation import generate

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = _load(args)
    ids = tokenizer.encode(prompt, bos=True, eos=False)
    printer = _Printer(tokenizer, tokenizer.stop_tokens)
    draft, stats = _load_draft(args, model), {}
    generate(model, [ids], stop_tokens=tokenizer.stop_tokens, on_token=printer, draft_model=draft,
             draft_tokens=args.draft_tokens, stats=stats, **_sampling(args))
    printer.finish()
    if draft is not None:
        rate = "-" if stats["acceptance"] is None else f"{stats['acceptance']:.0%}"
        print(f"draft: {stats['accepted']} of {stats['proposed']} proposed tokens accepted ({rate}) in "
              f"{stats['rounds']} rounds", file=sys.stderr)
    return 0


def _load_draft(args, model):
    """``--draft``: the draft model on the target's device, in the dtype ``--dtype`` gives a float model (the draft
    computes its own activations, so it need not share a quantised target's), weights ordered for decoding."""
    if args.draft is None:
        return None
    import torch

    from llamaherd.checkpoint import load
    from llamaherd.generation import prepare_for_decoding

    device = model.tok_embeddings.weight.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else None)
    draft, _ = load(args.draft, device=device, dtype=dtype, tokenizer=False)
    return prepare_for_decoding(draft.eval())


def cmd_chat(args) -> int:
    from llamaherd.generation import generate
    from llamaherd.tokenizer import ChatFormat

    model, tokenizer = _load(args)
    chat = ChatFormat(tokenizer)
    system = [{"role": "system", "content": args.system}] if args.system else []
    dialog = list(system)
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            dialog = list(system)
            continue
        if not line.strip():
            continue
        dialog.append({"role": "user", "content": line})
        ids = chat.encode_dialog_prompt(dialog)
        if len(ids) >= model.args.max_seq_len:
            print(f"error: the conversation ({len(ids)} tokens) no longer fits the context of "
                  f"{model.args.max_seq_len} tokens; type /reset to start over", file=sys.stderr)
            dialog.pop()
            continue
        sys.stdout.write("assistant> " if interactive else "")
        printer = _Printer(tokenizer, tokenizer.stop_tokens)
        generate(model, [ids], stop_tokens=tokenizer.stop_tokens, on_token=printer, **_sampling(args))
        dialog.append({"role": "assistant", "content": printer.finish()})
    return 0


def cmd_quantize(args) -> int:
    from llamaherd.checkpoint import quantize_checkpoint
    from llamaherd.checkpoint.native import read_quantization

    out = quantize_checkpoint(args.checkpoint, args.out, args.quant, args.group_size, args.head, args.dtype,
                              overwrite=args.overwrite)
    print(f"wrote {out}: {read_quantization(out).describe()}, {args.dtype}")
    return 0
