"""``python -m pyro_gbnn.predict``: see :mod:`pyro_gbnn.predict.cli`."""

import sys

from pyro_gbnn.predict.cli import main

sys.exit(main())
