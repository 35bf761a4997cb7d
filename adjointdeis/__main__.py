"""``python -m adjointdeis``: the command line of :mod:`adjointdeis.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
