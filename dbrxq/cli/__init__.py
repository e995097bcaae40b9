"""The command line (``dbrxq ...``, ``python -m dbrxq.cli``): a thin click layer over the Python API."""

from dbrxq.cli.app import cli, main

__all__ = ["cli", "main"]
