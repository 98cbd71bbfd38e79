"""`python -m experiments.descriptors [options]` from a checkout: the same as `so3lib descriptors [options]` (see `so3lib descriptors --help`)."""

import sys

from so3lib.cli import main

if __name__ == "__main__":
    sys.exit(main(["descriptors", *sys.argv[1:]]))
