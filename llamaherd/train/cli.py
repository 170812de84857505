"""`herd run` (the main job), `herd pretrain` and `herd recipes`."""

from __future__ import annotations

import argparse
import os
import time

_SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}


def register(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "run", help="the main job: raw text -> a small Llama 3, end to end", formatter_class=fmt,
        description="Build a Llama 3 from raw text: clean the corpus, train a BPE tokenizer, pack tokens, pretrain,\n"
                    "validate and sample, all into runs/NAME/. With no recipe it runs the built-in recipe tiny on the\n"
                    "embedded corpus (the Python standard library's code and docstrings). Running it again resumes.\n"
                    "The built-in recipes are listed by `herd recipes`.",
        epilog="example: herd run tiny train.steps=100 --out runs/quick")
    p.add_argument("recipe", nargs="?", default="tiny",
                   help="a built-in recipe (see `herd recipes`) or a .toml path (default: tiny)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. train.steps=100")
    p.add_argument("--out", default=None, help="run directory (default: runs/<recipe name>)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="pretrain with N processes on this machine (torchrun; laid out by parallel.*)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "pretrain", help="pretrain (or resume) on packed token data", formatter_class=fmt,
        description="Pretrain a model as a recipe describes, on packed tokens (herd data pack) named by\n"
                    "data.train_dir / data.val_dir. Running the same command on the same --out resumes from the\n"
                    "newest good checkpoint. SIGTERM / Ctrl-C write a checkpoint and stop.\n\n"
                    "Many processes: `torchrun --nproc-per-node N -m llamaherd pretrain RECIPE ...` (any torchrun\n"
                    "options: nodes, rendezvous, --max-restarts), or --nproc N here, which starts torchrun on this\n"
                    "machine. parallel.tp, parallel.pp and parallel.dp_replicate lay the ranks out; FSDP shards\n"
                    "over the rest. train.batch_size counts the rows of all ranks together.",
        epilog="examples:\n  herd pretrain tiny data.train_dir=packed/train tokenizer.path=tok.model train.steps=30\n"
               "  herd pretrain tiny --nproc 4 parallel.tp=2 data.train_dir=packed/train tokenizer.path=tok.model")
    p.add_argument("recipe", help="a built-in recipe (see `herd recipes`) or a .toml path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. checkpoint.every=5")
    p.add_argument("--out", default=None, help="run directory (default: runs/<recipe name>)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="start N processes on this machine under torchrun (default 1: this process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser(
        "plan", help="the layouts of a training run before it exists: memory, step time, MFU", formatter_class=fmt,
        description="Cost every layout of a run (tensor, pipeline and data parallel sizes, micro-batching, pipeline\n"
                    "schedule, activation checkpointing) with a closed-form model: memory per GPU (parameters,\n"
                    "gradients, optimizer state, activations), pipeline bubble, communication, predicted step time\n"
                    "and MFU. Those that fit are listed fastest first, the best variant of each (tp, pp, dp). Every\n"
                    "assumption (hardware table, efficiencies, overlap) is printed with the plan.",
        epilog="examples:\n  herd plan --model llama3.1-405b --gpus 16384 --gpu h100-80gb --seq 8192 "
               "--global-batch-tokens 16M\n  herd plan --model llama3-8b --gpus 64 --gpu h200 --seq 8192 "
               "--global-batch-tokens 4M --json")
    p.add_argument("--model", required=True, help="a model preset, e.g. llama3.1-405b, llama3-8b, llama3.2-1b")
    p.add_argument("--gpus", type=int, required=True, help="how many GPUs")
    p.add_argument("--gpu", default="h100-80gb", help="GPU type: h100-80gb, h200, a100-80gb, a100-40gb")
    p.add_argument("--seq", type=int, default=8192, help="tokens per sequence (default 8192)")
    p.add_argument("--global-batch-tokens", default="4M", help="tokens per optimizer step, e.g. 16M (default 4M)")
    p.add_argument("--top", type=int, default=10, help="how many layouts to list (0: all)")
    p.add_argument("--all-variants", action="store_true", help="every micro-batching / schedule of a layout")
    p.add_argument("--kernels", default="compiled", choices=["compiled", "eager"],
                   help="what activations the kernels keep: compiled blocks (default) or eager PyTorch")
    p.add_argument("--loss-chunk", type=int, default=0, metavar="N",
                   help="as train.loss_chunk: a chunked head + cross-entropy, N tokens a chunk, on layouts without "
                        "tensor or pipeline parallelism (default 0: the plain loss)")
    p.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="as train.param_dtype: bfloat16 weights, gradients and AdamW states (one GPU only)")
    p.add_argument("--json", action="store_true", help="print a JSON list of the layouts instead of a table")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "recipes", help="list the built-in recipes, or print one", formatter_class=fmt,
        description="List the recipes that come with llamaherd, each with its one-line description. With a\n"
                    "NAME, print that recipe's TOML unchanged: a starting point for a recipe of your own.",
        epilog="examples:\n  herd recipes\n  herd recipes tiny > my.toml && herd run my.toml")
    p.add_argument("name", nargs="?", metavar="NAME", help="print this recipe's TOML to stdout")
    p.set_defaults(func=cmd_recipes)


