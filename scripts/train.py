"""`python scripts/train.py --help`: the same command as `jaxgpt train`
(jaxgpt/commands/train.py)."""

from jaxgpt.commands.train import cli, main  # noqa: F401 (main: the tests call it in-process)

if __name__ == "__main__":
    cli()
