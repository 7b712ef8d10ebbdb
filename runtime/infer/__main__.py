"""`python -m runtime.infer`."""

from runtime.infer.cli import main

main()