def _split_overrides(args) -> list[str]:
    # `herd run train.steps=3` parses train.steps=3 as the recipe: treat it as an override
    if args.recipe and "=" in args.recipe:
        args.overrides.insert(0, args.recipe)
        args.recipe = None
    return args.overrides


def cmd_run(args) -> int:
    import json
    from pathlib import Path

    from rich.console import Console

    from llamaherd.config import load_config
    from llamaherd.posttrain.run import check_stages, report_lines, run_stages
    from llamaherd.train.run import print_summary, run

    console = Console(stderr=True)
    overrides = _split_overrides(args)
    cfg = load_config(args.recipe or "tiny", overrides)
    check_stages(cfg)  # post-training's and evaluation's settings are checked before any work too
    from llamaherd.eval.run import check_eval

    check_eval(cfg)
    summary = run(args.recipe, overrides, args.out, progress=not args.no_progress, console=console, nproc=args.nproc)
    if summary.train.stopped_by:
        return _SIGNAL_EXIT.get(summary.train.stopped_by, 1)
    def announce(name, fn, *a):
        console.print(f"[bold cyan]▶ {name.replace('_', ' ')}[/]")
        t0 = time.perf_counter()
        out = fn(*a)
        summary.stages.append((name.replace("_", " "), time.perf_counter() - t0, ""))
        return out

    pretrained = {"val_bpb": summary.train.val_bpb, "val_loss": summary.train.val_loss}
    results = run_stages(cfg, summary.run_dir, summary.train.checkpoint, pretrained, progress=not args.no_progress,
                         console=console, announce=announce)
    report = summary.run_dir / "report.md"
    if cfg.posttraining.stages:
        report.write_text(report.read_text() + "\n".join(report_lines(results)) + "\n")
    if cfg.eval.tasks:
        from llamaherd.eval.run import finished_eval, stage_eval
        from llamaherd.eval.run import report_lines as eval_lines

        base, final = Path(summary.train.checkpoint), Path(results[-1]["checkpoint"])
        metrics = finished_eval(cfg, summary.run_dir, base, final) or announce(
            "eval", stage_eval, cfg, summary.run_dir, base, final, not args.no_progress, console)
        results.append({"stage": "eval", "checkpoint": str(final), "metrics": metrics})
        (summary.run_dir / "results.json").write_text(json.dumps({"stages": results}, indent=2) + "\n")
        report.write_text(report.read_text() + "\n".join(eval_lines(metrics)) + "\n")
    out = Console()
    print_summary(summary, out)
    for r in results[1:]:
        if r["stage"] == "eval":
            from llamaherd.eval.harness import headline

            for who in ("base", "final"):
                numbers = ", ".join(f"{task} {metric} {value:.3f}" for task, m in r["metrics"][who]["tasks"].items()
                                    for metric, value, _ in headline(m)[:1])
                out.print(f"[bold]eval {who}[/]: {numbers}")
            continue
        numbers = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r["metrics"].items()
                            if v is not None)
        out.print(f"[bold]{r['stage']}[/]: {numbers}")
    if cfg.posttraining.stages:
        out.print("chat with the final model:")
        print(f"herd chat {summary.run_dir}", flush=True)  # the last line, whole (a script may run it)
    return 0


