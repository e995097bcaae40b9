"""The ``dbrxq`` command group: every subcommand registered on it, and :func:`main`, the console script.

Every error a user can cause (DbrxqError) is printed as one line on stderr with exit status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys

import click

from dbrxq.cli.commands import cache, convert, export, run, serve
from dbrxq.cli.eval import compare_command, eval_command
from dbrxq.cli.options import CONTEXT
from dbrxq.cli.quantize import quantize_command
from dbrxq.core.errors import DbrxqError
from dbrxq.core.files import is_write_error, write_error


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="dbrxq", prog_name="dbrxq", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Run and quantize Databricks' DBRX on a CPU box or one GPU."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")



for command in (run, serve, cache, export, convert):
    cli.add_command(command)
cli.add_command(quantize_command, "quantize")
cli.add_command(eval_command, "eval")
cli.add_command(compare_command, "compare")

def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except DbrxqError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:  # a full disk, a read-only file system, a file where a folder should be
        if not is_write_error(e):
            raise
        click.echo(f"error: {write_error(e, e.filename or '.')}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("\ninterrupted", err=True)
        sys.exit(130)
