"""``python -m omni_moe``: the same as the ``omni-moe`` command."""

import sys

from .cli import main

sys.exit(main())
