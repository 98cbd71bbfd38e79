"""``python -m experiments.descriptors [options]`` from a checkout is ``so3lib descriptors [options]``
(``so3lib descriptors --help`` lists them)."""

import sys

from so3lib.cli import main

if __name__ == "__main__":
    sys.exit(main(["descriptors", *sys.argv[1:]]))
