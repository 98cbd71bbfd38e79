"""`python -m experiments.spice [options]` from a checkout: the same as `so3lib spice [options]` (see `so3lib spice --help`)."""

import sys

from so3lib.cli import main

if __name__ == "__main__":
    sys.exit(main(["spice", *sys.argv[1:]]))
