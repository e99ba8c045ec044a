"""Command-line plumbing shared by `scripts/`: an argparse parser whose errors are one line."""

from __future__ import annotations

import argparse
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` that reports a bad command line in one line on stderr and
    exits 2, without argparse's usage dump (DESIGN.md: every CLI exits 2 with one line)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")
