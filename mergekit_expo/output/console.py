"""Our log lines on lines of their own while a tqdm progress bar is drawn on stderr.

mergekit's bars (``Executing graph``) redraw with ``\\r`` on stderr; a record written straight to
the same stream lands after the bar's last frame (``…|INFO:mergekit_expo:expo roles: …``).
tqdm's own answer is ``tqdm.write``, which clears the bars, writes the line and redraws them
(what ``tqdm.contrib.logging`` does). ``logging_redirect_tqdm`` swaps the root logger's
handlers, though, and a caller's logging is theirs: :func:`lines_beside_bars` touches only the
``mergekit_expo`` logger, and only while a merge or a search runs, and only where our records
would otherwise go to nothing but one plain ``StreamHandler`` on ``sys.stderr`` (what
``logging.basicConfig`` makes, as ``mergekit-yaml`` and ``mergekit-expo search`` do). There it
hands each record to that handler's level, filters and format and writes the result with
``tqdm.write``, so the text is the same; any other set-up (a file, a second handler, handlers
on our logger) is left exactly as it is.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

LOGGER = "mergekit_expo"


class _BarAwareHandler(logging.Handler):
    """Formats with the handler the record would have reached, writes through ``tqdm.write``."""

    def __init__(self, target: logging.StreamHandler):
        super().__init__(logging.NOTSET)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < self.target.level or not self.target.filter(record):
            return
        try:
            from tqdm import tqdm

            tqdm.write(self.target.format(record), file=self.target.stream)
        except Exception:  # noqa: BLE001 - logging must never break the merge
            self.handleError(record)


def _plain_stderr_handler(logger: logging.Logger) -> logging.StreamHandler | None:
    """The one handler our records reach, when it is a plain StreamHandler on stderr."""
    if logger.handlers or not logger.propagate:
        return None
    reached: list[logging.Handler] = []
    parent = logger.parent
    while parent is not None:
        reached.extend(parent.handlers)
        if not parent.propagate:
            break
        parent = parent.parent
    if len(reached) != 1:
        return None
    handler = reached[0]
    if type(handler) is not logging.StreamHandler or handler.stream is not sys.stderr:
        return None
    return handler


@contextlib.contextmanager
def lines_beside_bars() -> Iterator[None]:
    """While inside, our records start on a line of their own even while a bar is drawn."""
    logger = logging.getLogger(LOGGER)
    target = _plain_stderr_handler(logger)
    if target is None:
        yield
        return
    handler = _BarAwareHandler(target)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
