"""`python -m experiments.inspect [options]` from a checkout: the same as `so3lib inspect [options]` (see `so3lib inspect --help`)."""

import sys

from so3lib.cli import main

if __name__ == "__main__":
    sys.exit(main(["inspect", *sys.argv[1:]]))
