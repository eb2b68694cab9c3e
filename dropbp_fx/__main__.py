"""``python -m dropbp_fx explain MODEL``: see :mod:`dropbp_fx.cli`."""

import sys

from dropbp_fx.cli import main

sys.exit(main())
