"""The synthetic preference task: a word-level language, prompts, SFT data and the gold reward.

A prompt is ``TOPIC n_i n_j >`` (topic ``A``..``D`` plus two context words that carry no
meaning). A response is a sequence of words, ended by ``</s>``. The gold reward is a known,
exact function of the prompt's topic and the response words (see :func:`gold_reward`):

    R(x, y) = Σ_w s(w) − 1.5 · max(0, L − 12)

    s(w) = +1   on-topic word  (``a0``..``a4`` for topic ``A``, ``b*`` for ``B``, ...)
           −0.5 word of another topic
            0   filler word    (``f0``..``f5``)
           −2   bad word       (``x0``..``x2``)
           −1   anything else  (a prompt word, ``<unk>``, ...)

where ``L`` is the number of response words before ``</s>`` (or before the generation cap).
The best response is 12 on-topic words then ``</s>``: R = 12. Up to 12 words, a longer answer
with good content scores higher (the length component DPO can pick up); past 12 every word
costs 1.5, more than an on-topic word earns, so over-long answers lose reward.

The SFT distribution is mediocre by design (mean R ≈ 0.3): 2..10 words, each on-topic with
probability 0.35, off-topic 0.20, filler 0.35, bad 0.10.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

TOPICS = ("A", "B", "C", "D")
WORDS_PER_TOPIC = 5
CONTEXT = tuple(f"n{i}" for i in range(8))
FILLER = tuple(f"f{i}" for i in range(6))
BAD = tuple(f"x{i}" for i in range(3))
SEPARATOR = ">"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
EOS = "</s>"

TARGET_LENGTH = 12
LENGTH_PENALTY = 1.5
SCORE_ON_TOPIC = 1.0
SCORE_OFF_TOPIC = -0.5
SCORE_FILLER = 0.0
SCORE_BAD = -2.0
SCORE_OTHER = -1.0
MAX_NEW_TOKENS = 24

# The SFT (demonstration) distribution: mediocre under the gold reward.
SFT_LENGTHS = (2, 10)
SFT_MIX = {"on": 0.35, "off": 0.20, "filler": 0.35, "bad": 0.10}


def topic_words(topic: str) -> tuple[str, ...]:
    """The on-topic words of ``topic`` (``A`` → ``a0``..``a4``)."""
    return tuple(f"{topic.lower()}{i}" for i in range(WORDS_PER_TOPIC))


ALL_TOPIC_WORDS = tuple(w for t in TOPICS for w in topic_words(t))
VOCABULARY = (
    *SPECIAL_TOKENS,
    SEPARATOR,
    *TOPICS,
    *CONTEXT,
    *ALL_TOPIC_WORDS,
    *FILLER,
    *BAD,
)


def build_tokenizer():
    """A word-level tokenizer over :data:`VOCABULARY` (46 tokens) that adds BOS; saves like any."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(VOCABULARY)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token=EOS,
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
    )


def all_prompts() -> list[str]:
    """Every prompt of the task (4 topics × 8 × 8 context words = 256), in a fixed order."""
    return [f"{t} {a} {b} {SEPARATOR}" for t in TOPICS for a in CONTEXT for b in CONTEXT]


def split_prompts(seed: int = 0, eval_count: int = 64) -> tuple[list[str], list[str]]:
    """(train prompts, held-out evaluation prompts), a seeded split balanced over topics."""
    rng = random.Random(seed)
    train, held_out = [], []
    per_topic = eval_count // len(TOPICS)
    for topic in TOPICS:
        prompts = [p for p in all_prompts() if p.startswith(topic + " ")]
        rng.shuffle(prompts)
        held_out += prompts[:per_topic]
        train += prompts[per_topic:]
    return train, held_out


def response_words(completion: str) -> list[str]:
    """The words of a completion up to (not including) the first ``</s>``; padding dropped."""
    words = []
    for word in completion.split():
        if word == EOS:
            break
        if word in ("<pad>", "<s>"):
            continue
        words.append(word)
    return words


def prompt_topic(prompt: str) -> str:
    """The topic letter of a prompt (a leading ``<s>`` is ignored)."""
    words = [w for w in prompt.split() if w != "<s>"]
    if not words or words[0] not in TOPICS:
        raise ValueError(f"not a toy-task prompt: {prompt!r}")
    return words[0]


