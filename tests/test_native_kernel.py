"""The compiled exact kernel: built here, cached, replaced by the torch kernel without a compiler.

Its exactness is tested with every other kernel test (conftest.each_kernel runs them with both);
these tests cover how it is built and when it is used.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mergekit_expo.merge import native
from mergekit_expo.merge.formula import extrapolate

PROBE = """
import sys, torch
from mergekit_expo.merge import native
from mergekit_expo.merge.formula import extrapolate
gen = torch.Generator().manual_seed(7)
theta0 = (torch.randn(300_000, generator=gen) * 0.02).bfloat16()
theta1 = (theta0.float() + torch.randn(300_000, generator=gen) * 1e-3).bfloat16()
theta0[:1000] = theta1[:1000].double().mul(2.0 ** -40).bfloat16()  # θ₀ ≪ θ₁
out = extrapolate(theta0, theta1, alpha=0.3)
torch.save(out, sys.argv[1])
print("compiled" if native.library() is not None else "torch")
"""


def _probe(tmp_path, name: str, **env: str) -> tuple[str, torch.Tensor]:
    target = tmp_path / f"{name}.pt"
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(target)], capture_output=True, text=True,
        env={**os.environ, **env}, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip(), torch.load(target)


def test_the_compiled_kernel_is_built_and_used_here():
    if native.library() is None:
        pytest.skip("no C compiler here")
    inputs = [torch.zeros(4, dtype=torch.bfloat16)] * 2
    assert native.Native([13, -3], 10, inputs, torch.bfloat16).usable
    # float64 inputs (exactly summed intermediates) are the torch kernel's
    assert not native.Native([13, -3], 10, [t.double() for t in inputs], torch.bfloat16).usable


def test_built_once_cached_and_without_a_compiler_the_same_bits(tmp_path):
    """A first process builds the kernel into its cache folder; a second loads that build (its
    compiler cannot run); a third, with no compiler and an empty cache, runs the torch kernel:
    all three write the same bits."""
    cache = tmp_path / "cache"
    kind, compiled = _probe(tmp_path, "first", XDG_CACHE_HOME=str(cache))
    if kind != "compiled":
        assert native.library() is None
        pytest.skip("no C compiler here")
    (built,) = (cache / "mergekit-expo").glob("kernel-*.so")
    stamp = built.stat().st_mtime_ns
    kind, cached = _probe(tmp_path, "second", XDG_CACHE_HOME=str(cache), CC="/bin/false")
    assert kind == "compiled"
    assert built.stat().st_mtime_ns == stamp  # loaded, not built again
    kind, fallback = _probe(tmp_path, "third", CC=str(tmp_path / "no-such-cc"),
                            XDG_CACHE_HOME=str(tmp_path / "empty"))
    assert kind == "torch"
    for other in (cached, fallback):
        assert torch.equal(compiled.view(torch.int16), other.view(torch.int16))


def test_the_environment_variable_selects_the_torch_kernel(monkeypatch):
    monkeypatch.setenv(native.ENV, "torch")
    assert native.library() is None
    theta = torch.randn(1000).bfloat16()
    assert torch.equal(extrapolate(theta, theta, alpha=0.5), theta)
