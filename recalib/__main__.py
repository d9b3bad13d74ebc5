"""``python -m recalib`` runs the core command line (:mod:`recalib.cli`): recalibrate,
export and ``demo --offline``. ``serve`` and the service demo are the ``recalib`` command's
(``service.cli``), since the core never imports the service."""

import sys

from .cli import main

__all__: list[str] = []

sys.exit(main())
