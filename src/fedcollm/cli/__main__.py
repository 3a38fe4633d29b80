"""`python -m fedcollm.cli`: the `fedcollm` command."""

import sys

from fedcollm.cli import main

sys.exit(main())
