"""Vocabulary rows the reference lacks keep the final model's row.

With ``tokenizer: {source: union}``, mergekit invents θ₀'s row for a token θ₀ does not have
(a copy of the one model that has it, or the mean of several). Extrapolating θ_T against an
invented row is meaningless, so those rows of the result are θ_T's own. mergekit does not tell
a merge method which rows were invented; ``record_rows_reference_lacks`` wraps its
``PermutedVocabulary`` task to remember them, keyed by the reference's aligned tensor.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mergekit_expo.roles import Roles

# id(reference tensor) -> (weak reference to it, row ids); entries vanish with the tensor.
# (A WeakKeyDictionary would compare tensors with ==, which is elementwise.)
_lacking: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def record_rows_reference_lacks(
    reference_tensor: torch.Tensor, permutation: dict[int, int], vocab_ids: list[int]
) -> None:
    """Remember the output-vocabulary ids whose reference row was invented by mergekit."""
    rows = [token_id for token_id in vocab_ids if permutation.get(token_id, -1) < 0]
    if rows:
        key = id(reference_tensor)
        _lacking[key] = (weakref.ref(reference_tensor), torch.tensor(sorted(rows)))
        weakref.finalize(reference_tensor, _lacking.pop, key, None)


def keep_rows_reference_lacks(
    result: torch.Tensor, roles: Roles, vocabulary_axis: int | None
) -> bool:
    """Copy θ_T's rows into ``result`` wherever θ₀'s row was invented; True if it did."""
    if vocabulary_axis is None:
        return False
    entry = _lacking.get(id(roles.reference.tensor))
    if entry is None or entry[0]() is not roles.reference.tensor:
        return False
    rows = entry[1].to(result.device)
    final_rows = roles.final.tensor.index_select(vocabulary_axis, rows)
    result.index_copy_(vocabulary_axis, rows, final_rows.to(result.dtype))
    return True
