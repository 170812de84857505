"""`herd serve CKPT`: the OpenAI-compatible server."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a checkpoint over an OpenAI-compatible HTTP API",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve any checkpoint llamaherd.load reads (a run directory, a Meta or Hugging Face Llama 3)\n"
                    "with continuous batching over a paged KV cache: /v1/completions, /v1/chat/completions\n"
                    "(streaming), /v1/models, /tokenize, /detokenize, /health, /metrics, and a chat page at /.\n"
                    "SIGTERM (Ctrl-C) finishes the running requests, then exits. Needs the serve extra\n"
                    "(pip install 'llamaherd[serve]').",
        epilog="examples:\n  herd serve runs/tiny --port 8000\n"
               "  then: OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='none')\n"
               "  herd serve runs/tiny --guard runs/guard --guard-on input,output --code-shield block\n"
               "  (a flagged request or response: finish_reason content_filter, and what was found)")
    p.add_argument("checkpoint", help="a checkpoint directory or a training run directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on the API")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond that (then 429)")
    p.add_argument("--kv-blocks", type=int, default=1024, help="KV-cache blocks of --block-size positions")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt accepted (400 beyond)")
    p.add_argument("--max-total-tokens", type=int, default=None, help="most prompt + generated tokens a request")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take (default 600)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="the dtype the model runs in (default: bfloat16 on a GPU, the checkpoint's on a CPU)")
    p.add_argument("--quant", default=None, choices=["int8", "int4"],
                   help="quantise the linear layers' weights as the model loads, int8 per output channel or int4 "
                        "in groups (weight-only; runs in bfloat16 unless --dtype says). A checkpoint written by "
                        "`herd quantize` is served quantised without it")
    p.add_argument("--group-size", type=int, default=None,
                   help="with --quant int4: inputs per scale, 32, 64, 128 or 256 (128 when not given)")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    p.add_argument("--name", default=None, help="the model's name in the API (default: the directory's name)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the engine (default 1; 0: torch's)")
    p.add_argument("--compile", action="store_true",
                   help="run the model through torch.compile (dynamic shapes): faster decoding after a warm-up "
                        "that compiles (tens of seconds; /health answers 503 until it is done)")
    g = p.add_argument_group("moderation")
    g.add_argument("--guard", default=None, metavar="GUARD_CKPT",
                   help="a Llama Guard checkpoint (Meta's, or from herd guard train) checking requests and responses")
    g.add_argument("--guard-on", default="input,output", help="what the guard checks: input, output or both")
    g.add_argument("--guard-threshold", type=float, default=0.5, help="flag when P(unsafe) is at least this")
    g.add_argument("--guard-version", type=int, default=None, choices=(2, 3),
                   help="the guard's prompt (default: what herd guard train recorded, else 2)")
    g.add_argument("--code-shield", default="off", choices=("block", "warn", "off"),
                   help="scan responses for insecure code: block filters them, warn attaches the issues")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from llamaherd.errors import HerdError
    from llamaherd.serve.app import serve

    for name in ("max_batch", "max_queue", "kv_blocks", "block_size"):
        if getattr(args, name) < 1:
            raise HerdError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected 1 or more")
    if args.group_size is not None and args.quant != "int4":  # before the server starts
        raise HerdError(f"--group-size {args.group_size} applies to --quant int4 only")
    guard = None
    if args.guard or args.code_shield != "off":
        on = tuple(x.strip() for x in args.guard_on.split(",") if x.strip())
        if not on or set(on) - {"input", "output"}:
            raise HerdError(f"--guard-on {args.guard_on!r}: expected input, output or input,output")
        if not 0 <= args.guard_threshold <= 1:
            raise HerdError(f"--guard-threshold {args.guard_threshold}: expected a probability between 0 and 1")
        guard = {"guard": args.guard, "on": on, "code_shield": args.code_shield, "threshold": args.guard_threshold,
                 "version": args.guard_version}
    serve(args.checkpoint, host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
          max_queue=args.max_queue, kv_blocks=args.kv_blocks, block_size=args.block_size,
          max_prompt_tokens=args.max_prompt_tokens, max_total_tokens=args.max_total_tokens, timeout=args.timeout,
          dtype=args.dtype, device=args.device, quant=args.quant, group_size=args.group_size, name=args.name,
          threads=args.threads or None, compile=args.compile, guard=guard)
    return 0
