"""Run mergekit's own test suite against the installed mergekit, with the plugin installed.

    python tests/mergekit_suite.py [--workdir DIR] [--compare] [-- PYTEST ARGS]

mergekit's tests ship in its source distribution, not in the wheel. This fetches the sdist of
the installed mergekit version with pip (``pip download --no-binary :all: --no-deps``), copies
its ``tests/`` into DIR/suite (without the sdist's ``mergekit/`` source, so that the installed
mergekit is the one under test, as the plugin's hooks see it), adds ``tests/common.py`` (which
the sdist lacks; the helpers below are written here from how the tests call them) and runs
pytest there. ``--compare`` runs the suite a second time with ``MERGEKIT_EXPO_DISABLE=1`` and
lists every test whose outcome differs: the plugin must not turn a pass into a failure.
Not part of the CI suite: it takes minutes (see docs/failures.md).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

COMMON = '''"""Helpers mergekit's tests import; the sdist lacks this file.

Written by mergekit-expo's tests/mergekit_suite.py from how the tests call them.
"""

import os
import tempfile
from typing import Callable, Optional

from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from mergekit.architecture import arch_info_for_config
from mergekit.config import MergeConfiguration
from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex
from mergekit.merge import MergeOptions, run_merge


def run_and_check_merge(
    config: MergeConfiguration,
    check_nan: bool = True,
    check_tensors: bool = True,
    validate: Optional[Callable[[str], None]] = None,
    index_json_name: Optional[str] = None,
    auto_arch: bool = False,
):
    """Merge into a temporary folder; check it holds a config, tensors, no NaN, every weight."""
    with tempfile.TemporaryDirectory() as tmpdir:
        run_merge(config, out_path=tmpdir, options=MergeOptions())
        assert os.path.exists(os.path.join(tmpdir, "config.json")), "no config.json"
        if index_json_name:
            assert os.path.exists(os.path.join(tmpdir, index_json_name)), "no index file"
        index = ShardedTensorIndex.from_disk(tmpdir)
        assert index.tensor_paths, "the merge wrote no tensors"
        if check_nan:
            loader = LazyTensorLoader(index, lazy_unpickle=False)
            for name in sorted(index.tensor_paths):
                assert not loader.get_tensor(name).isnan().any(), f"NaN in {name}"
        if check_tensors and not auto_arch:
            out_config = AutoConfig.from_pretrained(tmpdir)
            arch = arch_info_for_config(out_config)
            for weight in arch.all_weights(out_config) if arch else []:
                names = [weight.name, *(weight.aliases or ()), *(weight.tied_names or ())]
                if not weight.optional:
                    assert any(n in index.tensor_paths for n in names), f"missing {weight.name}"
        if validate:
            validate(tmpdir)


def _save(model, path) -> str:
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def make_picollama(path, vocab_size: int = 64) -> str:
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                         num_attention_heads=16, num_hidden_layers=2)
    return _save(LlamaForCausalLM(config), path)


def make_picogranite(path, vocab_size: int = 64) -> str:
    config = GraniteConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                           num_attention_heads=16, num_hidden_layers=2)
    return _save(GraniteForCausalLM(config), path)


def make_gpt2size(path) -> str:
    """GPT-2's layout (12 layers), small widths."""
    config = GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=12, n_head=4)
    return _save(GPT2LMHeadModel(config), path)


def make_picoLlaVa(path) -> str:
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                       num_attention_heads=16, num_hidden_layers=2)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4,
                              num_hidden_layers=2, image_size=32, patch_size=16)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=63)
    return _save(LlavaForConditionalGeneration(config), path)
'''


def fetch_suite(workdir: Path) -> Path:
    """DIR/suite/tests: mergekit's tests from its sdist, plus common.py."""
    wanted = version("mergekit")
    sdist = workdir / f"mergekit-{wanted}.tar.gz"
    if not sdist.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:",
             "--no-deps", f"mergekit=={wanted}", "-d", str(workdir)],
            check=True,
        )
    suite = workdir / "suite"
    shutil.rmtree(suite, ignore_errors=True)
    prefix = f"mergekit-{wanted}/tests/"
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(prefix) and m.isfile()]
        for member in members:
            member.name = "tests/" + member.name[len(prefix):]
        archive.extractall(suite, members=members, filter="data")
    (suite / "tests" / "__init__.py").touch()
    (suite / "tests" / "common.py").write_text(COMMON)
    return suite


def run_suite(suite: Path, pytest_args: list[str], *, plugin: bool) -> tuple[dict, float, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if plugin:
        env.pop("MERGEKIT_EXPO_DISABLE", None)
    else:
        env["MERGEKIT_EXPO_DISABLE"] = "1"
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "tests",
         *pytest_args],
        cwd=suite, env=env, capture_output=True, text=True,
    )
    wall = time.perf_counter() - start
    outcomes = {}
    for line in result.stdout.splitlines():
        match = re.match(r"(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)", line)
        if match:
            outcomes[match.group(2)] = match.group(1)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr
    return outcomes, wall, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the sdist and the suite go (default: a temporary folder)")
    parser.add_argument("--compare", action="store_true",
                        help="also run without the plugin and list differing outcomes")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mergekit-suite-") as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        suite = fetch_suite(workdir)
        print(f"mergekit {version('mergekit')} test suite, from its sdist, in {suite}")
        with_plugin, wall, summary = run_suite(suite, args.pytest_args, plugin=True)
        print(f"with mergekit-expo:    {summary}  (wall {wall:.0f} s)")
        failed = sorted(t for t, o in with_plugin.items() if o in ("FAILED", "ERROR"))
        if not args.compare:
            for test in failed:
                print(f"  {with_plugin[test]} {test}")
            return 1 if failed else 0
        without, wall, summary = run_suite(suite, args.pytest_args, plugin=False)
        print(f"without mergekit-expo: {summary}  (wall {wall:.0f} s)")
        differ = sorted(set(with_plugin) | set(without))
        differ = [t for t in differ if with_plugin.get(t) != without.get(t)]
        for test in differ:
            print(f"  {test}: with {with_plugin.get(t := test, 'absent')}, "
                  f"without {without.get(t, 'absent')}")
        broken = [t for t in differ if with_plugin.get(t) in ("FAILED", "ERROR")]
        return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
