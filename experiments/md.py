"""``python -m experiments.md [options]`` from a checkout is ``so3lib md [options]``
(``so3lib md --help`` lists them)."""

import sys

from so3lib.cli import main

if __name__ == "__main__":
    sys.exit(main(["md", *sys.argv[1:]]))
