"""``python -m experiments.train [options]`` from a checkout is ``so3lib train [options]``
(``so3lib train --help`` lists them)."""

import sys

from so3lib.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
