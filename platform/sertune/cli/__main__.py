"""``python -m sertune.cli``: the same as the ``sertune`` command."""

import sys

from . import main

sys.exit(main())
