"""``python -m wsbroker`` is the ``wsbroker`` command."""

import sys

from wsbroker.cli import main

sys.exit(main())
