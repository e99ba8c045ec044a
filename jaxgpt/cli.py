"""Command-line plumbing: an argparse parser whose errors are one line, and the `jaxgpt`
command (`jaxgpt train | generate | evaluate | convert | prepare ...`, also
`python -m jaxgpt`), which runs the same `jaxgpt.commands` modules as `scripts/*.py`."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

# subcommand -> (module under jaxgpt.commands, the script it equals, one line of help)
COMMANDS = {
    "train": ("train", "scripts/train.py", "train a GPT on a corpus (the book's chapter 5)"),
    "generate": ("generate", "scripts/generate.py", "generate text from any weights"),
    "evaluate": ("evaluate", "scripts/evaluate.py", "score any weights on a text (perplexity)"),
    "convert": ("convert", "scripts/convert.py", "convert weights: OpenAI, HF, book, jaxgpt"),
    "prepare": ("prepare", "scripts/prepare_data.py", "tokenise a corpus into uint16 shards"),
}


class Parser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` that reports a bad command line in one line on stderr and
    exits 2, without argparse's usage dump (DESIGN.md: every CLI exits 2 with one line)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = [f"  {name:<{width}}  {text} ({script})" for name, (_, script, text) in COMMANDS.items()]
    return (
        "usage: jaxgpt COMMAND [ARGS...]   (or python -m jaxgpt COMMAND ...)\n\n"
        "commands:\n" + "\n".join(rows) + "\n\n`jaxgpt COMMAND --help` lists its flags.\n"
    )


def main(argv: list[str] | None = None) -> NoReturn:
    """Dispatch `jaxgpt COMMAND ARGS...` to `jaxgpt.commands.COMMAND.cli(ARGS)`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(usage()) if argv else sys.stderr.write(usage())
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.stderr.write(
            f"jaxgpt: error: unknown command {name!r}; choose one of {', '.join(COMMANDS)}\n"
        )
        sys.exit(2)
    module = importlib.import_module(f"jaxgpt.commands.{COMMANDS[name][0]}")
    sys.argv[0] = f"jaxgpt {name}"  # argparse's prog: "jaxgpt train: error: ..."
    module.cli(rest)
