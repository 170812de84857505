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


def register(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("generate", help="complete a prompt", formatter_class=fmt,
                       description="Complete a text prompt with a model and print the completion as it is generated.")
    _add_common(p)
    p.add_argument("--prompt", required=True, help="text to complete ('-' reads standard input)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat", formatter_class=fmt,
                       description="Chat with a model in the Llama 3 chat format. Type /reset to start over, "
                                   "/exit or end of input to quit.")
    _add_common(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat)


def _load(args):
    import torch

    from llamaherd.checkpoint import load
    from llamaherd.generation import prepare_for_decoding

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else None)
    model, tokenizer = load(args.checkpoint, device=device, dtype=dtype)
    if tokenizer is None:
        raise HerdError(f"{args.checkpoint}: has no tokenizer files; text generation needs one")
    prepare_for_decoding(model)
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
    generate(model, [ids], stop_tokens=tokenizer.stop_tokens, on_token=printer, **_sampling(args))
    printer.finish()
    return 0


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