def word_score(word: str, topic: str) -> float:
    """s(w) of the module docstring."""
    if word in topic_words(topic):
        return SCORE_ON_TOPIC
    if word in ALL_TOPIC_WORDS:
        return SCORE_OFF_TOPIC
    if word in FILLER:
        return SCORE_FILLER
    if word in BAD:
        return SCORE_BAD
    return SCORE_OTHER


def gold_reward(prompt: str, completion: str) -> float:
    """R(x, y) = Σ s(w) − 1.5 · max(0, L − 12): the exact, documented gold reward.

    Also the search's scorer: ``mergekit-expo search --scorer toy_task:gold_reward`` with this
    directory on ``PYTHONPATH``.
    """
    topic = prompt_topic(prompt)
    words = response_words(completion)
    content = sum(word_score(w, topic) for w in words)
    return content - LENGTH_PENALTY * max(0, len(words) - TARGET_LENGTH)


def response_length(completion: str) -> int:
    """L: the number of response words before ``</s>``."""
    return len(response_words(completion))


def word_counts(prompt: str, completion: str) -> tuple[int, int]:
    """(on-topic words, bad words) of a completion: where its reward comes from."""
    topic = prompt_topic(prompt)
    words = response_words(completion)
    return sum(w in topic_words(topic) for w in words), sum(w in BAD for w in words)


@dataclass(frozen=True)
class Scored:
    """Gold reward, length and the on-topic / bad word counts of one completion."""

    reward: float
    length: int
    on_topic: int = 0
    bad: int = 0


def score_many(prompts: Sequence[str], completions: Sequence[str]) -> list[Scored]:
    """Gold reward and length for aligned lists of prompts and completions."""
    return [
        Scored(gold_reward(p, c), response_length(c), *word_counts(p, c))
        for p, c in zip(prompts, completions, strict=True)
    ]


def sample_sft_response(prompt: str, rng: random.Random) -> str:
    """One demonstration from the mediocre SFT distribution, ending in ``</s>``."""
    topic = prompt_topic(prompt)
    on = topic_words(topic)
    off = tuple(w for w in ALL_TOPIC_WORDS if w not in on)
    pools = {"on": on, "off": off, "filler": FILLER, "bad": BAD}
    kinds, weights = tuple(SFT_MIX), tuple(SFT_MIX.values())
    length = rng.randint(*SFT_LENGTHS)
    words = [rng.choice(pools[rng.choices(kinds, weights)[0]]) for _ in range(length)]
    return " " + " ".join([*words, EOS])


def sft_dataset(prompts: Sequence[str], count: int, seed: int) -> list[dict[str, str]]:
    """``count`` prompt/completion demonstrations (TRL's prompt-completion format)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        prompt = rng.choice(prompts)
        rows.append({"prompt": prompt, "completion": sample_sft_response(prompt, rng)})
    return rows


def preference_pairs(
    prompts: Sequence[str], candidates: Iterable[Sequence[str]]
) -> list[dict[str, str]]:
    """Label pairs with the gold reward: for each prompt, best vs worst candidate, ties dropped.

    ``candidates[i]`` holds the completions sampled for ``prompts[i]``.
    """
    rows = []
    for prompt, completions in zip(prompts, candidates, strict=True):
        scored = sorted(completions, key=lambda c: gold_reward(prompt, c))
        worst, best = scored[0], scored[-1]
        if gold_reward(prompt, best) > gold_reward(prompt, worst):
            rows.append(
                {"prompt": prompt, "chosen": _with_eos(best), "rejected": _with_eos(worst)}
            )
    return rows


def offline_preference_pairs(
    prompts: Sequence[str], count: int, seed: int, per_prompt: int = 2
) -> list[dict[str, str]]:
    """Off-policy pairs: ``per_prompt`` demonstrations drawn from the SFT distribution, labelled."""
    rng = random.Random(seed)
    chosen_prompts, candidates = [], []
    for _ in range(count):
        prompt = rng.choice(prompts)
        chosen_prompts.append(prompt)
        candidates.append([sample_sft_response(prompt, rng) for _ in range(per_prompt)])
    return preference_pairs(chosen_prompts, candidates)


def _with_eos(completion: str) -> str:
    """`` w1 w2 </s>``: the words before the first EOS, a leading space, one EOS."""
    return " " + " ".join([*response_words(completion), EOS])


def gold_scorer(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """The gold reward of many answers at once (the search itself calls :func:`gold_reward`)."""
    return [gold_reward(p, c) for p, c in zip(prompts, completions, strict=True)]
