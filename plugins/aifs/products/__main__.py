"""``python -m aifs.products``: see aifs.products.cli."""

import sys

# pyproj before eccodes: two bundled libproj copies crash at interpreter exit the other way round
import pyproj  # noqa: F401,E402

from aifs.products.cli import main  # noqa: E402

if __name__ == "__main__" and getattr(__spec__, "name", None) == "aifs.products.__main__":
    sys.exit(main())
