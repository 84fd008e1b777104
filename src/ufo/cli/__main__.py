"""`python -m ufo.cli` (as torchrun runs it): the `ufo` command line."""

import sys

from ufo.cli import app

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
