"""``python -m lightning_aquila.cli``: the ``lightning-aquila`` command."""

import sys

from lightning_aquila.cli import main

sys.exit(main())
