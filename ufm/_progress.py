"""Progress bars where a person watches: tqdm on stderr, only when stderr is a terminal."""

from __future__ import annotations

import shutil
import sys
from typing import Any

# Bars never wider than the tables (a 100-column terminal); a terminal that reports no width (0,
# e.g. a pseudo-terminal without a size) gets this width too instead of an empty bar.
MAX_COLUMNS = 100


def progress_bar(iterable: Any = None, *, enabled: bool = True, terminal_only: bool = True, **kwargs: Any):
    """A tqdm bar on stderr; disabled when ``enabled`` is false, or (``terminal_only``, for bars on by
    default) when stderr is not a terminal (logs, pipes, CI), so redirected output stays clean."""
    from tqdm import tqdm

    columns = shutil.get_terminal_size((MAX_COLUMNS, 24)).columns or MAX_COLUMNS
    return tqdm(
        iterable, file=sys.stderr, ncols=min(columns, MAX_COLUMNS), disable=not enabled or (terminal_only and not sys.stderr.isatty()),
        **kwargs,
    )  # fmt: skip
