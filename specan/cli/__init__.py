"""The `specan` command line: thin commands over the library, one error table.

Only typer, rich and the standard library are imported here at module level: `specan --help` and a
no-op re-ingest must not pay for torch, dask or zarr. Each command imports what it needs. One
module per command group; importing them registers their commands on `app`, in help order.
"""

from __future__ import annotations

import logging
import os
import sys

from specan.cli._app import FlagsFilter, _e, app, err, for_cli
from specan.errors import SpecanError

# isort: off
# Importing a command group registers its commands on `app`; this order is the order of --help.
from specan.cli import ingest, analyses, losses, figures, train, bench  # noqa: F401, E402
# isort: on

__all__ = ["app", "main"]


# -- entry point ------------------------------------------------------------------------------
def main() -> None:
    """Console-script entry: known errors become one line on stderr and an exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(FlagsFilter())
    try:
        app()
    except SpecanError as e:
        if os.environ.get("SPECAN_DEBUG"):
            raise
        err.print(f"[red]error:[/] {_e(for_cli(e))}", soft_wrap=True)
        err.print("[dim](set SPECAN_DEBUG=1 for the traceback)[/]")
        sys.exit(e.exit_code)
    except OSError as e:
        if os.environ.get("SPECAN_DEBUG"):
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        err.print(f"[red]error:[/] {_e(where)}{_e(e.strerror or e)}", soft_wrap=True)
        sys.exit(5)
