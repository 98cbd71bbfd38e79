"""``python -m experiments.ablation [options]`` from a checkout is ``so3lib sweep [options]``
(``so3lib sweep --help`` lists them)."""

import sys

from so3lib.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
