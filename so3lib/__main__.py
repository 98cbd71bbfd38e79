"""``python -m so3lib`` is the ``so3lib`` command."""

import sys

from so3lib.cli import main

sys.exit(main())
