"""docs/commands.md, the reference of every command, is the commands' own ``--help``.

    python tests/test_command_reference.py   # rewrites docs/commands.md from the code
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "commands.md"
COMMANDS = ("check", "search", "lora", "demo")

INTRO = """# Command reference

Each section is the command's `--help`, as this version prints it (`tests/test_command_reference.py`
keeps this page equal to it). The merge itself is mergekit's own command with `merge_method: expo`
in the config: `mergekit-yaml CONFIG OUT [-v]` and `mergekit-multi` take all of mergekit's options
(`mergekit-yaml --help`); the parameters `expo` reads are in [method.md](method.md#parameters).
For a walk through them in the order a user runs them, see the [guide](guide.md).
"""


def render() -> str:
    from click.testing import CliRunner

    from mergekit_expo.cli import main

    parts = [INTRO]
    for command in COMMANDS:
        result = CliRunner().invoke(main, [command, "--help"], terminal_width=100,
                                    prog_name="mergekit-expo")
        assert result.exit_code == 0, result.output
        parts += [f"## mergekit-expo {command}", "", "```text", result.output.rstrip(), "```", ""]
    return "\n".join(parts)


def test_the_reference_is_the_commands_help():
    assert PAGE.read_text(encoding="utf-8") == render(), (
        "docs/commands.md differs from the commands' --help: "
        "run python tests/test_command_reference.py"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    PAGE.write_text(render(), encoding="utf-8")
    print(f"wrote {PAGE}")
