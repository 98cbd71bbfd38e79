"""`python -m experiments.md [options]` from a checkout: the same as `so3lib md [options]` (see `so3lib md --help`)."""

import sys

from so3lib.cli import main

if __name__ == "__main__":
    sys.exit(main(["md", *sys.argv[1:]]))
