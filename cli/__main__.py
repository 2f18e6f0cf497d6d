"""python -m exlcore.cli: the `exl` command without its script (subprocess tests, odd installs)."""

import sys

from exlcore.cli import main

sys.exit(main())
