"""Tiny but real checkpoints, built once per session, and helpers to merge and check them."""

from __future__ import annotations

import os
import shutil
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Python's bytecode cache, on even where PYTHONDONTWRITEBYTECODE is set: the suite starts a hundred
# processes that import torch, transformers and mergekit, and without .pyc files each of them
# compiles those packages from source again (seconds of CPU per process).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False


def _threads_per_worker() -> int | None:
    """Under pytest-xdist, each worker's share of the cores (None outside xdist). Two workers
    on two cores that each spin two OpenMP threads (and so does every process they start) fight
    over the cores: the tiny models here then cost far more CPU time than on one thread."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    return max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None


if _threads_per_worker() is not None:  # before torch is imported; inherited by child processes
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads_per_worker()))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from mergekit_expo.demo.checkpoints import build_model, build_tokenizer, derive  # noqa: E402

if _threads_per_worker() is not None:  # in case a plugin imported torch before this file
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


class Zoo:
    """Checkpoints by name, built on first use: SFT models and their aligned relatives."""

    def __init__(self, root: Path):
        self.root = root
        self._tokenizer = None

    def _path(self, name: str, build) -> Path:
        path = self.root / name
        if not (path / "config.json").exists():
            build(path)
        return path

    def base(self, name: str, *, dtype=torch.bfloat16, seed=0, hidden=64, **kw) -> Path:
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer()
        return self._path(
            name,
            lambda p: build_model(
                p, seed=seed, dtype=dtype, hidden=hidden, tokenizer=self._tokenizer, **kw
            ),
        )

    def relative(self, name: str, source: Path, *, seed: int, scale=0.02, **kw) -> Path:
        return self._path(name, lambda p: derive(source, p, seed=seed, scale=scale, **kw))

    # the usual cast
    @property
    def sft(self) -> Path:
        return self.base("sft", hidden=256)

    @property
    def dpo(self) -> Path:
        return self.relative("dpo", self.sft, seed=1)

    def iterates(self, count: int = 3) -> list[Path]:
        """Iterative-DPO checkpoints θ₁…θ_T of the same reference, each a step further."""
        paths, previous = [], self.sft
        for index in range(1, count + 1):
            previous = self.relative(f"iter{index}", previous, seed=10 + index, scale=0.01)
            paths.append(previous)
        return paths


# Files that start engines or many processes, the most expensive first. Under pytest-xdist with
# ``--dist loadfile --no-loadscope-reorder`` (README's test command) the workers take them in this
# order, and the cheap files fill in at the end, so that the two workers finish together (xdist's
# own order, by number of tests, would leave the engines, with few tests each, for last).
EXPENSIVE_FIRST = (
    "test_documented_commands.py", "test_search_engines.py", "test_benchmark_quick.py",
    "test_search_reward_engine.py", "test_search_failures.py", "test_search_pool.py",
    "test_nothing_lost.py", "test_registration.py", "test_output_integrity.py",
    "test_lora_output.py", "test_cli.py", "test_search_lm_eval.py", "test_exact_paths.py",
    "test_toy_alignment_smoke.py", "test_exact_rounding.py", "test_native_kernel.py",
    "test_search.py",
)


def pytest_collection_modifyitems(items) -> None:
    rank = {name: index for index, name in enumerate(EXPENSIVE_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("zoo"))


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_merge_in_process(config: dict, out: Path, **options) -> Path:
    """The real mergekit engine, in this process (no 8 s import per merge)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    merge_options = MergeOptions(quiet=True, **options)
    run_merge(MergeConfiguration.model_validate(config), str(out), options=merge_options)
    return out


def mergekit_yaml_in_process(*args: object):
    """mergekit's own ``mergekit-yaml`` click command, run in this process (its callback wrapped
    as in the console script, whose process other tests start): the click ``Result``."""
    from click.testing import CliRunner
    from mergekit.scripts.run_yaml import main

    return CliRunner().invoke(main, [str(a) for a in args])


def made_once(tmp_path_factory, name: str, make) -> Path:
    """``make(folder)`` run once per test run, its folder shared by the pytest-xdist workers (the
    first makes it under a file lock; the others wait for it). A run that fails leaves no
    marker, so the next worker tries again and fails the same way."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's folder, above every worker's own
    folder, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def search_example(tmp_path_factory) -> Path:
    """docs/search.md's worked example models, made once per test run by its own command
    (``python examples/search/make_models.py DIR``, about 10 s of training)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]

    def make(folder: Path) -> None:
        subprocess.run([sys.executable, "examples/search/make_models.py", str(folder / "example")],
                       cwd=root, check=True, capture_output=True, text=True, timeout=600)

    return made_once(tmp_path_factory, "search-example", make) / "example"


@pytest.fixture(scope="module")
def engine_family(search_example, tmp_path_factory):
    """The worked example's θ₀ and θ₁ (bf16, head_dim 32: vLLM's CPU attention needs ≥ 32),
    with an intermediate between them for λ."""
    sft, final = search_example / "sft", search_example / "aligned"
    middle = derive(sft, tmp_path_factory.mktemp("engine") / "middle", seed=70, scale=0.02)
    return {"sft": sft, "iterates": [middle], "final": final}


@pytest.fixture(scope="session")
def console_merge(tmp_path_factory) -> dict:
    """``mergekit-yaml expo.yml OUT -v`` run once as its own process (the installed console
    script) over a θ₀ and θ₁ made for it: the tests of what it writes and of what it prints
    read the same run."""
    import json
    import subprocess

    def make(folder: Path) -> None:
        zoo = Zoo(folder / "zoo")
        sft, dpo = zoo.sft, zoo.dpo
        config = write_config(folder / "expo.yml", {
            "merge_method": "expo", "base_model": str(sft), "models": [{"model": str(dpo)}],
            "parameters": {"alpha": 0.5}})
        done = subprocess.run(
            [str(Path(sys.executable).with_name("mergekit-yaml")), str(config),
             str(folder / "out"), "-v"],
            capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        (folder / "run.json").write_text(json.dumps({
            "sft": str(sft), "dpo": str(dpo), "alpha": 0.5, "out": str(folder / "out"),
            "returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}))

    run = json.loads((made_once(tmp_path_factory, "console-merge", make) / "run.json").read_text())
    return {**run, **{key: Path(run[key]) for key in ("sft", "dpo", "out")}}


def search_inputs(zoo: Zoo, root: Path, name: str, *, seed: int, final_seed: int, scale: float,
                  prompts: list[str]) -> tuple[Path, Path]:
    """A search's inputs in ``root``: an expo config over a tiny θ₀ and θ_T, and a prompts file."""
    import json

    sft = zoo.base(f"{name}_sft", hidden=64, seed=seed)
    final = zoo.relative(f"{name}_final", sft, seed=final_seed, scale=scale)
    config = write_config(root / "c.yml", {"merge_method": "expo", "base_model": str(sft),
                                           "models": [{"model": str(final)}]})
    prompt_file = root / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return config, prompt_file


@pytest.fixture(params=["compiled", "torch"])
def each_kernel(request, monkeypatch) -> str:
    """The test runs with the compiled exact kernel and with the torch one: the same bits."""
    from mergekit_expo.merge import native

    if request.param == "torch":
        monkeypatch.setenv(native.ENV, "torch")
    elif native.library() is None:
        if os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"):
            pytest.fail("a C compiler is here but the compiled kernel was not built")
        pytest.skip("no C compiler: only the torch kernel runs here")
    return request.param
