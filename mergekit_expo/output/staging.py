"""The output folder holds the complete new artefact or no new file: stage, verify, move into place.

mergekit writes into the output folder in place: an interrupted merge leaves complete-looking
weights beside a truncated ``config.json``, and a re-run with another shard layout leaves the old
``model.safetensors`` or index beside the new files. An expo merge (the ``run_merge`` patch) and
``mergekit-expo lora`` write into a staging folder inside the output folder instead,

    OUT/.expo-staging-PID-XXXXXX/OUT/

(same name, so mergekit's model card names the model as before; inside OUT, so on OUT's own file
system even when OUT is a mount point or its parent is read-only: every move is a rename on one
file system, and a folder that cannot be written fails before anything is computed). The staged
artefact is checked (every JSON parses, every safetensors file is as long as its header says, the
index names only shards that are there, tokenizer files are not empty, the tokenizer copy did not
hit a disk error) and moved into place file by file:

1. the files of the earlier artefact of the same kind in OUT (its config first, so that it stops
   loading at once) go aside into ``OUT/.expo-old-PID-XXXXXX/``;
2. the new files move in, the config (``config.json``, ``adapter_config.json``) last;
3. the set-aside files are deleted.

A file in OUT that no loader reads (``.git``, notes) stays. SIGINT and SIGTERM are held during
these renames (milliseconds); one that arrives then moves everything back, so OUT is as it was,
and is delivered afterwards. Any failure before step 3 leaves OUT as it was (the staging folder
is deleted, and OUT itself if the merge created it); SIGKILL leaves the hidden staging folder,
which loads as nothing and which the next write into the same OUT deletes (when the process that
made it is gone).

Nothing is fsynced, as mergekit fsyncs nothing: these guarantees are about the process failing,
and what it wrote stays in the kernel's page cache when it dies. Flushing the staged model
before the move would also cover an OS crash or a power cut, but would make every merge wait
for its whole output to reach the disk.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import signal
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

from mergekit_expo.errors import ExpoError
from mergekit_expo.output.folder import Kind, OutputFolderError, path_problem, replaced

LOG = logging.getLogger("mergekit_expo")

STAGING = ".expo-staging-"
ASIDE = ".expo-old-"
CONFIG = {"model": "config.json", "adapter": "adapter_config.json"}
# Tokenizer files mergekit copies or writes; an empty one is a failed copy.
TOKENIZER_FILES = frozenset(
    {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
     "merges.txt", "vocab.json", "vocab.txt", "chat_template.jinja"}
)
# A tokenizer copy that failed with one of these did not run out of luck but out of disk.
DISK_ERRORS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO, errno.EROFS})


class IncompleteOutputError(ExpoError, RuntimeError):
    """The staged model is not complete; nothing was moved into the output folder."""


class Terminated(BaseException):
    """SIGTERM arrived during a staged merge: unwind, delete the staging folder, then exit."""

    def __init__(self, signum: int):
        super().__init__(f"received signal {signum}")
        self.signum = signum


def is_model_file(name: str) -> bool:
    return replaced(name, "model")


def destination(path: str) -> str:
    """The output folder a staged write moves into (``OUT`` for ``OUT/.expo-staging-…/OUT``);
    any other path as it is. Messages name this one."""
    staged_in = Path(path).parent
    if staged_in.name.startswith(STAGING) and staged_in.parent.name == Path(path).name:
        return str(staged_in.parent)
    return path


@contextlib.contextmanager
def staged(out_path: str | os.PathLike, kind: Kind = "model") -> Iterator[str]:
    """Yield the staging folder to write a ``kind`` into; on success move it into ``out_path``."""
    out = Path(os.path.realpath(out_path))
    problem = path_problem(out)
    if problem:
        raise OutputFolderError(problem)
    created = not out.exists()
    tag = f"{os.getpid()}-{secrets.token_hex(3)}"
    root = out / f"{STAGING}{tag}"
    try:  # a folder that cannot be written fails here, before anything is computed
        out.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out)
        root.mkdir()
    except OSError as error:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise OutputFolderError(
            f"cannot write into {out}: {error.strerror}; choose a folder you can write to"
        ) from error
    stage = root / out.name
    watcher = _TokenizerCopyWatcher()
    try:
        with _sigterm_raises(), watcher:
            yield str(stage)
            watcher.raise_disk_error()
            verify(stage, kind)
            with _signals_held() as received:
                commit(stage, out, out / f"{ASIDE}{tag}", kind, cancelled=lambda: bool(received))
    except Terminated as terminated:
        _clean(root, out, created)
        LOG.error("interrupted by signal %d: %s left as it was", terminated.signum, out)
        signal.signal(terminated.signum, signal.SIG_DFL)
        os.kill(os.getpid(), terminated.signum)  # die of it, as without us
        raise
    except ExpoError:  # says what went wrong already
        _clean(root, out, created)
        raise
    except Exception as error:
        _clean(root, out, created)
        why = disk_error(error)
        if why is None:
            raise
        raise IncompleteOutputError(
            f"writing {out} failed: {why}; {out} is as it was: free space (or raise the file "
            "size limit) and run again"
        ) from error
    except BaseException:
        _clean(root, out, created)
        raise
    _clean(root, out, created=False)


def _clean(root: Path, out: Path, created: bool) -> None:
    """Delete the staging folder, and the output folder if this write created it (and it is
    empty again)."""
    shutil.rmtree(root, ignore_errors=True)
    if created:
        with contextlib.suppress(OSError):
            out.rmdir()


def write_error(error: BaseException, errors=DISK_ERRORS) -> OSError | None:
    """The failed write behind ``error`` (an errno of ``errors``: a full disk, a file size limit,
    a read-only file system), else None: an ``OSError``, its cause, or a safetensors error,
    which carries the OS error only in its text (``… I/O error: File too large (os error 27)``)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in errors:
            return error
        found = re.search(r"\(os error (\d+)\)", str(error))
        if found and int(found.group(1)) in errors:
            return OSError(int(found.group(1)), os.strerror(int(found.group(1))))
        error = error.__cause__
    return None


