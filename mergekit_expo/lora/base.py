"""``--base`` checked against the adapters before anything is computed.

θ₀'s tensors enter the output wherever the adapter saves full tensors (``modules_to_save``,
against θ₀'s tensor) and in DoRA's magnitude (a norm of θ₀'s rows plus the update). Another model
than the one the adapter was trained over gives an output that loads cleanly and is wrong, so
``--base`` must be that model by three tests:

- its name: ``base_model_name_or_path`` in adapter_config.json is the --base folder (resolved), or
  names it (the same last path component as the folder, a Hugging Face cache snapshot's
  repository, or the ``_name_or_path`` of its config.json); ``ignore_name`` skips this one;
- its shapes: every adapted module's weight has the shape the adapter's A and B make, every
  saved module the shape of the adapter's tensor;
- its relatedness: every saved tensor is within ``max_relative_change`` of θ₀'s (‖saved − θ₀‖ /
  ‖θ₀‖, the merge's figure and default threshold ``warn_relative_change``): fine-tuning moves a
  module a few %, an unrelated model's tensor differs by about √2 of its norm.
"""

from __future__ import annotations

import json
from pathlib import Path

from mergekit_expo.lora.adapter import Adapter, AdapterError, base_shapes, read_base_tensors
from mergekit_expo.merge.guards import relative_change

# shape problems listed in full before the rest are counted
SHOWN = 3


def check_base(adapters: list[Adapter], base: str | Path, *, ignore_name: bool,
               max_relative_change: float) -> dict:
    """Refuse ``base`` (θ₀'s folder) unless it is the model every adapter was trained over;
    return θ₀'s tensors of the saved modules, read for the check (the extrapolation uses them)."""
    base = Path(base)
    problems = [] if ignore_name else [p for a in adapters if (p := name_problem(a, base))]
    shapes = shape_problems(adapters, base)
    if shapes:
        problems += shapes[:SHOWN]
        if len(shapes) > SHOWN:
            problems.append(f"… and {len(shapes) - SHOWN} more")
        problems.append("the adapter was not trained over --base: give the model it was "
                        "trained over")
    theta0 = {}
    if not problems:
        names = sorted({name for adapter in adapters for name in adapter.saved})
        theta0 = read_base_tensors(base, names) if names else {}
        problems = relatedness_problems(adapters, theta0, base, max_relative_change)
    if problems:
        raise AdapterError("\n".join(problems))
    return theta0


def name_problem(adapter: Adapter, base: Path) -> str | None:
    recorded = adapter.base_model
    if not recorded or _same_model(recorded, base):
        return None
    names = sorted(_names(base) - {base.name})
    also = f" (also known as {', '.join(map(repr, names))})" if names else ""
    return (
        f"--base {base}{also} is not the model adapter {adapter.path} was trained over: its "
        f"adapter_config.json names base_model_name_or_path {recorded!r}. Give that model as "
        "--base, or add --ignore-base-name if this folder is that model under another name "
        "(its shapes and saved tensors are checked all the same)"
    )


def _same_model(recorded: str, base: Path) -> bool:
    path = Path(recorded).expanduser()
    if path.exists() and path.resolve() == base.resolve():
        return True
    return _last(recorded) in {_last(name) for name in _names(base)}


def _names(base: Path) -> set[str]:
    """What ``base`` may be called: its folder's name (as given and resolved), the repository of
    a Hugging Face cache snapshot (``models--org--name/snapshots/…``), its config's
    ``_name_or_path``."""
    resolved = base.resolve()
    names = {base.name, resolved.name}
    names |= {part.removeprefix("models--").replace("--", "/") for part in resolved.parts
              if part.startswith("models--")}
    try:
        recorded = json.loads((resolved / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = {}
    if isinstance(recorded, dict) and isinstance(recorded.get("_name_or_path"), str):
        names.add(recorded["_name_or_path"])
    return {name for name in names if name}


def _last(name: str) -> str:
    """A model's name without its organisation or folders, as Hugging Face compares ids."""
    return name.rstrip("/").rsplit("/", 1)[-1].casefold()


def shape_problems(adapters: list[Adapter], base: Path) -> list[str]:
    """Adapted modules whose θ₀ weight does not have the shape of B @ A, saved tensors whose θ₀
    tensor has another shape, and modules θ₀ lacks."""
    wanted: dict[str, tuple[tuple[int, ...], str]] = {}  # θ₀ tensor -> (shape, what says so)
    problems = []
    for adapter in adapters:
        transposed = bool(adapter.config.get("fan_in_fan_out"))
        for module, pair in adapter.pairs.items():
            a = tuple(adapter.tensors[pair.a_key].shape)
            b = tuple(adapter.tensors[pair.b_key].shape)
            # PEFT: linear and conv weights are (out, in, …); an embedding's, and a Conv1D's
            # (fan_in_fan_out), are (in, out)
            flipped = transposed or "lora_embedding_A" in pair.a_key
            shape = (a[1], b[0]) if flipped else (b[0], a[1], *a[2:])
            wanted[f"{module}.weight"] = (shape, f"adapter {adapter.path} (A {a}, B {b})")
        for name, key in adapter.saved.items():
            shape = tuple(adapter.tensors[key].shape)
            wanted.setdefault(name, (shape, f"adapter {adapter.path} (a saved tensor)"))
    found = base_shapes(base, list(wanted))
    for name, (shape, source) in wanted.items():
        if found[name] is None and name == "lm_head.weight" and _tied(base):
            continue  # the head is the embedding's weight, which the checkpoint holds once
        if found[name] is None:
            problems.append(f"--base {base} has no tensor {name}, which {source} changes")
        elif found[name] != shape:
            problems.append(f"--base {base}: {name} is {found[name]}, {source} needs {shape}")
    return problems


def _tied(base: Path) -> bool:
    try:
        config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("tie_word_embeddings") is True


def relatedness_problems(adapters: list[Adapter], theta0: dict, base: Path,
                         threshold: float) -> list[str]:
    """Saved tensors too far from θ₀'s (``theta0``, read from ``base``) to be a fine-tuned copy."""
    problems = []
    for adapter in adapters:
        for name, key in adapter.saved.items():
            change = relative_change(adapter.tensors[key], theta0[name])
            if change is not None and change > threshold:
                problems.append(
                    f"adapter {adapter.path} saves {name}, which differs from --base's ({base}) "
                    f"by {change:.3g} of its norm (limit {threshold:g}; fine-tuning moves a "
                    "module a few %): the adapter was not trained over this model. Give the "
                    "model it was trained over as --base, or raise --max-relative-change if "
                    "this is intended"
                )
    return problems
