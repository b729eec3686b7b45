"""``python -m tokenguard``: the same command line as ``tokenguard`` (see :mod:`tokenguard.cli`)."""

import sys

from tokenguard.cli import main

if __name__ == "__main__":
    sys.exit(main())
