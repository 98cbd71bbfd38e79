"""``python -m experiments.spice [options]`` from a checkout is ``so3lib spice [options]``
(``so3lib spice --help`` lists them)."""

import sys

from so3lib.cli import main

if __name__ == "__main__":
    sys.exit(main(["spice", *sys.argv[1:]]))
