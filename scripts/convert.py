"""`python scripts/convert.py --help`: the same command as `jaxgpt convert`
(jaxgpt/commands/convert.py)."""

from jaxgpt.commands.convert import cli, main  # noqa: F401 (main: the tests call it in-process)

if __name__ == "__main__":
    cli()
