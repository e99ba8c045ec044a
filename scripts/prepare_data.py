"""`python scripts/prepare_data.py --help`: the same command as `jaxgpt prepare`
(jaxgpt/commands/prepare.py)."""

from jaxgpt.commands.prepare import cli, main  # noqa: F401 (main: the tests call it in-process)

if __name__ == "__main__":
    cli()
