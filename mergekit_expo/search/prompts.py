"""Held-out prompts and preference pairs for the α/λ search, read from JSONL with line numbers.

A bad file is the most common way a long search fails late, so every record is checked when the
file is read, and the error names the file, the line and what the line should look like.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from mergekit_expo.errors import ExpoError

PROMPT_EXAMPLE = '{"prompt": "How do I merge two models?"}'
PAIR_EXAMPLE = '{"prompt": "Say hi.", "chosen": "Hello! How can I help?", "rejected": "no"}'


class JsonlError(ExpoError, ValueError):
    """A JSONL record that cannot be used; the message names the file and the line."""

    def __init__(self, path: Path, line: int, problem: str, example: str):
        self.path, self.line = path, line
        super().__init__(
            f"{path}, line {line}: {problem}. Each line must be a JSON object like {example}"
        )


@dataclass(frozen=True)
class Pair:
    """One preference pair: the prompt, the preferred and the dispreferred response."""

    prompt: str
    chosen: str
    rejected: str


def read_prompts(path: str | Path) -> list[str]:
    """The ``prompt`` of every non-blank line; other keys (ids, references) are ignored."""
    path = Path(path)
    prompts = [
        _string_field(record, "prompt", path, line, PROMPT_EXAMPLE)
        for line, record in _records(path, PROMPT_EXAMPLE)
    ]
    if not prompts:
        raise JsonlError(path, 1, "the file holds no prompts", PROMPT_EXAMPLE)
    return prompts


def read_pairs(path: str | Path) -> list[Pair]:
    """Every non-blank line as a :class:`Pair`; ``chosen`` and ``rejected`` must differ."""
    path = Path(path)
    pairs = []
    for line, record in _records(path, PAIR_EXAMPLE):
        prompt, chosen, rejected = (
            _string_field(record, key, path, line, PAIR_EXAMPLE, allow_empty=key == "prompt")
            for key in ("prompt", "chosen", "rejected")
        )
        if chosen == rejected:
            raise JsonlError(path, line, "`chosen` and `rejected` are identical", PAIR_EXAMPLE)
        pairs.append(Pair(prompt, chosen, rejected))
    if not pairs:
        raise JsonlError(path, 1, "the file holds no pairs", PAIR_EXAMPLE)
    return pairs


def file_digest(path: str | Path) -> str:
    """sha256 of the file's bytes: part of the key that decides whether results can be reused."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _records(path: Path, example: str):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected JSONL, one object a line)")
    with open(path, encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise JsonlError(path, number, f"not valid JSON ({error.msg})", example) from None
            if not isinstance(record, dict):
                kind = type(record).__name__
                raise JsonlError(path, number, f"a JSON {kind}, not an object", example)
            yield number, record


def _string_field(
    record: dict, key: str, path: Path, line: int, example: str, *, allow_empty: bool = False
) -> str:
    if key not in record:
        raise JsonlError(path, line, f"missing key {key!r} (keys: {sorted(record)})", example)
    value = record[key]
    if not isinstance(value, str):
        kind = type(value).__name__
        raise JsonlError(path, line, f"{key!r} must be a string, got {kind}", example)
    if not allow_empty and not value.strip():
        raise JsonlError(path, line, f"{key!r} is empty", example)
    return value
