"""`python scripts/generate.py --help`: the same command as `jaxgpt generate`
(jaxgpt/commands/generate.py)."""

from jaxgpt.commands.generate import cli, main  # noqa: F401 (main: the tests call it in-process)

if __name__ == "__main__":
    cli()
