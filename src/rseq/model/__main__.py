"""``python -m rseq.model ...``: the same as ``python -m rseq model ...``."""

import sys

from .cli import main

sys.exit(main())
