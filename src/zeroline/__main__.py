"""python -m zeroline: the same as the zeroline command."""

import sys

from .cli import main

sys.exit(main())
