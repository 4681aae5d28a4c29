"""The three ways the search scores a candidate.

- :class:`RewardModelScorer`: a Hugging Face sequence-classification reward model scores each
  (prompt, sampled response), as both papers do.
- :class:`CallableScorer`: any Python function ``module:function`` (prompt, response) → float.
- :class:`DpoAccuracyScorer`: no generation; the share of preference pairs whose DPO implicit
  reward r = β·log π(y|x)/π_ref(y|x) ranks chosen above rejected, with θ₀ as π_ref (the
  iterative-merging paper's metric).

Each scorer has an ``identity()`` that goes into the results key, so that changing the scorer
(or its file) never reuses stale rows.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mergekit_expo.errors import ExpoError
from mergekit_expo.search.prompts import Pair, file_digest
from mergekit_expo.search.results import files_identity


class ScorerError(ExpoError, ValueError):
    """The scorer cannot be loaded or returned something that is not a finite number."""


@dataclass
class Scores:
    """Per-item scores of one candidate, plus scorer-specific summary figures."""

    values: list[float]
    extras: dict[str, float] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    @property
    def sem(self) -> float:
        return self.std / math.sqrt(len(self.values))


# -- scorers of sampled responses ----------------------------------------------------------


class CallableScorer:
    """``module:function`` or ``path/to/file.py:function``, called as f(prompt, response).

    The "function" may be any callable object, e.g. an instance of a class with ``__call__``:
    its identity then holds the source files of its class (and the class's bases), besides the
    file the object is made in, so that editing the class starts fresh rows.
    """

    generates = True

    def __init__(self, spec: str, *, role: str = "scorer"):
        self.spec, self.role = spec, role  # role: "scorer" or "guard", for messages
        self.function, self.source = load_callable(spec)

    def identity(self) -> dict[str, Any]:
        source = file_digest(self.source) if self.source else None
        identity = {"kind": "callable", "function": self.spec, "source_sha256": source}
        if not inspect.isroutine(self.function):  # an object: its class's code scores too
            cls = type(self.function)
            identity["class"] = f"{cls.__module__}.{cls.__qualname__}"
            identity["class_sources_sha256"] = {
                str(path): file_digest(path) for path in class_sources(cls)
            }
        return identity

    def prepare(self, *, progress: bool = True) -> None:
        """Nothing to load: the function was imported to fail early on a bad spec."""

    def score(self, prompts: Sequence[str], responses: Sequence[str], *, progress=True) -> Scores:
        values = []
        pairs = zip(prompts, responses, strict=True)
        for index, (prompt, response) in enumerate(
            tqdm(pairs, total=len(prompts), desc="Scoring", disable=not progress, leave=False)
        ):
            try:
                value = self.function(prompt, response)
            except Exception as error:  # the user's code: say where, on what, not a traceback
                raise ScorerError(
                    f"{self.role} {self.spec} raised {type(error).__name__}: "
                    f"{' '.join(str(error).split())}{_raised_at(error)} on prompt {index + 1} "
                    f"of {len(prompts)} ({_opening(prompt)})"
                ) from error
            values.append(_finite(value, self.spec, index))
        return Scores(values)


class RewardModelScorer:
    """A sequence-classification reward model with one output (its logit is the reward)."""

    generates = True

    def __init__(self, path: str | Path, *, device: str = "cpu", batch_size: int = 8):
        self.path = Path(path).resolve() if Path(path).exists() else path
        self.device, self.batch_size = device, batch_size
        self.model = None  # loaded by prepare(), only if a candidate is left to score

    def identity(self) -> dict[str, Any]:
        return {"kind": "reward_model", "path": str(self.path), "files": files_identity(self.path)}

    def prepare(self, *, progress: bool = True) -> None:
        """Load the reward model and its tokenizer (once), after checking it has one output;
        without ``progress``, transformers' bars are off for the load only."""
        from mergekit_expo.search.generation import progress_bars

        if self.model is not None:
            return
        with progress_bars(progress):
            self._load()

    def _load(self) -> None:
        from transformers import AutoModelForSequenceClassification

        self._load_tokenizer()
        model = AutoModelForSequenceClassification.from_pretrained(self.path, dtype="auto")
        model.config.pad_token_id = self.pad_token_id
        self.model = model.to(self.device).eval()

    def _load_tokenizer(self):
        """The tokenizer, after checking the model has one output; returns the model's config.
        ``pad_token_id``: the token whose trailing run the model skips to find the last token."""
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(self.path)
        if config.num_labels != 1:
            raise ScorerError(
                f"reward model {self.path} has {config.num_labels} outputs; the search needs a "
                "reward model with a single scalar output (num_labels = 1)"
            )
        tokenizer = AutoTokenizer.from_pretrained(self.path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_token_id = (config.pad_token_id if config.pad_token_id is not None
                             else tokenizer.pad_token_id)
        tokenizer.padding_side = "right"
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        limit = tokenizer.model_max_length
        self.max_length = limit if limit and limit < 1_000_000 else None
        self.tokenizer = tokenizer
        return config

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], *, progress=True) -> Scores:
        self.prepare()
        values: list[float] = []
        starts = range(0, len(prompts), self.batch_size)
        for start in tqdm(starts, desc="Reward model", disable=not progress, leave=False):
            stop = start + self.batch_size
            batch = self._encode(prompts[start:stop], responses[start:stop])
            logits = self.model(**batch.to(self.model.device)).logits[:, 0].float()
            values.extend(logits.tolist())
        return Scores([_finite(v, f"reward model {self.path}", i) for i, v in enumerate(values)])

    def _encode(self, prompts: Sequence[str], responses: Sequence[str]):
        truncate = {"truncation": True, "max_length": self.max_length} if self.max_length else {}
        if self.chat:  # the reward model's own conversation format
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                    tokenize=False,
                )
                for p, r in zip(prompts, responses, strict=True)
            ]
            return self.tokenizer(
                texts, add_special_tokens=False, padding=True, return_tensors="pt", **truncate
            )
        return self.tokenizer(
            list(prompts), list(responses), padding=True, return_tensors="pt", **truncate
        )


