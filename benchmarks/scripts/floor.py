"""The I/O floor: read every byte of the inputs, write as many bytes as the output, fsync.

No merge can be faster than this on the same machine and page-cache state: it reads each input
shard once (``readinto`` a reused buffer), writes files of the sizes of the final model's shards
(a merge's output has exactly their size) from that buffer, and fsyncs them. Prints the phases.
Usage: ``python floor.py OUT --read DIR [--read DIR ...] --write-like DIR``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

BUFFER = 64 << 20


def shards(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--read", type=Path, action="append", required=True)
    parser.add_argument("--write-like", type=Path, required=True)
    args = parser.parse_args()

    buffer = bytearray(BUFFER)
    view = memoryview(buffer)
    start = time.perf_counter()
    read = 0
    for model in args.read:
        for shard in shards(model):
            with open(shard, "rb", buffering=0) as handle:
                while count := handle.readinto(view):
                    read += count
    after_read = time.perf_counter()

    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for shard in shards(args.write_like):
        target = args.out / shard.name
        remaining = shard.stat().st_size
        with open(target, "wb", buffering=0) as sink:
            while remaining:
                remaining -= sink.write(view[: min(remaining, BUFFER)])
        written.append(target)
    after_write = time.perf_counter()
    for target in written:
        fd = os.open(target, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    synced = time.perf_counter()
    size = sum(t.stat().st_size for t in written)
    print(
        f"phases: read {read / 1e9:.2f} GB in {after_read - start:.2f} s, "
        f"write {size / 1e9:.2f} GB in {after_write - after_read:.2f} s, "
        f"fsync {synced - after_write:.2f} s"
    )


if __name__ == "__main__":
    main()
