"""``python -m jaxseq.cli``: the ``jaxseq`` command."""

import sys

from jaxseq.cli import main

sys.exit(main())
