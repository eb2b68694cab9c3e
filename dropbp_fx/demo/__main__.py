"""``python -m dropbp_fx.demo``: see :mod:`dropbp_fx.demo`."""

import logging

from dropbp_fx.demo.run import main

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
main()
