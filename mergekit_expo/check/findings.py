"""A finding: one thing wrong (or worth knowing) about a merge, found before it runs.

The merge raises every error of a list of findings as one :class:`ExpoConfigError`;
``mergekit-expo check`` prints the same list. Both build it with the same functions
(``check.merge_start``), so what one refuses the other refuses, with the same message.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from mergekit_expo.errors import ExpoError

LOG = logging.getLogger("mergekit_expo")


class ExpoConfigError(ExpoError, ValueError):
    """The config would not merge what its author wrote; nothing was read or written."""


@dataclass(frozen=True)
class Finding:
    level: str  # "error" (refused), "warning" (merged, but probably not what was meant), "info"
    message: str


def errors(messages: Iterable[str]) -> list[Finding]:
    return [Finding("error", message) for message in messages]


def raise_errors(findings: Iterable[Finding], *, context: str = "") -> None:
    """Log warnings and notes; raise one error listing every refusal."""
    refused = []
    for finding in findings:
        if finding.level == "error":
            refused.append(finding.message)
        elif finding.level == "warning":
            LOG.warning("%s", finding.message)
        else:
            LOG.info("%s", finding.message)
    if refused:
        head = f"{context}: " if context else ""
        raise ExpoConfigError(head + "\n".join(refused))
