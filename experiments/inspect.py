"""``python -m experiments.inspect [options]`` from a checkout is ``so3lib inspect [options]``
(``so3lib inspect --help`` lists them)."""

import sys

from so3lib.cli import main

if __name__ == "__main__":
    sys.exit(main(["inspect", *sys.argv[1:]]))
