"""``python -m stable_cascade``: the ``stable-cascade`` command line (``inspect --released`` lists the
released models)."""

from __future__ import annotations

import sys

from stable_cascade.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
