"""``python -m kdjax``: the same as the ``kdjax`` command."""

import sys

from kdjax.commands.main import main

sys.exit(main())
