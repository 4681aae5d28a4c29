"""Example scorers for `mergekit-expo search --scorer examples/search/scorers.py:NAME`.

A scorer is any function (prompt, response) -> float; higher is better. These stand in for a
reward model in the worked example of docs/search.md, whose tiny models only know the sentences
of ``mergekit_expo.demo.checkpoints.CORPUS``.
"""

from __future__ import annotations

from mergekit_expo.demo.checkpoints import CORPUS

PUNCTUATION = ".,!?:;()'\""
KNOWN_WORDS = {w.strip(PUNCTUATION).lower() for s in CORPUS for w in s.split()} - {""}
HELPFUL_WORDS = {
    "assistant", "answers", "question", "politely", "helpfully", "helpful", "answer", "honest",
    "harmless", "point", "write", "yaml", "config",
}


def words(text: str) -> list[str]:
    return [w.strip(PUNCTUATION).lower() for w in text.split() if w.strip(PUNCTUATION)]


def fluent(prompt: str, response: str) -> float:
    """Share of response words that are real words (of the corpus); 0 for an empty answer."""
    found = words(response)
    return sum(w in KNOWN_WORDS for w in found) / len(found) if found else 0.0


def helpful_and_fluent(prompt: str, response: str) -> float:
    """Fluency × (1 + share of "helpful" words): helpful words count only in real sentences."""
    found = words(response)
    if not found:
        return 0.0
    helpful = sum(w in HELPFUL_WORDS for w in found) / len(found)
    return fluent(prompt, response) * (1.0 + helpful)
