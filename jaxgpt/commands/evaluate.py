"""Score any GPT-2 weights on any text: `python scripts/evaluate.py --help`.

Every token of the text but the first is predicted once, in windows of --context-length
input tokens that start every --stride tokens (a smaller stride gives each token more
context); reports the mean loss (nats per token), perplexity and bits per byte.

Examples:
  python scripts/evaluate.py --weights gpt2 --data the-verdict --stride 512
  python scripts/evaluate.py --weights runs/default --data my_text.txt --json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, NoReturn

from jaxgpt.cli import Parser


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--weights",
        required=True,
        help="anything jaxgpt's load reads: gpt2..gpt2-xl (downloaded once into "
        "CACHE_DIR/openai), an OpenAI or Hugging Face folder, a .safetensors or the book's "
        ".pth file, a jaxgpt run folder or .npz",
    )
    p.add_argument(
        "--data",
        required=True,
        help='the text: what train.py --data takes ("pydoc", "the-verdict", a text file, a '
        "folder of .txt files, a .bin token file, a folder from scripts/prepare_data.py); "
        "all of it is scored",
    )
    p.add_argument(
        "--context-length", type=int, help="input tokens per window (default: the model's)"
    )
    p.add_argument(
        "--stride", type=int, help="tokens between window starts (default: the context length)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="windows per batch (default: 8)")
    p.add_argument("--n-heads", type=int, help="heads, for book files of a non-GPT-2 width")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    p.add_argument(
        "--cache-dir",
        help="cache of the-verdict and named OpenAI models (CACHE_DIR/openai) (default: "
        "$XDG_CACHE_HOME/jaxgpt, else ~/.cache/jaxgpt)",
    )
    p.add_argument("--data-url", help="base URL to download the-verdict.txt from")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return p


def _check_args(args: argparse.Namespace) -> None:
    """Flags that are wrong whatever the weights: before anything is read."""
    for name in ("context_length", "stride", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value} must be at least 1")
    if args.stride and args.context_length and args.stride > args.context_length:
        raise ValueError(
            f"--stride {args.stride} must be at most --context-length {args.context_length}: "
            "a longer stride would leave the tokens between windows unscored"
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load the weights and the text, score, print; returns the figures."""
    from jaxgpt import data, finetune, host, scoring
    from jaxgpt.ahead import Ahead

    _check_args(args)
    cache = host.cache_dir(args.cache_dir)
    fmt, config, params = finetune.read_weights(
        args.weights, flag="--weights", cache_dir=cache / "openai", n_heads=args.n_heads
    )
    if args.context_length and args.context_length > config.context_length:
        raise ValueError(
            f"--context-length {args.context_length} is longer than the model's context of "
            f"{config.context_length} tokens; pass at most {config.context_length}"
        )
    base_url = args.data_url or data.VERDICT_BASE_URL
    with Ahead() as ahead:  # the scoring program compiles while the text loads
        ctx = args.context_length or config.context_length
        ahead.submit("score", lambda: scoring.precompile(params, config, ctx, args.batch_size))
        tokens = data.load_tokens(args.data, cache_dir=cache, base_url=base_url)
        ahead.wait("score")
    bar = _Bar()
    try:
        result = scoring.score(
            params, config, tokens, context_length=args.context_length, stride=args.stride,
            batch_size=args.batch_size, on_batch=bar.update,
        )  # fmt: skip
    finally:
        bar.close()
    figures = {**result.to_dict(), "weights": args.weights, "format": fmt, "data": args.data}
    _print(figures, args.json)
    return figures


class _Bar:
    """A tqdm bar over windows, on stderr, shown for texts of more than one batch."""

    def __init__(self) -> None:
        self._bar: Any = None

    def update(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit="window", file=sys.stderr, disable=done >= total)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _print(f: dict[str, Any], as_json: bool) -> None:
    print(
        f"Weights: {f['weights']} ({f['format']}); text: {f['data']} ({f['bytes']:,} bytes)\n"
        f"Windows: {f['windows']:,} of {f['context_length']} tokens, stride {f['stride']}\n"
        f"Scored tokens: {f['tokens']:,}\n"
        f"Loss: {f['loss']:.6f} nats/token\n"
        f"Perplexity: {f['perplexity']:.4f}\n"
        f"Bits per byte: {f['bits_per_byte']:.6f}"
    )
    if as_json:
        print(json.dumps(f))


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 scored, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, UnicodeDecodeError, OSError) as e:
        if args.debug:
            raise
        sys.stderr.write(f"evaluate.py: error: {e}\n")
        return 2
    return 0


def cli(argv: list[str] | None = None) -> NoReturn:
    """`python scripts/evaluate.py`, `jaxgpt evaluate`: run `main` and exit with its status."""
    sys.exit(main(argv))
