"""`python -m runtime.serve`."""

from runtime.serve.cli import main

main()
