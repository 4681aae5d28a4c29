"""Fault injector: runs the real ``mergekit-yaml`` (its click command, in this process) with a
failure at one exact moment of the merge, for tests/test_output_integrity.py.

    python tests/faults.py SCENARIOS.json

SCENARIOS.json is a list of ``{"name", "fault", "args"}``; ``args`` are mergekit-yaml's. Each
fault patches one point of mergekit or transformers, then calls mergekit-yaml; nothing of
mergekit is replaced, the patch only adds the failure. Prints one JSON line per scenario:
``{"name": ..., "outcome": "exit 0" | "<ExceptionType>: <message>"}``. A signal the process does
not survive (SIGTERM, SIGKILL) ends it, as it would end mergekit-yaml.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import sys

SIGNALS = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}


@contextlib.contextmanager
def patched(owner, name, make):
    original = getattr(owner, name)
    setattr(owner, name, make(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def file_size_limit_from_now():
    """``ulimit -f 0`` from this moment: every write that grows a file fails with EFBIG."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
    bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no .pyc cut short
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        sys.dont_write_bytecode = bytecode


def signal_while_saving_config(signum):
    """Write config.json, cut it in half (the write is under way), then send ``signum``."""
    import transformers

    def make(original):
        def to_json_file(self, json_file_path, *args, **kwargs):
            original(self, json_file_path, *args, **kwargs)
            if os.path.basename(str(json_file_path)) == "config.json":
                size = os.path.getsize(json_file_path)
                os.truncate(json_file_path, size // 2)
                os.kill(os.getpid(), signum)
        return to_json_file

    return patched(transformers.PretrainedConfig, "to_json_file", make)


def disk_full_after_weights():
    """The weights are written and renamed; from then on the disk is full."""
    from mergekit.io.tensor_writer import TensorWriter

    limit = contextlib.ExitStack()

    def make(original):
        def finalize(self):
            original(self)
            limit.enter_context(file_size_limit_from_now())
        return finalize

    stack = contextlib.ExitStack()
    stack.enter_context(limit)
    stack.enter_context(patched(TensorWriter, "finalize", make))
    return stack


def disk_full_while_copying_tokenizer():
    import mergekit.merge

    limit = contextlib.ExitStack()

    def make(original):
        def copy_tokenizer(*args, **kwargs):
            limit.enter_context(file_size_limit_from_now())
            return original(*args, **kwargs)
        return copy_tokenizer

    stack = contextlib.ExitStack()
    stack.enter_context(limit)
    stack.enter_context(patched(mergekit.merge, "_copy_tokenizer", make))
    return stack


def signal_while_moving(signum):
    """Send ``signum`` as the first file of the finished merge moves into the output folder."""
    import mergekit_expo.output.staging as staging

    def make(original):
        sent = []

        def rename(source, target):
            moving = ".expo-staging-" not in str(source) or ".expo-staging-" not in str(target)
            if moving and not sent:
                sent.append(signum)
                os.kill(os.getpid(), signum)
            return original(source, target)
        return rename

    return patched(staging.os, "rename", make)


def fault(name: str):
    if name.endswith("_while_saving_config"):
        return signal_while_saving_config(SIGNALS[name.split("_")[0]])
    if name.endswith("_while_moving"):
        return signal_while_moving(SIGNALS[name.split("_")[0]])
    return {
        "disk_full_after_weights": disk_full_after_weights,
        "disk_full_while_copying_tokenizer": disk_full_while_copying_tokenizer,
    }[name]()


def main(path: str) -> None:
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    for scenario in json.loads(open(path).read()):
        try:
            with fault(scenario["fault"]):
                mergekit_yaml(scenario["args"], standalone_mode=False)
            outcome = "exit 0"
        except BaseException as error:  # noqa: BLE001 - KeyboardInterrupt is an outcome too
            cause = error.__context__ if type(error).__name__ == "Abort" else error
            outcome = f"{type(cause).__name__}: {cause}"
        print(json.dumps({"name": scenario["name"], "outcome": outcome}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
