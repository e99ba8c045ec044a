"""`python scripts/evaluate.py --help`: the same command as `jaxgpt evaluate`
(jaxgpt/commands/evaluate.py)."""

from jaxgpt.commands.evaluate import cli, main  # noqa: F401 (main: the tests call it in-process)

if __name__ == "__main__":
    cli()
