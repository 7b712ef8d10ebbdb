"""`python -m runtime.serve`."""

from runtime.errors import leave
from runtime.serve.cli import main

leave(main())
