"""``mergekit.tokenizer.embed``: remember the vocabulary rows the reference lacks.

After mergekit's ``PermutedVocabulary`` has aligned the inputs' embeddings to the output
vocabulary, the rows θ₀ lacks are recorded (``merge.guards``) so that the kernel keeps them out
of the extrapolation (``task_adapter`` hands them over).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from mergekit_expo.patches.apply import install_wrapper
from mergekit_expo.patches.record import Call, Internal, with_tokenizer

FEATURE = (
    "the guard that keeps vocabulary rows θ₀ lacks out of the extrapolation "
    "(`tokenizer:` / `tokenizer_source:`) is off"
)
PERMUTED_VOCABULARY = Internal(
    "mergekit.tokenizer.embed", "PermutedVocabulary.execute", FEATURE, needed_by=with_tokenizer,
    call=Call(("self", "tokenizer_info", "tensors"), forwards=True), fields=("base_model",),
)
TOKENIZER_INFO = Internal("mergekit.tokenizer.build", "TokenizerInfo", FEATURE,
                          fields=("tokenizer", "permutations"), needed_by=with_tokenizer)
RECORDS = (PERMUTED_VOCABULARY, TOKENIZER_INFO)


def install(embed: ModuleType) -> None:
    install_wrapper(embed, PERMUTED_VOCABULARY, _recording_rows, needs=(TOKENIZER_INFO,))


def _recording_rows(original: Callable) -> Callable:
    def execute(self, tokenizer_info, tensors, *args, **kwargs):
        from mergekit_expo.merge.guards import record_rows_reference_lacks

        result = original(self, tokenizer_info, tensors, *args, **kwargs)
        base = self.base_model
        if base is not None and base in result and base in tokenizer_info.permutations:
            record_rows_reference_lacks(
                self,
                tokenizer_info.permutations[base],
                list(tokenizer_info.tokenizer.get_vocab().values()),
            )
        return result

    return execute
