"""`python -m runtime.infer` (`deit-infer`): classify image files and folders; see `runtime.infer.cli`.

    cli      the command: arguments, the output file (.partial, --resume, the lock), the run
    output   record formats (text, JSON, CSV) and reading back what an interrupted run wrote
"""

from runtime.infer.cli import main

__all__ = ["main"]
