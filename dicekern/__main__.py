"""``python -m dicekern``: the command line of :mod:`dicekern.apps.cli`."""

import sys

from dicekern.apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
