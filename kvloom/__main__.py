"""`python -m kvloom ...` is the `kvloom` command."""

import sys

from kvloom.tools.cli import main

sys.exit(main())
