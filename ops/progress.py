"""Progress bars for long commands (`reindex`, `purge`): tqdm on stderr when it is a terminal,
nothing otherwise (the command's summary line is all a log or a pipe gets)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from collections.abc import Iterator

from tqdm import tqdm


@contextmanager
def bar(total: int | None, desc: str, unit: str = "it") -> Iterator[tqdm]:  # type: ignore[type-arg]
    """A bar counting to `total` (None: a counter). Set `.n` or call `.update(k)`."""
    progress = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                    dynamic_ncols=True, disable=not sys.stderr.isatty())
    try:
        yield progress
    finally:
        progress.close()
