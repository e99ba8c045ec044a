"""The command lines, one module each (`main(argv) -> status`, `cli(argv)` exits): reached as
`jaxgpt COMMAND`, `python -m jaxgpt COMMAND` or `python scripts/COMMAND.py`."""
