"""Run one command as a separate process tree and measure wall time, CPU time and memory.

Memory is sampled from ``/proc/<pid>/status`` of the process and all of its descendants every
``interval`` seconds and summed over the tree:

- ``VmRSS``: resident set, including file pages mapped from the input checkpoints. Those pages
  belong to the page cache and are reclaimable, so peak RSS overstates what a user must have;
- ``RssAnon``: resident private (anonymous) memory, the part that cannot be dropped or re-read:
  this is the "peak private memory" of the benchmark;
- ``VmHWM`` of the root process: the kernel's own exact peak RSS, as a check on the sampling.

CPU time (user + system, the whole tree) comes from ``wait4``'s resource usage. The machine's
busy CPU time over the same interval (``/proc/stat``) minus the tree's gives the load that other
processes put on the machine during the run (``background_cores``, in cores).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


@dataclass
class Measurement:
    command: list[str]
    returncode: int
    wall_s: float
    cpu_s: float
    peak_rss_bytes: int
    peak_private_bytes: int
    root_hwm_bytes: int
    samples: int
    background_cores: float
    log: str
    timeline: list[tuple[float, int, int]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of the whole machine so far, in clock ticks."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def machine_busy(seconds: float = 1.0) -> float:
    """Cores kept busy by all processes, averaged over ``seconds``."""
    before = busy_jiffies()
    time.sleep(seconds)
    after = busy_jiffies()
    return (after[0] - before[0]) / os.sysconf("SC_CLK_TCK") / seconds


def wait_until_quiet(limit: float, timeout: float, window: float = 2.0) -> tuple[float, float]:
    """Wait until other processes keep fewer than ``limit`` cores busy; (waited s, busy cores)."""
    start = time.perf_counter()
    busy = machine_busy(window)
    while busy > limit and time.perf_counter() - start < timeout:
        busy = machine_busy(window)
    return time.perf_counter() - start, busy


def read_status(pid: int) -> dict[str, int]:
    """The memory fields of ``/proc/<pid>/status`` in bytes ({} if the process is gone)."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            for line in handle:
                key, _, rest = line.partition(b":")
                name = key.decode()
                if name in FIELDS:
                    values[name] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return values


def _parent(pid: int) -> int | None:
    """The parent's pid from ``/proc/<pid>/stat`` (None once the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    return int(data[data.rindex(b")") + 2:].split()[1])  # "pid (comm) state ppid ..."


class TreeSampler(threading.Thread):
    """Samples RSS and RssAnon summed over a process and its descendants until stopped."""

    def __init__(self, pid: int, interval: float = 0.02, keep_timeline: bool = True):
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.keep_timeline = keep_timeline
        self.peak_rss = 0
        self.peak_private = 0
        self.root_hwm = 0
        self.samples = 0
        self.timeline: list[tuple[float, int, int]] = []
        self._halt = threading.Event()
        self._start = time.perf_counter()
        self._parents: dict[int, int | None] = {}  # every process on the machine -> its parent
        self._tree: list[int] = []

    def _pids(self) -> list[int]:
        """The process and its descendants. Every process's parent is read once, when it first
        appears in ``/proc``, and again on each sample while it is in the tree (so a process
        whose parent exits leaves it): reading every process's ``stat`` on every sample, as
        ``psutil``'s ``children()`` does, costs ~2 ms of CPU, a tenth of a core at 20 ms."""
        alive = {int(name) for name in os.listdir("/proc") if name.isdigit()}
        parents = self._parents
        for pid in parents.keys() - alive:
            del parents[pid]
        for pid in (alive - parents.keys()).union(alive.intersection(self._tree)):
            parents[pid] = _parent(pid)
        if self.pid not in alive:
            self._tree = []
            return []
        children: dict[int | None, list[int]] = {}
        for pid, parent in parents.items():
            children.setdefault(parent, []).append(pid)
        tree, index = [self.pid], 0
        while index < len(tree):
            tree.extend(pid for pid in children.get(tree[index], ()) if pid not in tree)
            index += 1
        self._tree = tree
        return tree

    def sample(self) -> None:
        rss = private = 0
        for pid in self._pids():
            status = read_status(pid)
            rss += status.get("VmRSS", 0)
            private += status.get("RssAnon", 0)
            if pid == self.pid:
                self.root_hwm = max(self.root_hwm, status.get("VmHWM", 0))
        if rss == 0:
            return
        self.samples += 1
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_private = max(self.peak_private, private)
        if self.keep_timeline:
            self.timeline.append((round(time.perf_counter() - self._start, 3), rss, private))

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def run_measured(
    command: list[str],
    *,
    log: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    interval: float = 0.02,
    timeout: float | None = None,
) -> Measurement:
    """Run ``command``, wait for it, and return what it cost. Output goes to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as sink:
        busy_before = busy_jiffies()
        start = time.perf_counter()
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=cwd
        )
        sampler = TreeSampler(process.pid, interval)
        sampler.start()
        try:
            # wait4 on the root reaps it and reports the CPU time of the whole waited-for tree
            _, status, usage = _wait4(process.pid, timeout, start)
        finally:
            wall = time.perf_counter() - start
            sampler.stop()
        process.returncode = os.waitstatus_to_exitcode(status)
    busy_after = busy_jiffies()
    cpu = usage.ru_utime + usage.ru_stime
    machine = (busy_after[0] - busy_before[0]) / os.sysconf("SC_CLK_TCK")
    return Measurement(
        command=[str(c) for c in command],
        returncode=process.returncode,
        wall_s=wall,
        cpu_s=cpu,
        peak_rss_bytes=sampler.peak_rss,
        peak_private_bytes=sampler.peak_private,
        root_hwm_bytes=max(sampler.root_hwm, usage.ru_maxrss * 1024),
        samples=sampler.samples,
        background_cores=max(0.0, machine - cpu) / wall if wall else 0.0,
        log=str(log),
        timeline=sampler.timeline,
    )


def _wait4(pid: int, timeout: float | None, start: float):
    while True:
        waited, status, usage = os.wait4(pid, os.WNOHANG if timeout else 0)
        if waited == pid:
            return waited, status, usage
        if timeout and time.perf_counter() - start > timeout:
            os.kill(pid, 9)
            return os.wait4(pid, 0)
        time.sleep(0.005)


def fsync_tree(path: Path) -> float:
    """fsync every file under ``path`` (and the directories); return the seconds it took."""
    start = time.perf_counter()
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - start
