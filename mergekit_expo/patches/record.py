"""One record per mergekit (or transformers) internal that mergekit-expo wraps or reads.

A record (:class:`Internal`) says where the internal lives, the call our wrapper or read makes
to it, the task fields it reads, the feature it gives and which merges need that feature.
:func:`check` finds the internal and binds the record's call to the signature it has now
(``inspect.Signature.bind``), each argument to the parameter of its name: an added optional
parameter keeps the feature; a parameter of the call that is gone or renamed, a new required one
that a read would have to pass, or a missing field loses it. Losses are process-wide
(:data:`LOST`), like the patches themselves: what mergekit looks like does not change within a
process. :func:`refuse_lost` refuses an expo merge that needs a lost feature, naming the feature
and the installed mergekit.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from mergekit_expo.errors import ExpoError

LOG = logging.getLogger("mergekit_expo")
SUPPORTED = "mergekit-expo supports mergekit >=0.1.5,<0.2"
MARK = "__mergekit_expo__"  # set on our wrappers (``apply.wrap_once``)


class LostFeatureError(ExpoError, RuntimeError):
    """An expo merge (or a read) needs a feature that the installed mergekit does not allow."""


@dataclass(frozen=True)
class Call:
    """The arguments a wrapper or read passes, named as the target's parameters.

    ``forwards``: a wrapper passes on, after these, whatever else mergekit's caller gave it, so
    a parameter it does not name (even a new required one) is mergekit's caller's to fill.
    """

    positional: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ()
    forwards: bool = False

    def __str__(self) -> str:
        shown = [*self.positional, *(f"{k}=…" for k in self.keywords)]
        return "(" + ", ".join(shown + ["…"] * self.forwards) + ")"


@dataclass(frozen=True)
class Need:
    """Which expo merges need a feature (a test of their ``MergeConfiguration``), and how such a
    merge can do without it (the refusal's advice: "remove out_dtype: from the config or ")."""

    test: Callable[[Any], bool]
    advice: str = ""

    def __call__(self, config: Any) -> bool:
        return bool(self.test(config))


no_merge = Need(lambda config: False)  # the merge runs without the feature (the loss is logged)
every_expo_merge = Need(lambda config: True)
with_out_dtype = Need(lambda config: config.out_dtype, "remove out_dtype: from the config or ")
with_tokenizer = Need(lambda config: config.tokenizer or config.tokenizer_source,
                      "remove tokenizer: / tokenizer_source: from the config or ")


@dataclass(frozen=True)
class Internal:
    """A mergekit or transformers internal, and what mergekit-expo needs of it."""

    module: str  # where it lives: "mergekit.plan"
    name: str  # attribute path in the module: "MergePlanner.plan_to_disk"
    feature: str  # what is off without it, in the words of the warning and the refusal
    call: Call | None = None  # what our wrapper or read passes to it (None: nothing called)
    fields: tuple[str, ...] = ()  # pydantic fields read, of the class (or the method's class)
    needed_by: Need = no_merge  # which expo merges need it

    @property
    def where(self) -> str:
        return f"{self.module}.{self.name}"

    @property
    def advice(self) -> str:
        return self.needed_by.advice


# Features lost in this process: record -> why.
LOST: dict[Internal, str] = {}
_ANNOUNCED: set[tuple[str, str]] = set()


def check(record: Internal, module: ModuleType | None = None) -> Any:
    """The record's internal if it still fits; else the loss is recorded and None returned.

    ``module``: the module the record names, as it is being extended now (mergekit may still be
    half-imported); without it, or for a record of another module, that one is looked up.
    """
    found, why = find(record, module)
    if why is not None:
        lose(record, why)
    return found


def read(record: Internal) -> Any:
    """The record's internal, for a read; raises :class:`LostFeatureError` when it does not fit."""
    found, why = find(record)
    if why is None:
        return found
    lose(record, why)
    raise LostFeatureError(
        f"mergekit-expo: {record.feature} because {why} ({installed()}); "
        f"{record.advice}install a supported mergekit"
    )


def find(record: Internal, module: ModuleType | None = None) -> tuple[Any, str | None]:
    """(the internal, None) when it fits the record, else (None, why not)."""
    package = _package(record.module)
    if module is None or module.__name__ != record.module:
        module = sys.modules.get(record.module)
        if module is None:
            try:
                module = importlib.import_module(record.module)
            except ImportError:
                return None, f"{package} has no module {record.module}"
    owner, target, path = None, module, record.module
    for part in record.name.split("."):
        owner, target = target, getattr(target, part, None)
        if target is None:
            return None, f"{package}'s {path} has no {part}"
        path = f"{path}.{part}"
    if record.call is not None:
        misfit = _misfit(record.call, target)
        if misfit:
            return None, f"{package}'s {record.where} {misfit}"
    if record.fields:
        model = target if isinstance(target, type) else owner
        missing = [f for f in record.fields if f not in getattr(model, "model_fields", {})]
        if missing:
            held_by = path if model is target else path.rsplit(".", 1)[0]
            return None, f"{package}'s {held_by} has no {missing}"
    return target, None


def _misfit(call: Call, target: Any) -> str | None:
    """Why ``call`` does not bind to ``target``'s signature, each argument to its parameter."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError) as error:
        return f"has no signature to call ({error})"
    shown = signature.replace(
        parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
        return_annotation=signature.empty,
    )
    values = {name: object() for name in (*call.positional, *call.keywords)}
    bind = signature.bind_partial if call.forwards else signature.bind
    try:
        bound = bind(*(values[name] for name in call.positional),
                     **{name: values[name] for name in call.keywords})
    except TypeError as error:
        return f"takes {shown}, which does not fit our call {call} ({error})"
    for name, value in values.items():
        if bound.arguments.get(name) is not value:
            landed = next(k for k, v in bound.arguments.items()
                          if v is value or value in (v.values() if isinstance(v, dict) else
                                                     v if isinstance(v, tuple) else ()))
            kind = signature.parameters[landed].kind
            star = {kind.VAR_POSITIONAL: "*", kind.VAR_KEYWORD: "**"}.get(kind, "")
            return f"takes {shown}: our call {call} passes {name} to its parameter {star}{landed}"
    return None


def lose(record: Internal, why: str) -> None:
    """Record (and announce once) that the feature of ``record`` is off in this process."""
    if record in LOST:
        return
    LOST[record] = why
    if (why, record.feature) not in _ANNOUNCED:
        _ANNOUNCED.add((why, record.feature))
        LOG.warning("mergekit-expo: %s; %s (%s)", why, record.feature, installed())


def refuse_lost(merge_config: Any, verify: tuple[Internal, ...] = ()) -> None:
    """Refuse an expo merge that needs a lost feature (the records in ``verify``, reads not yet
    made, are checked first when the merge needs them)."""
    refusals = lost_for(merge_config, verify)
    if refusals:
        raise LostFeatureError(refusals[0])


def lost_for(merge_config: Any, verify: tuple[Internal, ...] = ()) -> list[str]:
    """The refusal of each lost feature ``merge_config`` needs (``mergekit-expo check`` prints
    them; the merge raises the first)."""
    for record in verify:
        if record not in LOST and record.needed_by(merge_config):
            check(record)
    return [
        f"expo: refusing this merge: {record.feature} because {why} ({installed()}); "
        f"{record.advice}install a supported mergekit"
        for record, why in LOST.items() if record.needed_by(merge_config)
    ]


def installed() -> str:
    return f"mergekit {_version('mergekit')} is installed; {SUPPORTED}"


def _package(module: str) -> str:
    """How a message names the package of ``module``: "mergekit", "transformers 5.0.0"."""
    top = module.split(".")[0]
    return top if top == "mergekit" else f"{top} {_version(top)}"


@functools.cache
def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "(version unknown)"
