"""``python -m minift COMMAND`` and ``accelerate launch -m minift COMMAND``: the ``minift`` command."""

import sys

from minift.cli import main

sys.exit(main())
