"""`python -m experiments.ablation [options]` from a checkout: the same as `so3lib sweep [options]` (see `so3lib sweep --help`)."""

import sys

from so3lib.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
