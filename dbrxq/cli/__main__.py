"""``python -m dbrxq.cli``: the same as the ``dbrxq`` command."""

from dbrxq.cli.app import main

main()
