"""Convert GPT-2 weights between OpenAI, Hugging Face, the book's PyTorch files and jaxgpt.

Examples:
  python scripts/convert.py --from openai gpt2 --to hf out/gpt2-hf --check
  python scripts/convert.py --from book model.pth --model gpt2 --to jaxgpt out/params.npz
  python scripts/convert.py --from jaxgpt runs/default --to book out/model.safetensors
  python scripts/convert.py --from hf out/gpt2-hf --check
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from jaxgpt.cli import Parser
from jaxgpt.config import GPTConfig
from jaxgpt.interop import FORMATS, OPENAI_BASE_URL, export_book, export_hf, fetch_openai, load
from jaxgpt.interop.download import OPENAI_SIZES

TARGETS = ("jaxgpt", "hf", "book")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--from",
        dest="src",
        nargs=2,
        metavar=("FORMAT", "PATH"),
        required=True,
        help=f"source format {list(FORMATS)} and path (or gpt2..gpt2-xl for openai)",
    )
    p.add_argument(
        "--to",
        dest="dst",
        nargs=2,
        metavar=("FORMAT", "OUT"),
        help=f"target format {list(TARGETS)} and output path",
    )
    p.add_argument("--model", help="preset whose n_heads to use when the file lacks it (gpt2...)")
    p.add_argument("--n-heads", type=int, help="n_heads when the file lacks it and no preset fits")
    p.add_argument(
        "--check",
        action="store_true",
        help="compare logits against the source's PyTorch reference model",
    )
    p.add_argument("--tolerance", type=float, default=1e-4, help="--check limit (default 1e-4)")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    p.add_argument(
        "--cache-dir",
        default=os.environ.get("JAXGPT_CACHE"),
        help="cache for named OpenAI models (env JAXGPT_CACHE; default "
        "$XDG_CACHE_HOME/jaxgpt/openai, else ~/.cache/jaxgpt/openai)",
    )
    p.add_argument(
        "--base-url",
        default=os.environ.get("JAXGPT_OPENAI_URL", OPENAI_BASE_URL),
        help="where named OpenAI models are downloaded from",
    )
    p.add_argument("--no-verify", action="store_true", help="skip TF checkpoint checksums")
    args = p.parse_args(argv)
    if args.src[0] not in FORMATS:
        p.error(f"--from format {args.src[0]!r} is not one of {list(FORMATS)}")
    if args.dst is None and not args.check:
        p.error("nothing to do: give --to FORMAT OUT and/or --check")
    if args.dst is not None and args.dst[0] not in TARGETS:
        p.error(f"--to format {args.dst[0]!r} is not one of {list(TARGETS)}")
    return args


def write(fmt: str, out: Path, config: GPTConfig, params: Any, force: bool) -> None:
    if fmt == "hf":
        export_hf(config, params, out, overwrite=force)
    elif fmt == "book":
        export_book(config, params, out, overwrite=force)
    else:
        from jaxgpt import checkpoint

        if out.exists() and not force:
            raise ValueError(f"{out} already exists; choose another output or pass --force")
        checkpoint.save_params(out, config, params)


def check(fmt: str, path: str, config: GPTConfig, params: Any, tolerance: float) -> bool:
    from jaxgpt.interop.reference import max_logit_diff, reference_model

    model = reference_model(fmt, path, config, params)
    diff = max_logit_diff(model, config, params)
    ok = diff <= tolerance
    name = type(model).__name__
    print(
        f"max |logit diff| jaxgpt vs {name}: {diff:.3e} (tolerance {tolerance:.0e}): "
        f"{'OK' if ok else 'FAIL'}"
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fmt, path = args.src
    try:
        if fmt == "openai" and path in OPENAI_SIZES and not Path(path).exists():
            path = str(fetch_openai(path, args.cache_dir, base_url=args.base_url))
        given = {"n_heads": args.n_heads} if args.n_heads else args.model
        config, params = load(
            path,
            given,
            format=fmt,
            cache_dir=args.cache_dir,
            base_url=args.base_url,
            verify=not args.no_verify,
        )
        print(f"loaded {fmt} {path}: {config}")
        if args.dst is not None:
            write(args.dst[0], Path(args.dst[1]), config, params, args.force)
            print(f"wrote {args.dst[0]} {args.dst[1]}")
        if args.check and not check(fmt, path, config, params, args.tolerance):
            return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"convert.py: error: {e}", file=sys.stderr)
        return 2
    return 0


def cli(argv: list[str] | None = None) -> NoReturn:
    """`python scripts/convert.py`, `jaxgpt convert`: run `main` and exit with its status."""
    sys.exit(main(argv))
