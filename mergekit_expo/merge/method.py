"""``merge_method: expo`` — model extrapolation (ExPO) and the iterative-DPO (λ, α) merge.

With θ₀ = ``base_model`` (the SFT / reference model), θ_T = the final checkpoint (the last
model listed, or the one with ``final: true``) and θ̄ = the mean of every other listed model:

    θ = −αθ₀ + (1+α)λθ̄ + (1+α)(1−λ)θ_T

λ = 0 is ExPO, θ₂ = θ₁ + α(θ₁ − θ₀) (Zheng et al., arXiv:2404.16792); λ > 0 is Algorithm 2 of
"Language model merging in iterative preference learning". α and λ are resolved per tensor by
mergekit, so filters and layer gradients apply.
"""

from __future__ import annotations

import torch
from mergekit.merge_methods.base import (
    BasePolicy,
    FunctionalGroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    PerInputValues,
    TensorGroup,
)

from mergekit_expo.merge import METHOD_NAME
from mergekit_expo.merge.formula import extrapolate_checked
from mergekit_expo.merge.guards import check_finite, keep_rows_reference_lacks, warn_if_unrelated
from mergekit_expo.merge.parameters import (
    ALPHA,
    DEFAULT_ALPHA,
    DEFAULT_LAMBDA,
    DEFAULT_WARN_RELATIVE_CHANGE,
    FINAL,
    LAMBDA,
    WARN_RELATIVE_CHANGE,
    FinalFlag,
    number,
)
from mergekit_expo.merge.roles import announce, require_reference, tensor_roles
from mergekit_expo.merge.rounding import output_dtype


def expo_merge(group: TensorGroup, **parameters) -> torch.Tensor:
    """θ = lerp(lerp(θ_T, θ̄, λ), θ₀, −α), computed in float64 and rounded once.

    ``parameters`` holds alpha, lambda (a Python keyword, hence no named argument), the
    per-model ``final`` flags and ``warn_relative_change``, resolved for this tensor.
    """
    alpha: float = parameters[ALPHA]
    lam: float = parameters[LAMBDA]
    final: PerInputValues[bool] = parameters[FINAL]
    roles = tensor_roles(group, final, lam)
    announce(roles, alpha=alpha, lam=lam)
    if not roles.final.tensor.is_floating_point():
        return roles.final.tensor
    warn_if_unrelated(roles, parameters[WARN_RELATIVE_CHANGE])
    final_tensor = roles.final.tensor
    result, finite = extrapolate_checked(
        roles.reference.tensor,
        final_tensor,
        [entry.tensor for entry in roles.intermediates],
        alpha=alpha,
        lam=lam,
        out=torch.empty(  # rounded once into out_dtype; mergekit's cast to it is then a copy
            final_tensor.shape, dtype=output_dtype() or final_tensor.dtype,
            device=final_tensor.device,
        ),
    )
    replaced = keep_rows_reference_lacks(result, roles, group.metadata.vocabulary_axis)
    if not finite or replaced:  # the kernel's flag predates rows copied from θ_T
        check_finite(result, roles, alpha=alpha, lam=lam)
    return result


class ExpoMergeMethod(FunctionalGroupMergeMethod):
    """Only adds an error that says which model is missing and how to name it."""

    def validate_inputs(self, input_ids, base_id=None, *, group_name=None) -> None:
        require_reference(input_ids, base_id, group_name)
        super().validate_inputs(input_ids, base_id, group_name=group_name)


expo_method = ExpoMergeMethod(
    MergeMethodSpec(
        name=METHOD_NAME,
        pretty_name="ExPO (model extrapolation)",
        reference_url="https://arxiv.org/abs/2404.16792",
        contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
        parameters=(
            ParameterSpec(ALPHA, number(ALPHA), ParameterScope.SHARED, DEFAULT_ALPHA),
            ParameterSpec(LAMBDA, number(LAMBDA), ParameterScope.SHARED, DEFAULT_LAMBDA),
            ParameterSpec(FINAL, FinalFlag, ParameterScope.NON_BASE, False),
            ParameterSpec(
                WARN_RELATIVE_CHANGE,
                number(WARN_RELATIVE_CHANGE),
                ParameterScope.SHARED,
                DEFAULT_WARN_RELATIVE_CHANGE,
            ),
        ),
    ),
    expo_merge,
)
