"""The search's results file: JSONL, one line per finished candidate, appended as it finishes.

Every row carries a key: a hash of everything that decides a candidate's score apart from α and
λ (models, config, prompts, scorer, sampling settings; groups, guard and hold-out split when
used). A re-run with the same key skips the (α, λ) it already has, and the per-group candidates
(``groups: {group: [α, λ]}``) it already has; rows with another key stay in the file but are
never reused. A row that cannot be written whole (a full disk) is cut off again, and the run
stops naming the file; the rows before it stay.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from mergekit_expo.search.outputs import OutputWriteError, make_folder

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
        make_folder(self.path.parent)
        data = (json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n").encode()
        try:
            if self._ends_mid_line():  # a previous run killed mid-line must not swallow this row
                data = b"\n" + data
            self._write(data)
        except OSError as error:
            raise OutputWriteError(self.path, error) from error
        self.rows[candidate_id(row)] = json.loads(data)  # as re-read

    def resume_note(self) -> str:
        """What a run that stops keeps, and how it goes on."""
        count = len(self.rows)
        return (f"{count} finished candidate{'s' if count != 1 else ''} kept in {self.path}; "
                "the same command resumes from there")

    def _ends_mid_line(self) -> bool:
        try:
            with open(self.path, "rb") as handle:
                if handle.seek(0, os.SEEK_END) == 0:
                    return False
                handle.seek(-1, os.SEEK_END)
                return handle.read(1) != b"\n"
        except FileNotFoundError:
            return False

    def _write(self, data: bytes) -> None:
        """Append ``data`` and sync it; if it cannot all be written, cut it off again."""
        handle = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.lseek(handle, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(handle, view):]
                os.fsync(handle)
            except OSError:
                os.ftruncate(handle, size)  # needs no space: the rows before stay whole
                raise
        finally:
            os.close(handle)


def candidate_id(row: dict[str, Any]) -> tuple:
    """(α, λ) of a uniform candidate; the sorted (group, α, λ) of a per-group one."""
    groups = row.get("groups")
    if groups is not None:
        return tuple(
            (str(name), float(value[0]), float(value[1])) for name, value in sorted(groups.items())
        )
    return (float(row["alpha"]), float(row["lambda"]))


def candidate_text(row: dict[str, Any]) -> str:
    """``α = 0.3, λ = 0``, or ``trial 4 (attention α 0.4, mlp α 0.25)``."""
    if row.get("groups") is not None:
        return f"trial {row.get('trial', '?')} ({describe_groups(row['groups'])})"
    return f"α = {row['alpha']:g}, λ = {row['lambda']:g}"


def describe_groups(groups: dict[str, list[float]]) -> str:
    """``attention α 0.4, mlp α 0.25`` (λ too when any group has one)."""
    with_lambda = any(v[1] for v in groups.values())
    return ", ".join(
        f"{name} α {v[0]:g}" + (f" λ {v[1]:g}" if with_lambda else "") for name, v in groups.items()
    )
