"""``python -m memctl`` is the ``memctl`` command."""

import sys

from .cli import main

sys.exit(main())