# -- DPO implicit-reward accuracy ----------------------------------------------------------


class DpoAccuracyScorer:
    """Accuracy of r = β·(log π(y|x) − log π_ref(y|x)) on (chosen, rejected) pairs, π_ref = θ₀.

    Log-probabilities are summed over the response tokens, with the end-of-sequence token
    appended to each response, prompts encoded as for generation (chat template if used).
    A pair counts as correct when r(chosen) > r(rejected) strictly.
    """

    generates = False

    def __init__(self, pairs: list[Pair], pairs_path: Path, *, beta: float, batch_size: int = 8):
        if not beta > 0:
            raise ScorerError(f"beta must be > 0, got {beta}")
        self.pairs, self.beta, self.batch_size = pairs, beta, batch_size
        self.pairs_sha256 = file_digest(pairs_path)
        self.sequences: list[tuple[list[int], int]] = []  # (ids, response start)
        self.reference: torch.Tensor | None = None

    def identity(self) -> dict[str, Any]:
        return {"kind": "dpo_accuracy", "pairs_sha256": self.pairs_sha256, "beta": self.beta}

    def prepare(self, weights, tokenizer, chat: bool, *, progress=True) -> None:
        """Tokenize the pairs and compute log π_ref once, with θ₀ in the candidate model."""
        from mergekit_expo.search.generation import encode_prompt

        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        for pair in self.pairs:
            prompt = encode_prompt(tokenizer, pair.prompt, chat)
            for response in (pair.chosen, pair.rejected):
                ids = tokenizer(response, add_special_tokens=False)["input_ids"] + eos
                self.sequences.append((prompt + ids, len(prompt)))
        weights.apply_reference()
        self.reference = self.log_probs(weights.model, progress=progress, desc="log π_ref (θ₀)")

    def log_probs(self, model, *, progress=True, desc="log π") -> torch.Tensor:
        """Σ log π(y_t | x, y_<t) over response tokens, per sequence (chosen, rejected, ...)."""
        return sequence_log_probs(
            model, self.sequences, pad=self.pad, batch_size=self.batch_size, progress=progress,
            desc=desc,
        )

    def evaluate(self, model, *, progress=True) -> Scores:
        policy = self.log_probs(model, progress=progress)
        rewards = self.beta * (policy - self.reference)
        chosen, rejected = rewards[0::2], rewards[1::2]
        margins = chosen - rejected
        return Scores(
            values=(margins > 0).double().tolist(),
            extras={
                "mean_margin": float(margins.mean()),
                "mean_reward_chosen": float(chosen.mean()),
                "mean_reward_rejected": float(rejected.mean()),
            },
        )


