"""The search's results file: JSONL, one line per finished candidate, appended as it finishes.

Every row carries a key: a hash of everything that decides a candidate's score apart from α and
λ (models, config, prompts, scorer, sampling settings; groups, guard and hold-out split when
used). A re-run with the same key skips the (α, λ) it already has, and the per-group candidates
(``groups: {group: [α, λ]}``) it already has; rows with another key stay in the file but are
never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

LOG = logging.getLogger("mergekit_expo")


def settings_key(settings: dict[str, Any]) -> str:
    """A short, stable hash of the settings (canonical JSON)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def files_identity(path: str | Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime) of a local model's files: cheap, and changes when the weights do."""
    path = Path(path)
    if not path.is_dir():
        return []  # a hub id: its revision is in the config already
    return sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in path.iterdir()
        if p.is_file() and p.suffix in {".json", ".safetensors", ".bin", ".model"}
    )


class ResultsFile:
    """Rows of one key, read at start and appended (flushed and synced) one at a time."""

    def __init__(self, path: str | Path, key: str):
        self.path, self.key = Path(path), key
        self.rows: dict[tuple, dict[str, Any]] = {}
        self.other_rows = 0
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
                candidate = candidate_id(row)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                # typically a line cut short when a run was killed mid-write: redo that candidate
                LOG.warning("%s, line %d: unreadable row skipped", self.path, number)
                continue
            if row.get("key") == self.key:
                self.rows[candidate] = row
            else:
                self.other_rows += 1

    def finished(self, alpha: float, lam: float) -> dict[str, Any] | None:
        return self.rows.get((float(alpha), float(lam)))

    def finished_groups(self, groups: dict[str, list[float]]) -> dict[str, Any] | None:
        """The row of a per-group candidate (``{group: [α, λ]}``), if it was finished."""
        return self.rows.get(candidate_id({"groups": groups}))

    def append(self, row: dict[str, Any]) -> None:
        row = {"key": self.key, **row}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n").encode()
        with open(self.path, "ab+") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size:  # a previous run killed mid-line must not swallow this row
                handle.seek(size - 1)
                if handle.read(1) != b"\n":
                    data = b"\n" + data
            handle.seek(0, os.SEEK_END)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        self.rows[candidate_id(row)] = json.loads(data)  # as re-read


def candidate_id(row: dict[str, Any]) -> tuple:
    """(α, λ) of a uniform candidate; the sorted (group, α, λ) of a per-group one."""
    groups = row.get("groups")
    if groups is not None:
        return tuple(
            (str(name), float(value[0]), float(value[1])) for name, value in sorted(groups.items())
        )
    return (float(row["alpha"]), float(row["lambda"]))
