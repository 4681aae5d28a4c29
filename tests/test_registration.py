"""`expo` is found by the unmodified mergekit tools after install, without start-up cost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


def python(code: str, *, executable: str = sys.executable, **env) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_start_up_imports_neither_torch_nor_mergekit():
    out = python(
        "import sys; print('torch' in sys.modules, 'mergekit' in sys.modules,"
        " 'mergekit_expo._startup' in sys.modules)"
    )
    assert out.stdout.split() == ["False", "False", "True"]


def test_start_up_hook_imports_nothing_but_its_own_modules(tmp_path):
    """No importlib.abc, typing, pathlib...: each would cost every Python process milliseconds."""
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks.startup import baseline_venv
    finally:
        sys.path.remove(str(REPO))
    show = "import sys; print(' '.join(sorted(sys.modules)))"
    bare = set(python(show, executable=baseline_venv(tmp_path / "bare")).stdout.split())
    plugged = set(python(show).stdout.split())
    assert "mergekit_expo._startup" not in bare
    assert plugged - bare == {"mergekit_expo", "mergekit_expo._startup", "mergekit_expo.merge"}


FIRST_IMPORTS = [
    "mergekit.merge",
    "mergekit.merge_methods",
    "mergekit.card",
    "mergekit_expo.merge.method",
    "mergekit_expo.merge.roles",
    "mergekit.scripts.multimerge",
]
REGISTERED_ONCE = (
    "from mergekit.merge_methods import get, registered_methods\n"
    "assert get('expo').spec.name == 'expo'\n"
    "assert [m.spec.name for m in registered_methods()].count('expo') == 1\n"
    "import mergekit.merge, mergekit.card\n"
    "assert getattr(mergekit.merge.generate_card, '__mergekit_expo__', False)\n"
)
CHECKS = {
    **{f"first:{module}": f"import {module}\n" + REGISTERED_ONCE for module in FIRST_IMPORTS},
    "auto-then-explicit": (
        "import mergekit_expo\n"
        "from mergekit.merge_methods import registered_methods, get\n"
        "first = get('expo'); mergekit_expo.register()\n"
        "assert get('expo') is first\n"
    ),
}
OPT_OUT_CHECKS = {
    "opt-out-then-explicit": (
        "from mergekit.merge_methods import registered_methods\n"
        "assert 'expo' not in [m.spec.name for m in registered_methods()]\n"
        "import mergekit.merge\n"
        "import mergekit_expo\n"
        "mergekit_expo.register(); mergekit_expo.register()\n"
        "assert [m.spec.name for m in registered_methods()].count('expo') == 1\n"
        "assert getattr(mergekit.merge.generate_card, '__mergekit_expo__', False)\n"
    ),
}
# One interpreter (started as any, with the .pth) imports mergekit's heavy dependencies once —
# torch, transformers, peft: ~8 s — but no mergekit module, then forks a fresh child per check,
# so each check still sees mergekit imported for the first time, in its own order.
DRIVER = """
import json, os, sys, traceback
import torch, transformers, peft, pydantic
assert not [m for m in sys.modules if m.split('.')[0] in ('mergekit', 'mergekit_expo.merge')]
results = {}
for name, code in json.loads(sys.argv[1]).items():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            exec(compile(code, name, 'exec'), {'__name__': '__check__'})
            message = 'ok'
        except BaseException:
            message = traceback.format_exc()
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as handle:
        results[name] = handle.read()
    os.waitpid(pid, 0)
print('RESULTS ' + json.dumps(results))
"""


def run_checks(checks: dict[str, str], **env) -> dict[str, str]:
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(checks)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


@pytest.fixture(scope="module")
def check_results() -> dict[str, str]:
    return run_checks(CHECKS)


@pytest.mark.parametrize("first_import", FIRST_IMPORTS)
def test_registered_whatever_is_imported_first(first_import, check_results):
    assert check_results[f"first:{first_import}"] == "ok"


@pytest.fixture(scope="module")
def opt_out_results() -> dict[str, str]:
    # the same check as with the hook, which must fail here: the driver does report failures
    without_hook = {"no-hook:mergekit.merge": "import mergekit.merge\n" + REGISTERED_ONCE}
    return run_checks({**OPT_OUT_CHECKS, **without_hook}, MERGEKIT_EXPO_DISABLE="1")


def test_opt_out_and_explicit_idempotent_registration(opt_out_results):
    assert opt_out_results["opt-out-then-explicit"] == "ok"


def test_a_failing_check_is_reported(opt_out_results):
    assert "Traceback" in opt_out_results["no-hook:mergekit.merge"]


def test_auto_registration_then_explicit_register_is_a_no_op(check_results):
    assert check_results["auto-then-explicit"] == "ok"


def fresh_venv(root: Path) -> Path:
    """A new venv that sees this environment's packages (mergekit, torch) but not its .pth files."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = Path(
        subprocess.run(
            [
                str(root / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "zz_outer_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root / "bin" / "python"


@pytest.mark.parametrize("editable", [False, True], ids=["pip-install", "pip-install-e"])
def test_fresh_install_registers_for_the_unmodified_tools(tmp_path, zoo, editable):
    venv_python = fresh_venv(tmp_path / "venv")
    install = [str(venv_python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    install += ["-e", str(REPO)] if editable else [str(REPO)]
    result = subprocess.run(install, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    where = python(
        "import sys, mergekit_expo; print(mergekit_expo.__file__);"
        " print('mergekit' in sys.modules)",
        executable=str(venv_python),
    ).stdout.split()
    expected_root = REPO if editable else tmp_path / "venv"
    assert Path(where[0]).resolve().is_relative_to(expected_root.resolve())
    assert where[1] == "False"

    config = tmp_path / "expo.yml"
    config.write_text(
        f"merge_method: expo\nbase_model: {zoo.sft}\nmodels:\n  - model: {zoo.dpo}\n"
        "parameters:\n  alpha: 0.3\n"
    )
    merge = subprocess.run(
        [str(venv_python), "-m", "mergekit.scripts.run_yaml", str(config), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert merge.returncode == 0, merge.stderr[-3000:]
    assert "Extrapolation roles" in (tmp_path / "out" / "README.md").read_text()
