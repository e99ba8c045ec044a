"""Tokenise text corpora of any size into uint16 token shards for `train.py --data DIR`.

    python scripts/prepare_data.py books/ extra.txt --out data/books --val-fraction 0.05

Each file is one document (<|endoftext|> between documents); folders give their .txt files.
Streams with bounded memory over a process pool; the last --val-fraction of the input goes
to validation shards. `DIR/dataset.json` is written last: a folder without it is unfinished.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from jaxgpt.cli import Parser
from jaxgpt.prepare import CHUNK_CHARS, SHARD_TOKENS, input_files, prepare


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="text files or folders of .txt files")
    p.add_argument("--out", required=True, help="new (or empty) folder for the shards")
    p.add_argument("--val-fraction", type=float, default=0.1, help="validation share (0.1)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument(
        "--shard-tokens", type=int, default=SHARD_TOKENS, help=f"tokens a shard ({SHARD_TOKENS})"
    )
    p.add_argument(
        "--chunk-chars", type=int, default=CHUNK_CHARS, help=f"text per task ({CHUNK_CHARS})"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm.auto import tqdm

    total = sum(p.stat().st_size for p in input_files(args.inputs))
    with tqdm(total=total, unit="B", unit_scale=True, disable=args.quiet or None) as bar:
        index = prepare(
            args.inputs, args.out, val_fraction=args.val_fraction, workers=args.workers,
            shard_tokens=args.shard_tokens, chunk_chars=args.chunk_chars, progress=bar.update,
        )  # fmt: skip
    shards = len(index["train"]) + len(index["val"])
    print(
        f"{index['train_tokens']:,} train + {index['val_tokens']:,} val tokens in {shards} "
        f"shards to {args.out}: {index['tokens_per_sec']:,.0f} tokens/s "
        f"({index['workers']} workers, {index['seconds']:.1f} s)"
    )
    return 0


def cli(argv: list[str] | None = None) -> NoReturn:
    """`python scripts/prepare_data.py`, `jaxgpt prepare`: run `main` and exit with its status."""
    try:
        sys.exit(main(argv))
    except (ValueError, FileNotFoundError) as err:
        print(f"prepare_data.py: error: {err}", file=sys.stderr)
        sys.exit(2)
