"""Fetch the real offline assets (models, data sets) into the cache: ``python scripts/fetch_assets.py [--only ...]``.

A thin command line over :mod:`tsd_common.assets` (``python -m tsd_common.assets`` does the same); ``--help`` lists
the assets and options.
"""

import sys

from tsd_common.assets import main

if __name__ == "__main__":
    sys.exit(main())
