"""``python -m dicekern``: the command line of :mod:`dicekern.cli`."""

import sys

from dicekern.cli import main

if __name__ == "__main__":
    sys.exit(main())
