"""``python -m service`` runs the ``recalib`` command line (:mod:`service.cli`)."""

import sys

from .cli import main

__all__: list[str] = []

sys.exit(main())
