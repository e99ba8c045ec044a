"""`python -m jaxgpt COMMAND ...`: the `jaxgpt` command."""

from jaxgpt.cli import main

main()
