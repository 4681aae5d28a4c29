"""The search's own files in OUT_DIR: each write that fails stops the run with one line naming
the file, and leaves no partial file behind.

A full disk (or a folder that cannot be written) after hours of candidates must not end in a
traceback naming no path, a 0-byte plot or a ``best.yml`` that half exists. Rows already
appended to ``results.jsonl`` stay, so the same command resumes from them.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from mergekit_expo.errors import ExpoError
from mergekit_expo.output.staging import DISK_ERRORS, write_error

# what a failed write raises: no space, a file-size limit or quota, a read-only or forbidden place
WRITE_ERRORS = DISK_ERRORS | {errno.EACCES, errno.EPERM}


class OutputWriteError(ExpoError, RuntimeError):
    """A file or folder of the search could not be written (full disk, no permission)."""

    def __init__(self, path: str | Path, error: OSError):
        self.path = Path(path)
        reason = error.strerror or str(error)
        code = errno.errorcode.get(error.errno or 0)
        super().__init__(
            f"cannot write {self.path}: {reason}{f' ({code})' if code else ''}; the finished "
            "candidates are kept in results.jsonl: free disk space (or make the folder "
            "writable) and run the same command again to resume"
        )


def write_failure(error: BaseException) -> OSError | None:
    """The failed write behind ``error``, if it is one (``output.staging.write_error``, with a
    folder that cannot be written counted too)."""
    return write_error(error, WRITE_ERRORS)


def make_folder(path: Path) -> Path:
    """``mkdir -p``, failing with one line naming the folder."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputWriteError(path, error) from error
    return path


def write_file(path: Path, write: Callable[[Path], object]) -> Path:
    """Have ``write`` fill a temporary file beside ``path`` (same suffix), then move it into
    place. If that fails, neither the partial file nor an earlier file at ``path`` (another
    run's plot or winner) is left."""
    path = Path(path)
    temp = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException as error:
        temp.unlink(missing_ok=True)
        if path.is_file() or path.is_symlink():  # never a folder someone put there
            path.unlink()
        # only this file is touched here: any OSError is one of writing it
        failure = error if isinstance(error, OSError) else write_failure(error)
        if failure is None:
            raise
        raise OutputWriteError(path, failure) from error
    return path


def write_text(path: Path, text: str) -> Path:
    """``write_file`` for a text file (UTF-8)."""
    return write_file(path, lambda temp: temp.write_text(text, encoding="utf-8"))


def write_folder(path: Path, write: Callable[[Path], object]) -> Path:
    """Have ``write`` fill a temporary folder beside ``path``, then move it into place in the
    stead of an earlier one. If ``write`` fails (for any reason), neither is left: an earlier
    run's folder must not pass for this run's."""
    path = Path(path)
    temp = None
    try:
        temp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
        write(temp)
        _remove(path)
        os.replace(temp, path)
    except BaseException as error:
        _remove(path)
        failure = write_failure(error)
        if failure is None:
            raise
        raise OutputWriteError(path, failure) from error
    finally:
        if temp is not None:
            _remove(temp)
    return path


def _remove(path: Path) -> None:
    """Delete a file or folder if it is there (deleting needs no free space)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