def disk_error(error: BaseException) -> str | None:
    """What the failed write behind ``error`` said, naming its file, else None."""
    failure = write_error(error)
    if failure is None:
        return None
    return failure.strerror + (f" ({failure.filename})" if failure.filename else "")


def remove_leftovers(out: Path) -> None:
    """Delete staging and set-aside folders of earlier writes into ``out`` whose process is gone."""
    if not out.is_dir():
        return
    for marker in (STAGING, ASIDE):
        for path in out.glob(f"{marker}*"):
            pid = path.name[len(marker):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                LOG.info("removing %s, left by an interrupted write", path)
                shutil.rmtree(path, ignore_errors=True)


class Cancelled(KeyboardInterrupt):
    """A signal arrived while files moved: everything was moved back."""


def commit(stage: Path, out: Path, aside: Path, kind: Kind = "model",
           cancelled=lambda: False) -> None:
    """Move the earlier artefact in ``out`` aside, the staged one in, then delete the earlier one.

    An error on the way, or ``cancelled()`` before the earlier files are deleted, moves back what
    was moved, so that ``out`` is as it was.
    """
    config = CONFIG[kind]
    new = sorted(os.listdir(stage), key=lambda name: name == config)  # the config last
    moved: list[tuple[Path, Path]] = []
    try:
        old = [name for name in os.listdir(out) if replaced(name, kind) or name in new]
        old.sort(key=lambda name: name != config)  # the config first
        if old:
            aside.mkdir()
        for name in old:
            os.rename(out / name, aside / name)
            moved.append((out / name, aside / name))
        for name in new:
            os.rename(stage / name, out / name)
            moved.append((stage / name, out / name))
        if cancelled():
            raise Cancelled()
    except BaseException:
        for source, target in reversed(moved):
            with contextlib.suppress(OSError):
                os.rename(target, source)
        with contextlib.suppress(OSError):
            aside.rmdir()  # only if everything went back
        raise
    shutil.rmtree(aside, ignore_errors=True)


def verify(folder: Path, kind: Kind = "model") -> None:
    """Refuse a staged artefact that a loader would read wrongly or not at all."""
    names = set(os.listdir(folder)) if folder.is_dir() else set()
    if CONFIG[kind] not in names:
        raise IncompleteOutputError(
            f"no {CONFIG[kind]} was written into {folder} (its writer moved or removed its output)"
        )
    for name in sorted(names):
        path = folder / name
        if name.endswith(".json"):
            try:
                content = json.loads(path.read_bytes())
            except ValueError as error:
                raise IncompleteOutputError(f"{name} is not valid JSON: {error}") from None
            if name.endswith(".index.json"):
                for shard in sorted(set(content.get("weight_map", {}).values())):
                    if shard not in names:
                        raise IncompleteOutputError(f"{name} names {shard}, which is missing")
        elif name.endswith(".safetensors"):
            _check_safetensors(path)
        if name in TOKENIZER_FILES and path.stat().st_size == 0:
            raise IncompleteOutputError(f"tokenizer file {name} is empty")


def _check_safetensors(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        header_size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if header_size < 0 or 8 + header_size > size:
            raise IncompleteOutputError(f"{path.name} is truncated (no complete header)")
        try:
            header = json.loads(handle.read(header_size))
        except ValueError:
            raise IncompleteOutputError(f"{path.name} has a corrupt header") from None
    end = max(
        (entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
        default=0,
    )
    if 8 + header_size + end != size:
        raise IncompleteOutputError(
            f"{path.name} is {size} bytes, its header says {8 + header_size + end}"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into an exception (only where nobody else handles it), so cleanup runs."""
    if not _in_main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated(signum)

    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is raise_terminated:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _signals_held() -> Iterator[list[int]]:
    """Hold SIGINT and SIGTERM while files move (yielding those received), then act on them as
    before."""
    received: list[int] = []
    if not _in_main_thread():
        yield received
        return
    previous = {
        signum: signal.signal(signum, lambda signum, frame: received.append(signum))
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in received:
            os.kill(os.getpid(), signum)


class _TokenizerCopyWatcher(logging.Handler):
    """mergekit logs a failed tokenizer copy and goes on; a disk error there fails the merge."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.error: OSError | None = None

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, OSError) and error.errno in DISK_ERRORS and self.error is None:
            self.error = error

    def __enter__(self):
        logging.getLogger("mergekit.merge").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("mergekit.merge").removeHandler(self)

    def raise_disk_error(self) -> None:
        if self.error is not None:
            raise IncompleteOutputError(
                f"copying the tokenizer failed: {self.error}; the output would lack it"
            ) from self.error
