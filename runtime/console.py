"""What CLIs draw on stderr: progress bars only on a terminal, so logs and pipes get no carriage returns."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def progress_bar(total: float | None = None, desc: str | None = None, unit: str = "it", enabled: bool = True,
                 **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr, drawn only when stderr is a terminal (and `enabled`); cleared when closed."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, disable=None if enabled else True,
                dynamic_ncols=True, **kwargs)
