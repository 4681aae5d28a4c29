"""Every benchmark script answers ``--help`` with its usage and runs nothing (in this process,
through runpy, so that the suite pays no interpreter start per script)."""

from __future__ import annotations

import contextlib
import io
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    path for path in [*ROOT.glob("benchmarks/*.py"), *ROOT.glob("benchmarks/scripts/*.py")]
    if 'if __name__ == "__main__":' in path.read_text(encoding="utf-8")
    and path.name != "__main__.py"
)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_benchmark_script_help(script, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.syspath_prepend(str(script.parent))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
        raise SystemExit(0)  # a script that printed its help and returned
    assert done.value.code in (0, None)
    text = printed.getvalue()
    assert "usage" in text.lower() and len(text) > 40, text


def test_the_benchmark_command_lists_its_subcommands():
    from click.testing import CliRunner

    sys.path.insert(0, str(ROOT))
    from benchmarks.__main__ import main

    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "kernel" in result.output and "check-cost" in result.output
