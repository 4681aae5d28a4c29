"""The exact kernel compiled from C (``native.c``): one pass per element, not ~10 torch passes.

The torch kernel (``formula`` + ``rounding``) is exact too, but every element goes through
several whole-slice operations (float64 copies, a midpoint window, a re-rounding), which makes
it 2–3× slower than a plain float64 cast. The C kernel does the same arithmetic per element in
cache-sized blocks and settles the rare undecided elements with exact expansions in place.

It is built on first use with the system's C compiler (``cc``, or ``$CC``) into the user's cache
folder (``$XDG_CACHE_HOME`` or ``~/.cache``, ``mergekit-expo/``), keyed by the source's hash, and
loaded with ctypes (which releases the GIL during the call, so the formula's worker threads run
it in parallel). Where no compiler is found, the build fails, the tensors are not on the CPU,
or an input's precision and the coefficients do not fit the error-free products (float64
inputs, α or λ with very many decimals), the torch kernel runs instead: the result is the same,
bit for bit. ``MERGEKIT_EXPO_KERNEL=torch`` always uses the torch kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-ffp-contract=off", "-fno-trapping-math",
         "-fno-fast-math"]
# input and output formats the C code reads and writes, and their precision with the hidden bit
FORMATS = {torch.bfloat16: (0, 8), torch.float16: (1, 11), torch.float32: (2, 24)}
MAX_TERMS = 64
ENV = "MERGEKIT_EXPO_KERNEL"


class _Plan(ctypes.Structure):
    _fields_ = [
        ("terms", ctypes.c_int),
        ("inputs", ctypes.POINTER(ctypes.c_void_p)),
        ("types", ctypes.POINTER(ctypes.c_int)),
        ("coefficients", ctypes.POINTER(ctypes.c_double)),
        ("denominator", ctypes.c_double),
        ("inverse", ctypes.c_double),
        ("precision", ctypes.c_int),
        ("emin", ctypes.c_int),
        ("emax", ctypes.c_int),
        ("largest", ctypes.c_double),
    ]


# Process-wide on purpose: the library is built and loaded once per process.
_library: ctypes.CDLL | None = None
_tried = False
_lock = threading.Lock()


def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; ``None`` where it cannot be built."""
    global _library, _tried
    if os.environ.get(ENV) == "torch":
        return None
    with _lock:
        if not _tried:
            _tried = True
            try:
                _library = _load()
            except (OSError, subprocess.SubprocessError) as error:
                log.info("the compiled expo kernel is not available (%s); using the torch one",
                         error)
        return _library


def _cache_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mergekit-expo"


def _load() -> ctypes.CDLL:
    source = SOURCE.read_bytes()
    machine = " ".join([*FLAGS, sys.platform, platform.machine()])
    key = hashlib.sha256(source + machine.encode()).hexdigest()
    folder = _cache_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir()) / f"mergekit-expo-{os.getuid()}"
        folder.mkdir(mode=0o700, exist_ok=True)
        if folder.stat().st_uid != os.getuid():  # not ours: never load code from it
            raise OSError(f"{folder} belongs to another user") from None
    target = folder / f"kernel-{key[:16]}.so"
    if not target.exists():
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not compiler:
            raise OSError("no C compiler found")
        with tempfile.TemporaryDirectory(dir=folder) as build:
            built = Path(build) / target.name
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"],
                           check=True, capture_output=True, timeout=120)
            os.replace(built, target)  # atomic: another process may be building it too
    lib = ctypes.CDLL(str(target))
    lib.expo_exact.argtypes = [ctypes.POINTER(_Plan), ctypes.c_int64, ctypes.c_void_p,
                               ctypes.c_int]
    lib.expo_exact.restype = ctypes.c_int
    return lib


class Native:
    """One call's setup for the C kernel, or ``usable`` False where it does not apply."""

    def __init__(self, coefficients: list[int], denominator: int, inputs: list[torch.Tensor],
                 out_dtype: torch.dtype):
        self.usable = False
        if out_dtype not in FORMATS or len(inputs) > MAX_TERMS:
            return
        if any(t.device.type != "cpu" or t.dtype not in FORMATS for t in inputs):
            return
        precision = FORMATS[out_dtype][1]
        # cᵢθᵢ exact in double; L·μ exact (μ, a midpoint, has precision + 1 bits)
        for tensor, coefficient in zip(inputs, coefficients, strict=True):
            if abs(coefficient).bit_length() + FORMATS[tensor.dtype][1] > 53:
                return
        if denominator.bit_length() + precision + 1 > 53:
            return
        self.lib = library()
        if self.lib is None:
            return
        info = torch.finfo(out_dtype)
        self.terms = len(inputs)
        self.types = (ctypes.c_int * self.terms)(*(FORMATS[t.dtype][0] for t in inputs))
        self.coefficients = (ctypes.c_double * self.terms)(*map(float, coefficients))
        self.denominator = float(denominator)
        self.precision = precision
        self.emin = math.frexp(info.smallest_normal)[1] - 1
        self.emax = math.frexp(info.max)[1] - 1
        self.largest = float(info.max)
        self.out_type = FORMATS[out_dtype][0]
        self.usable = True

    def run(self, inputs: list[torch.Tensor], target: torch.Tensor, begin: int, end: int) -> bool:
        """Write ``target[begin:end]`` from the flat ``inputs``; whether all of it is finite."""
        size = target.element_size()
        pointers = (ctypes.c_void_p * self.terms)(
            *(t.data_ptr() + begin * t.element_size() for t in inputs))
        plan = _Plan(self.terms, pointers, self.types, self.coefficients, self.denominator,
                     1.0 / self.denominator, self.precision, self.emin, self.emax,
                     self.largest)
        done = self.lib.expo_exact(ctypes.byref(plan), end - begin,
                                   target.data_ptr() + begin * size, self.out_type)
        if done < 0:
            raise MemoryError("the expo kernel could not allocate its block buffers")
        return bool(done)
