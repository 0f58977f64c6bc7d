"""Entry point of ``python -m bench``: hands the command line to :func:`bench.cli.main`."""

import sys

from .cli import main

sys.exit(main())
