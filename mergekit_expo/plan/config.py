"""A merge config from a path, a mapping or a ``MergeConfiguration``, read once.

mergekit drops unknown top-level keys without a word (``paramters:`` merges with the defaults);
the plan refuses them for expo configs, naming the key and the closest valid one.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from mergekit_expo.errors import ExpoError
from mergekit_expo.merge import METHOD_NAME


class ConfigError(ExpoError, ValueError):
    """The config cannot be read as an expo merge; the message names the file or key."""


def uses_expo(config: Any) -> bool:
    """An expo merge (mergekit 0.1.5 has ``merge_method`` only at the top level)."""
    if isinstance(config, dict):
        return config.get("merge_method") == METHOD_NAME
    return getattr(config, "merge_method", None) == METHOD_NAME


def misspelt_method(config: Any, where: str) -> str | None:
    """A message when ``merge_method`` is no method mergekit knows but is close to ``expo``.

    mergekit would stop later with its own error about an unknown method; ``exp0``, ``exop`` or
    ``Expo`` were meant to be ours, so the refusal names the method and the spelling.
    """
    name = config.get("merge_method") if isinstance(config, dict) else getattr(
        config, "merge_method", None)
    if not isinstance(name, str) or name == METHOD_NAME:
        return None
    if not difflib.get_close_matches(name.lower(), [METHOD_NAME], n=1, cutoff=0.6):
        return None
    from mergekit.merge_methods import registered_methods

    if name in {method.spec.name for method in registered_methods()}:
        return None
    return (f"{where}: merge_method `{name}` is not a merge method mergekit knows; "
            f"did you mean `{METHOD_NAME}`?")


def read_raw(path: str | Path) -> dict[str, Any]:
    """The YAML mapping of a config file; errors name the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} does not hold a merge config mapping")
    return raw


def unknown_top_level_keys(raw: dict[str, Any], where: str) -> list[str]:
    """One message per top-level key mergekit would drop silently."""
    from mergekit.config import MergeConfiguration

    known = set(MergeConfiguration.model_fields)
    messages = []
    for key in raw:
        if key not in known:
            match = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean `{match[0]}`?" if match else ""
            messages.append(f"unknown top-level key `{key}` in {where}{hint}")
    return messages


def validate(raw: dict[str, Any], where: str) -> Any:
    """mergekit's own validation of the mapping, its error naming the file."""
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    try:
        return MergeConfiguration.model_validate(raw)
    except (ValidationError, RuntimeError, ValueError) as error:
        raise ConfigError(f"{where}: mergekit refuses this config: {error}") from None
