"""`python -m experiments.train [options]` from a checkout: the same as `so3lib train [options]` (see `so3lib train --help`)."""

import sys

from so3lib.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
