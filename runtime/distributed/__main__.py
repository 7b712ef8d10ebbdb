"""`python -m runtime.distributed`; the stages live in importable modules, which Ray ships to workers by name."""

import sys

from runtime.distributed.cli import main

sys.exit(main())
