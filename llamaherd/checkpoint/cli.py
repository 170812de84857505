"""`herd convert`, `herd info` and `herd average`: checkpoints between Meta's, Hugging Face's and our layout."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("convert", formatter_class=fmt, help="convert a checkpoint to another layout",
                       description="Convert a checkpoint (Meta, Hugging Face or herd layout, detected "
                                   "automatically) to another layout; the tokenizer comes along. The "
                                   "destination is written atomically.")
    p.add_argument("src", metavar="SRC", help="checkpoint directory to read")
    p.add_argument("dst", metavar="DST", help="checkpoint directory to write")
    p.add_argument("--to", required=True, choices=["hf", "meta", "herd"], default=argparse.SUPPRESS,
                   help="layout to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="dtype of the written weights; None keeps the source's")
    p.add_argument("--shards", type=int, default=1, help="model-parallel files (meta layout only)")
    p.add_argument("--max-shard-size", type=_size, default="5GB", metavar="SIZE",
                   help="largest weight file (hf layout), e.g. 5GB, 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it already holds a checkpoint")
    p.set_defaults(func=_convert)

    p = sub.add_parser("info", formatter_class=fmt, help="describe a checkpoint",
                       description="Print a checkpoint's layout, model hyper-parameters, parameter count, "
                                   "dtype, tokenizer vocabulary and quantisation, without reading its weights.")
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_info)

    p = sub.add_parser("average", formatter_class=fmt, help="average several checkpoints of one model shape",
                       description="Write the element-wise mean of several checkpoints (any layouts, one model "
                                   "shape), as Meta averaged the models of several runs of each post-training "
                                   "stage; herd layout, the first checkpoint's dtype and tokenizer.")
    p.add_argument("ckpts", nargs="+", metavar="CKPT", help="checkpoint directories (two or more)")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per checkpoint (default: equal)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it already holds a checkpoint")
    p.set_defaults(func=_average)


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * mult)
    if t.isdigit():
        return int(t)
    raise argparse.ArgumentTypeError(f"size {text!r} is not a number of bytes or like 5GB, 500MB")


def _convert(args) -> int:
    from llamaherd.checkpoint import convert

    out = convert(args.src, args.dst, to=args.to, dtype=args.dtype, shards=args.shards,
                  max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    print(f"wrote {out} ({args.to} layout)")
    return 0


def _average(args) -> int:
    from llamaherd.checkpoint.average import average

    out = average(args.ckpts, args.out, weights=args.weights, overwrite=args.overwrite)
    print(f"wrote {out}: the mean of {len(args.ckpts)} checkpoints")
    return 0


def _info(args) -> int:
    from llamaherd.checkpoint import info

    d = info(args.ckpt)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"checkpoint  {d['path']}")
    print(f"layout      {d['layout']}")
    print(f"parameters  {d['parameters']:,}")
    print(f"dtype       {d['dtype']}")
    if d.get("quantization"):
        from llamaherd.model.quant import QuantConfig

        print(f"quantized   {QuantConfig(**d['quantization']).describe()}")
    print(f"tokenizer   {d['tokenizer_vocab'] or 'none'}" + (" tokens" if d["tokenizer_vocab"] else ""))
    print("model args")
    for k, v in d["model_args"].items():
        print(f"  {k:<24}{v}")
    return 0