def cmd_pretrain(args) -> int:
    from pathlib import Path

    from rich.console import Console

    from llamaherd.config import load_config
    from llamaherd.errors import HerdError
    from llamaherd.train.pretrain import check_layout, launch, pretrain, read_result

    overrides = _split_overrides(args)
    cfg = load_config(args.recipe, overrides)
    out = Path(args.out or Path("runs") / cfg.name)
    console = Console(stderr=True)
    if "WORLD_SIZE" in os.environ:  # a rank of torchrun's: a crash in native code shows its Python stack
        import faulthandler

        faulthandler.enable()
    if args.nproc != 1 and "WORLD_SIZE" not in os.environ:
        check_layout(cfg, args.nproc)  # a layout that cannot work is one line here, not N tracebacks there
        code = launch(args.recipe, overrides, out, args.nproc, progress=not args.no_progress)
        if code:
            raise HerdError(f"the {args.nproc} training processes failed (exit status {code}); see their output "
                            "above. Running the same command resumes from the newest good checkpoint")
        result = read_result(out)
        return _SIGNAL_EXIT.get(result.stopped_by, 1) if result.stopped_by else 0  # rank 0 has said how it went
    else:
        result = pretrain(cfg, out, progress=not args.no_progress, console=console)
    if result.stopped_by:
        return _SIGNAL_EXIT.get(result.stopped_by, 1)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 says how it went
    msg = f"step {result.step}/{result.steps}: train loss {result.train_loss:.4f}"
    if result.val_loss is not None:
        msg += f", validation {result.val_loss:.4f} nats/token ({result.val_bpb:.4f} bits/byte)"
    Console().print(f"{msg}; checkpoint {result.checkpoint}", soft_wrap=True, highlight=False, markup=False)
    return 0


def cmd_plan(args) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from llamaherd.errors import HerdError
    from llamaherd.train.plan import ASSUMPTIONS, HARDWARE, LATENCY, plan

    if args.top < 0:
        raise HerdError(f"--top {args.top}: expected 0 (all) or more")
    found = plan(args.model, args.gpus, args.gpu, args.seq, args.global_batch_tokens, top=args.top,
                 all_variants=args.all_variants, kernels=args.kernels, loss_chunk=args.loss_chunk,
                 param_dtype=args.param_dtype)
    assumptions = {"hardware": {args.gpu: HARDWARE[args.gpu]}, "latency_s": LATENCY, **ASSUMPTIONS,
                   "kernels": args.kernels, "loss_chunk": args.loss_chunk, "param_dtype": args.param_dtype}
    if args.json:
        print(json.dumps([{**c.as_dict(), "assumptions": assumptions} for c in found], indent=2))
        return 0
    console = Console()
    if not found:
        console.print(f"no layout of {args.model} fits on {args.gpus} x {args.gpu} at this batch and sequence")
    table = Table(title=f"herd plan: {args.model} on {args.gpus:,} x {args.gpu}, {args.seq:,}-token sequences, "
                        f"{args.global_batch_tokens} tokens a step")
    for col in ("#", "tp", "pp", "dp", "micro-batches", "schedule", "act. ckpt", "GiB/GPU", "of which act.",
                "bubble", "comm GiB", "step s", "MFU", "TFLOP/s"):
        table.add_column(col, justify="left" if col in ("schedule",) else "right")
    for i, c in enumerate(found, 1):
        schedule = c.schedule + (f" (v={c.stages_per_rank})" if c.stages_per_rank > 1 else "")
        table.add_row(str(i), str(c.tp), str(c.pp), str(c.dp), f"{c.microbatches} x {c.microbatch}", schedule,
                      "yes" if c.activation_checkpointing else "no", f"{c.memory_gib:.1f}",
                      f"{c.memory['activations']:.1f}", f"{c.bubble:.1%}", f"{c.comm_gib:.1f}", f"{c.step_s:.2f}",
                      f"{c.mfu:.1%}", f"{c.tflops_per_gpu:.0f}")
    console.print(table)
    hw = HARDWARE[args.gpu]
    console.print(f"assumptions: {args.gpu} = {hw['peak_flops'] / 1e12:.0f} TFLOP/s bf16, {hw['memory_gib']:.0f} GiB, "
                  f"NVLink {hw['nvlink_bw'] / 1e9:.0f} GB/s and network {hw['network_bw'] / 1e9:.0f} GB/s per GPU one "
                  f"way, {hw['gpus_per_node']} per node; " + ", ".join(f"{k} {v}" for k, v in ASSUMPTIONS.items())
                  + f", ring latency {LATENCY['nvlink'] * 1e6:.0f} us (NVLink) / {LATENCY['network'] * 1e6:.0f} us "
                  f"(network) a hop, {args.kernels} kernels. See docs/distributed.md.",
                  soft_wrap=True, highlight=False, markup=False)
    return 0


def cmd_recipes(args) -> int:
    from llamaherd.config import builtin_recipe, builtin_recipes

    if args.name is not None:
        print(builtin_recipe(args.name).read_text(encoding="utf-8"), end="")
        return 0
    recipes = builtin_recipes()
    width = max((len(name) for name, _ in recipes), default=0)
    for name, description in recipes:
        print(f"{name:<{width}}  {description}".rstrip())
    return 0
