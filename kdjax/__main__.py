"""``python -m kdjax``: the same as the ``kdjax`` command."""

import sys

from kdjax.cli import main

sys.exit(main())