@torch.no_grad()
def sequence_log_probs(
    model, sequences: Sequence[tuple[list[int], int]], *, pad: int, batch_size: int,
    progress: bool = True, desc: str = "log π",
) -> torch.Tensor:
    """Σ log π(y_t | y_<t) over the tokens from ``start`` on, per ``(ids, start)`` sequence."""
    totals = []
    starts = range(0, len(sequences), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        batch = sequences[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        scored = torch.zeros((len(batch), width - 1), dtype=torch.bool)
        for row, (ids, begin) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            # logits at t predict token t+1; a response's first token needs a token before it
            scored[row, max(begin, 1) - 1 : len(ids) - 1] = True
        logits = model(
            input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device)
        ).logits[:, :-1].float()
        token_logps = torch.gather(
            logits.log_softmax(-1), 2, input_ids[:, 1:, None].to(logits.device)
        )[..., 0]
        totals.append((token_logps.cpu() * scored).sum(-1).double())
    return torch.cat(totals)


# -- helpers -------------------------------------------------------------------------------


def load_callable(spec: str) -> tuple[Callable[[str, str], float], Path | None]:
    """Import ``module:function`` (or ``file.py:function``); return it and its source file."""
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        raise ScorerError(
            f"scorer {spec!r}: write it as module:function or path/to/file.py:function"
        )
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).resolve()
            if not path.is_file():
                raise ScorerError(f"scorer {spec!r}: no such file {path}")
            module = _exec_file(path)
        else:
            module = importlib.import_module(module_name)
    except ScorerError:
        raise
    except Exception as error:
        raise ScorerError(
            f"scorer {spec!r}: cannot import {module_name} ({type(error).__name__}: {error}); "
            "is it on PYTHONPATH?"
        ) from error
    function = getattr(module, attribute, None)
    if not callable(function):
        names = sorted(name for name, value in vars(module).items()
                       if callable(value) and not name.startswith("_"))
        match = difflib.get_close_matches(attribute, names, n=1, cutoff=0.6)
        hint = f"; did you mean {match[0]!r}?" if match else ""
        raise ScorerError(f"scorer {spec!r}: {module_name} has no function {attribute!r}{hint}")
    try:  # a function's own file; for another callable object, the file that made it
        source = inspect.getsourcefile(function if inspect.isroutine(function) else module)
    except TypeError:
        source = None
    return function, Path(source) if source else None


def class_sources(cls: type) -> list[Path]:
    """The Python files that define ``cls`` and its bases (those with Python code of their own),
    found through their functions' code, so that a class of a scorer file loaded by path (no
    longer in ``sys.modules``) is found too."""
    files = set()
    for klass in cls.__mro__:
        for value in vars(klass).values():
            value = getattr(value, "__func__", value)  # classmethod, staticmethod
            code = getattr(value, "__code__", None)
            if code is not None and Path(code.co_filename).is_file():
                files.add(Path(code.co_filename).resolve())
    return sorted(files)


def _exec_file(path: Path):
    """Run a scorer file as a module of its own, leaving no trace in ``sys.modules``.

    The module is in ``sys.modules`` while its code runs only: what a module's code expects
    of itself at import time needs it there (``@dataclass`` resolves string annotations through
    ``sys.modules[cls.__module__]``, ``typing.get_type_hints`` and ``pickle`` look the module
    up by name). Once loaded, the entry is removed again (a name already taken is given back):
    the function keeps its module's globals, and the process keeps no module it did not ask for.
    """
    name = f"_mergekit_expo_scorer_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    previous = sys.modules.get(name)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    finally:
        if previous is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = previous
    return module


def _raised_at(error: BaseException) -> str:
    """`` at file.py:12``: the innermost line of the scorer's code that raised (frames of the
    standard library and installed packages left out, unless there are no others)."""
    import sysconfig
    import traceback

    frames = traceback.extract_tb(error.__traceback__)[1:]  # [0]: our call of the scorer
    installed = tuple({sysconfig.get_paths()[key] for key in ("stdlib", "purelib", "platlib")})
    own = [frame for frame in frames if not frame.filename.startswith(installed)] or frames
    return f" at {Path(own[-1].filename).name}:{own[-1].lineno}" if own else ""


def _opening(text: Any, width: int = 40) -> str:
    """The first characters of a prompt, quoted, for a message of one line."""
    text = " ".join(str(text).split())
    return repr(text if len(text) <= width else text[:width] + "…")


def _finite(value: Any, who: str, index: int) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ScorerError(
            f"{who} returned {value!r} ({type(value).__name__}) for item {index}; "
            "a scorer must return a number"
        ) from None
    if not math.isfinite(number):
        raise ScorerError(f"{who} returned {number} for item {index}; scores must be finite")
    return number
