"""python -m rseq: see rseq._cli."""
import sys

from ._cli import main

sys.exit(main())
