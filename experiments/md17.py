"""``python -m experiments.md17 [options]`` from a checkout is ``so3lib md17 [options]``
(``so3lib md17 --help`` lists them)."""

import sys

from so3lib.cli import main

if __name__ == "__main__":
    sys.exit(main(["md17", *sys.argv[1:]]))
